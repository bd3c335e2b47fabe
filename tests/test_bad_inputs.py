"""Every bad input ends in one clear line, exit code 2 and nothing written (issue: one
clear line for every bad input). The count of cases is reported in reports/reliability.md."""
from __future__ import annotations

import io
import os
import pickle
import sqlite3
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main

DIGITS_1 = ["--set", "train.epochs=1", "--set", "eval.T=[1,4]", "--set", "noise.calib_samples=32"]


def run_cli(capsys, argv):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.err.strip()


def _one_line(code, err, expected_start):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(expected_start), err


# ---------------------------------------------------------------- train: configs and values

@pytest.mark.parametrize("sets, expected", [
    (["train.device=cuda"], "config error: train.device = 'cuda' (expected auto or cpu"),
    (["eval.select_T=3"], "config error: eval.select_T = 3 (expected one of eval.T"),
    (["train.lr=.inf"], "config error: train.lr = inf"),
    (["noise.delta=.inf"], "config error: noise.delta = inf"),
    (["noise.scale=.nan"], "config error: noise.scale = nan"),
    (["model.lam_init=.inf"], "config error: model.lam_init = inf"),
    (["train.weight_decay=-.inf"], "config error: train.weight_decay = -inf"),
    (["train.epochs=true"], "config error: train.epochs = True (expected an integer >= 1)"),
    (["train.seed='3'"], "config error: train.seed = '3' (expected an integer >= 0)"),
    (["train.epochs=2", "train.epochs=3"], "config error: --set train.epochs is given 2 times"),
])
def test_bad_values(tmp_path, capsys, sets, expected):
    if sets == ["train.device=cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    code, err = run_cli(capsys, ["train", "--out", str(out), *sum((["--set", s] for s in sets), [])])
    _one_line(code, err, expected)
    assert not out.exists()


def test_binary_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(os.urandom(512) + b"\xff\xfe")
    code, err = run_cli(capsys, ["train", "--config", str(cfg), "--out", str(tmp_path / "o")])
    _one_line(code, err, f"config error: file '{cfg}' is not UTF-8 text")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_text("x"), "run directory error: --out {out} is a file"),
    (lambda p: p.parent.write_text("x"), "run directory error: --out {out} cannot be created"),
])
def test_out_that_cannot_be_a_folder(tmp_path, capsys, make, expected):
    out = tmp_path / "o" if "is a file" in expected else tmp_path / "blocker" / "sub"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = run_cli(capsys, ["train", "--out", str(out), *DIGITS_1])
    _one_line(code, err, expected.format(out=out))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- train: checkpoints

def _finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), *DIGITS_1]) == 0
    capsys.readouterr()
    return out


def test_checkpoint_without_the_expected_keys(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"foo": 1}, out / "checkpoint.pt")
    code, err = run_cli(capsys, ["train", "--out", str(out), *DIGITS_1])
    _one_line(code, err, "checkpoint error: ")
    assert "another version of the harness" in err and sorted(p.name for p in out.iterdir()) == [
        ".harness.lock", "checkpoint.pt"]


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    import harness
    out = _finished_run(tmp_path, capsys)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["model"] = harness.create_model("resnet20", num_classes=10, in_chans=1).state_dict()
    torch.save(ck, out / "checkpoint.pt")
    (out / "result.json").unlink()
    more = [a if a != "train.epochs=1" else "train.epochs=2" for a in DIGITS_1]
    code, err = run_cli(capsys, ["train", "--out", str(out), *more])
    _one_line(code, err, "checkpoint error: ")
    assert "does not fit model.arch = cnn_small" in err and not (out / "result.json").exists()


# ---------------------------------------------------------------- data

def test_truncated_archive(tmp_path, capsys):
    src = tmp_path / "imgs"
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (src / split / cls).mkdir(parents=True)
            for i in range(20):
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    src / split / cls / f"{i}.png")
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    out = tmp_path / "o"
    code, err = run_cli(capsys, ["train", "--out", str(out), "--set", "data.name=imagefolder",
                                 "--set", f"data.root={archive}", "--set", f"data.val_fraction=0.25", *DIGITS_1])
    _one_line(code, err, f"data error: cannot read archive '{archive}'")
    assert not out.exists()


class _Gadget:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_cifar_pickle_runs_no_code(tmp_path, capsys):
    folder = tmp_path / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    good = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(good))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [_Gadget(marker)]}))
    code, err = run_cli(capsys, ["train", "--out", str(tmp_path / "o"), "--set", "data.name=cifar10",
                                 "--set", f"data.root={tmp_path / 'root'}", *DIGITS_1])
    _one_line(code, err, "data error: ")
    assert "posix.system is not allowed" in err or "os.system is not allowed" in err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_unsafe_archive_members_are_skipped_with_a_count(tmp_path):
    from harness.config import DataCfg
    from harness.data import load_dataset
    png = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png, format="PNG")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        def add(name, data=png.getvalue(), kind=tarfile.REGTYPE, link=""):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i in range(4):
                    add(f"{split}/{cls}/{i}.png")
        add("../train/evil/0.png")
        add("/abs/train/evil/1.png")
        add("train/a/link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("train/evil/hard.png", kind=tarfile.LNKTYPE, link="train/a/0.png")
    with pytest.warns(UserWarning, match="skipped 4 image"):
        ds = load_dataset(DataCfg(name="imagefolder", root=str(archive), val_fraction=0.25), 0, tmp_path / "c")
    assert ds.classes == ("a", "b") and len(ds.train_y) + len(ds.val_y) == 8


def test_symlinked_class_folder_is_not_a_class(tmp_path):
    from harness.config import DataCfg
    from harness.data import load_dataset
    from PIL import Image
    root = tmp_path / "root"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / split / cls / f"{i}.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside / f"{i}.png")
    (root / "train" / "c").symlink_to(outside, target_is_directory=True)
    (root / "train" / "a" / "x.png").symlink_to(outside / "0.png")
    with pytest.warns(UserWarning, match="skipped 4 image"):
        ds = load_dataset(DataCfg(name="imagefolder", root=str(root), val_fraction=0.25), 0, tmp_path / "c")
    assert ds.classes == ("a", "b")


# ---------------------------------------------------------------- tracking stores and search spaces

@pytest.mark.parametrize("content, expected", [
    (b"this is not a database at all", "is not an SQLite database"),
    ("sqlite", "is an SQLite database but not an MLflow store"),
])
def test_tracking_uri_that_is_not_an_mlflow_store(tmp_path, capsys, content, expected):
    db = tmp_path / "x.db"
    if content == "sqlite":
        with sqlite3.connect(db) as con:
            con.execute("create table notes (t text)")
    else:
        db.write_bytes(content)
    before = db.read_bytes()
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
    code, err = run_cli(capsys, ["sweep", str(space), "--tracking-uri", f"sqlite:///{db}",
                                 "--storage-path", str(tmp_path / "rr")])
    _one_line(code, err, "tracking error: --tracking-uri")
    assert expected in err and db.read_bytes() == before and not (tmp_path / "rr").exists()


def test_binary_search_space(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_bytes(b"\x80\x81\x82" * 100)
    code, err = run_cli(capsys, ["sweep", str(space), "--storage-path", str(tmp_path / "rr"),
                                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    _one_line(code, err, f"config error: search space '{space}' is not UTF-8 text")
    assert not (tmp_path / "rr").exists() and not (tmp_path / "m.db").exists()


def test_usage_errors_and_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sweep", "report")) and "exit codes" in out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("harness ")
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
