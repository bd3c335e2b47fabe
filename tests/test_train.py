import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import neurons
from harness.cli import main
from harness.config import load_config
from harness.train import CheckpointError, TrainingError, run

DIGITS = ["data.augment.crop_pad=1", "data.augment.flip=false", "data.batch_size=64",
          "model.lam_init=2.0", "eval.T=[1,2,4,8,16]"]


def _cfg(*extra):
    return load_config(None, DIGITS + list(extra))


def test_delta_zero_in_epoch_one_then_recorded_std(tmp_path, monkeypatch):
    seen, epoch = {}, [1]
    orig = neurons.NQ.forward

    def spy(self, z):
        if self.training:
            seen.setdefault(epoch[0], {})[id(self)] = float(self.delta)
        return orig(self, z)

    monkeypatch.setattr(neurons.NQ, "forward", spy)

    def bump(rec, out):
        epoch[0] = rec["epoch"] + 1

    res = run(_cfg("train.epochs=3"), tmp_path, callbacks=[bump], progress=False)
    hist = res["history"]
    assert all(d == 0.0 for d in seen[1].values())
    for k in (2, 3):
        used = list(seen[k].values())
        assert used == pytest.approx(hist[k - 2]["delta"], rel=1e-6)  # set from epoch k-1
        assert hist[k - 2]["delta"] == pytest.approx(hist[k - 2]["residual_std"], rel=1e-6)  # float32 buffer
    assert any(d > 0 for d in hist[0]["delta"])
    assert res["deltas"] == pytest.approx(hist[res["best_epoch"] - 1]["delta"], rel=1e-6)


def test_modes_qcfs_and_fixed_set_delta(tmp_path):
    r = run(_cfg("train.epochs=1", "noise.mode=qcfs"), tmp_path / "q", progress=False)
    assert r["deltas"] == [0.0] * 4 and r["method"] == "QCFS"
    std = r["history"][0]["residual_std"]
    assert std[0] == 0.0  # tau = L: the first layer converts exactly
    assert max(std[1:]) > 0  # deeper layers carry residual error, recorded in every mode
    r = run(_cfg("train.epochs=1", "noise.mode=fixed", "noise.delta=0.07"), tmp_path / "f", progress=False)
    assert r["deltas"] == pytest.approx([0.07] * 4) and r["method"] == "NQ-fixed"


def test_short_digits_run_reaches_accuracy(tmp_path):
    res = run(_cfg("train.epochs=12"), tmp_path, progress=False)
    assert res["ann_test_acc"] >= 90.0
    assert abs(res["snn_test_acc"]["8"] - res["ann_test_acc"]) <= 5.0
    out = json.loads((tmp_path / "result.json").read_text())
    assert set(out["snn_test_acc"]) == {"1", "2", "4", "8", "16"}
    assert len(out["history"]) == 12 and out["best_epoch"] >= 1
    for key in ("train_loss", "lr", "ann_val_acc", "ann_test_acc", "delta", "residual_std",
                "epoch_s", "calib_s"):
        assert key in out["history"][0]
    h = json.loads((tmp_path / "residual_hist.json").read_text())
    assert len(h["counts"]) == len(h["layers"]) == 4 and len(h["edges"]) == len(h["counts"][0]) + 1


def _cli(out, *extra, env=None):
    args = [sys.executable, "-m", "harness", "train", "--quiet", "--out", str(out)]
    for s in DIGITS + ["train.epochs=4", *extra]:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_kill_and_resume_is_identical(tmp_path):
    a = _cli(tmp_path / "a")
    assert a.returncode == 0, a.stderr
    b = _cli(tmp_path / "b", env={"HARNESS_TEST_DIE_AFTER_EPOCH": "2"})
    assert b.returncode == 137 and not (tmp_path / "b" / "result.json").exists()
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["state"]["epoch"] == 2
    c = _cli(tmp_path / "b")
    assert c.returncode == 0, c.stderr
    ra = json.loads((tmp_path / "a" / "result.json").read_text())
    rb = json.loads((tmp_path / "b" / "result.json").read_text())
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]  # noqa: E731
    assert strip(ra["history"]) == strip(rb["history"])
    for k in ("ann_test_acc", "snn_test_acc", "best_epoch", "deltas"):
        assert ra[k] == rb[k]


def test_non_finite_loss_stops_with_its_position(tmp_path):
    with pytest.raises(TrainingError, match=r"^non-finite loss at epoch 1, step \d+$"):
        run(_cfg("train.epochs=2", "train.lr=1.0e+30"), tmp_path, progress=False)


def test_corrupted_checkpoint_gives_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        run(_cfg("train.epochs=1"), tmp_path, progress=False)
    code = main(["train", "--out", str(tmp_path), "--set", "train.epochs=1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "checkpoint" in err and "\n" not in err


@pytest.mark.parametrize("args,msg", [
    (["--set", "noise.mode=layer"], "config error: noise.mode = 'layer' (expected one of: qcfs, fixed, layerwise)"),
    (["--set", "train.epochs=0"], "config error: train.epochs = 0"),
    (["--set", "model.arch=resnet50"], "config error: model.arch = 'resnet50'"),
    (["--set", "noise.bogus=1"], "config error: unknown key noise.bogus"),
    (["--set", "nonsense"], "config error: override 'nonsense'"),
    (["--config", "/nonexistent.yaml"], "config error:"),
])
def test_cli_config_errors_exit_2_and_write_nothing(tmp_path, capsys, args, msg):
    out = tmp_path / "out"
    code = main(["train", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(msg) and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
