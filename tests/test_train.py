import json
import math
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


def test_delta_bookkeeping_per_epoch(tmp_path, monkeypatch):
    """delta_trained of epoch e is what the buffers held during e's training forward
    passes; delta_next of e (the calibrated std) is delta_trained of e + 1."""
    seen, epoch = {}, [1]
    orig = neurons.NQ.forward

    def spy(self, z):
        if self.training and torch.is_grad_enabled():
            seen.setdefault(epoch[0], {})[id(self)] = float(self.delta)
        return orig(self, z)

    monkeypatch.setattr(neurons.NQ, "forward", spy)

    def bump(rec, out):
        epoch[0] = rec["epoch"] + 1

    res = run(_cfg("train.epochs=3"), tmp_path, callbacks=[bump], progress=False)
    hist = res["history"]
    assert all(d == 0.0 for d in seen[1].values()) and hist[0]["delta_trained"] == [0.0] * 4
    for k in (1, 2, 3):
        assert sorted(seen[k].values()) == pytest.approx(sorted(hist[k - 1]["delta_trained"]), rel=1e-6)
        assert hist[k - 1]["delta_next"] == pytest.approx(hist[k - 1]["residual_std"], rel=1e-6)
    for k in (2, 3):
        assert hist[k - 1]["delta_trained"] == pytest.approx(hist[k - 2]["delta_next"], rel=1e-6)
    assert any(d > 0 for d in hist[0]["delta_next"])
    best = hist[res["best_epoch"] - 1]
    assert res["delta_trained"] == best["delta_trained"] and res["delta_next"] == best["delta_next"]
    ck = torch.load(tmp_path / "best.pt", weights_only=True)  # the weights' own delta in the buffers
    buffers = [v.item() for k, v in ck["model"].items() if k.endswith(".delta")]
    assert buffers == pytest.approx(ck["delta_trained"], rel=1e-6) and ck["epoch"] == res["best_epoch"]


def test_modes_qcfs_and_fixed_set_delta(tmp_path):
    r = run(_cfg("train.epochs=1", "noise.mode=qcfs"), tmp_path / "q", progress=False)
    assert r["delta_trained"] == r["delta_next"] == [0.0] * 4 and r["method"] == "QCFS"
    assert r["ann_noisy_test_acc"] is None
    std = r["history"][0]["residual_std"]
    assert std[0] == 0.0  # tau = L: the first layer converts exactly
    assert max(std[1:]) > 0  # deeper layers carry residual error, recorded in every mode
    r = run(_cfg("train.epochs=1", "noise.mode=fixed", "noise.delta=0.07"), tmp_path / "f", progress=False)
    assert r["delta_trained"] == pytest.approx([0.07] * 4) and r["method"] == "NQ-fixed"
    assert 0 <= r["ann_noisy_test_acc"] <= 100


def test_short_digits_run_reaches_accuracy(tmp_path):
    res = run(_cfg("train.epochs=12"), tmp_path, progress=False)
    assert res["ann_test_acc"] >= 90.0
    assert abs(res["snn_test_acc"]["8"] - res["ann_test_acc"]) <= 5.0
    out = json.loads((tmp_path / "result.json").read_text())
    assert set(out["snn_test_acc"]) == {"1", "2", "4", "8", "16"}
    assert len(out["history"]) == 12 and out["best_epoch"] >= 1
    for key in ("train_loss", "lr", "ann_val_acc", "ann_test_acc", "delta_trained", "delta_next", "residual_std",
                "epoch_s", "calib_s"):
        assert key in out["history"][0]
    h = json.loads((tmp_path / "residual_hist.json").read_text())
    assert len(h["counts"]) == len(h["layers"]) == 4 and len(h["edges"]) == len(h["counts"][0]) + 1


def _cli(out, *extra):
    args = [sys.executable, "-m", "harness", "train", "--quiet", "--out", str(out)]
    for s in DIGITS + ["train.epochs=4", *extra]:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True)


KILL_AFTER_EPOCH_2 = """
import os, sys
from harness.config import load_config
from harness.train import run
def die(rec, out):
    if rec["epoch"] == 2:
        os._exit(137)  # a kill right after the epoch's checkpoint
run(load_config(None, sys.argv[2:]), sys.argv[1], callbacks=[die], progress=False)
"""


def test_kill_and_resume_is_identical(tmp_path):
    a = _cli(tmp_path / "a")
    assert a.returncode == 0, a.stderr
    b = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_2, str(tmp_path / "b"), *DIGITS, "train.epochs=4"],
                       capture_output=True, text=True)
    assert b.returncode == 137 and not (tmp_path / "b" / "result.json").exists(), b.stderr
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["state"]["epoch"] == 2
    c = _cli(tmp_path / "b")
    assert c.returncode == 0, c.stderr
    ra = json.loads((tmp_path / "a" / "result.json").read_text())
    rb = json.loads((tmp_path / "b" / "result.json").read_text())
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]  # noqa: E731
    assert strip(ra["history"]) == strip(rb["history"])
    for k in ("ann_test_acc", "snn_test_acc", "best_epoch", "delta_trained", "delta_next", "ann_noisy_test_acc"):
        assert ra[k] == rb[k]


def test_non_finite_loss_stops_with_its_position(tmp_path):
    with pytest.raises(TrainingError, match=r"^training error: non-finite loss at epoch 1, step \d+$"):
        run(_cfg("train.epochs=2", "train.lr=1.0e+30"), tmp_path, progress=False)


def test_corrupted_checkpoint_gives_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        run(_cfg("train.epochs=1"), tmp_path, progress=False)
    code = main(["train", "--out", str(tmp_path), "--set", "train.epochs=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "checkpoint" in err and "\n" not in err


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


# ---------------------------------------------------------------- a run directory that tells the truth

def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    run(_cfg("train.epochs=1"), tmp_path, progress=False)
    before = (tmp_path / "result.json").read_text()
    for changed, keys in [(["model.L=16"], "model.L"), (["noise.mode=qcfs"], "noise.mode"),
                          (["model.grad=qcfs_iclr", "train.lr=0.05"], "model.grad, train.lr")]:
        code = main(["train", "--quiet", "--out", str(tmp_path), *sum((["--set", s] for s in
                                                                        DIGITS + ["train.epochs=1", *changed]), [])])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"({keys} differ)" in err and str(tmp_path) in err
    assert (tmp_path / "result.json").read_text() == before  # nothing was rewritten


def test_more_epochs_extend_a_run_and_say_so(tmp_path):
    run(_cfg("train.epochs=2"), tmp_path, progress=False)
    res = run(_cfg("train.epochs=3"), tmp_path, progress=False)
    assert len(res["history"]) == 3 and res["protocol"]["extended_from_epochs"] == 2
    with pytest.raises(Exception, match=r"train.epochs = 1, but .* has already trained 3 epochs"):
        run(_cfg("train.epochs=1"), tmp_path, progress=False)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from harness.train import run_dir_lock
with run_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["train", "--quiet", "--out", str(tmp_path), "--set", "train.epochs=1"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert f"in use by another harness process (pid {holder.pid})" in err
        assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "result.json").exists()
    finally:
        holder.kill()
        holder.wait()
    res = run(_cfg("train.epochs=1"), tmp_path, progress=False)  # released when the holder dies
    assert res["best_epoch"] == 1 and not (tmp_path / ".harness.pid").exists()


def test_result_records_protocol_and_resolved_defaults(tmp_path):
    res = run(load_config(None, ["train.epochs=1", "noise.calib_samples=50", "eval.T=[1,4]"]), tmp_path,
              progress=False)
    cfg = res["config"]
    assert cfg["data"]["augment"] == {"crop_pad": 1, "flip": False, "cutout": 0, "autoaugment": False}
    assert cfg["model"]["lam_init"] == 2.0 and cfg["model"]["grad"] == "nq"
    assert res["defaults_resolved"] == {"data.augment.crop_pad": 1, "data.augment.flip": False,
                                        "data.augment.autoaugment": False, "data.augment.cutout": 0,
                                        "model.lam_init": 2.0, "train.lr": 0.1}
    assert cfg["train"]["lr"] == 0.1
    cal = res["calibration"]
    assert cal["n_images"] == 50 and sum(cal["class_counts"]) == 50 and len(cal["class_counts"]) == 10
    assert max(cal["class_counts"]) - min(cal["class_counts"]) <= 2
    assert res["protocol"]["grad"] == "nq" and res["protocol"]["select_on"] == "val"
    assert res["protocol"]["calibration"] == cal


# ---------------------------------------------------------------- the training loop's invariants

def _spy_steps(monkeypatch):
    """Record, for every optimiser step, each group's lr and (lambda, grad) before/after."""
    steps = []
    orig = torch.optim.SGD.step

    def step(self, *a, **k):
        lam = self.param_groups[1]["params"]
        before = [(p.detach().clone(), p.grad.detach().clone()) for p in lam]
        out = orig(self, *a, **k)
        steps.append({"lr": [g["lr"] for g in self.param_groups], "wd": self.param_groups[1]["weight_decay"],
                      "lam": [(b, g, p.detach().clone()) for (b, g), p in zip(before, lam)]})
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return steps


def test_learning_rate_follows_the_cosine_schedule_at_every_step(tmp_path, monkeypatch):
    steps = _spy_steps(monkeypatch)
    res = run(_cfg("train.epochs=2", "train.lr=0.08"), tmp_path, progress=False)
    total = len(steps)
    assert total == 2 * (len(load_dataset_sizes()["train"]) // 64)
    for i, s in enumerate(steps):
        expected = 0.08 * 0.5 * (1 + math.cos(math.pi * i / total))  # written out, not imported
        assert s["lr"] == pytest.approx([expected, expected], rel=1e-12, abs=1e-15)
    assert res["history"][-1]["lr"] == pytest.approx(steps[-1]["lr"][0])


@pytest.mark.parametrize("flag", [True, False])
def test_lambda_gets_weight_decay_exactly_when_configured(tmp_path, monkeypatch, flag):
    steps = _spy_steps(monkeypatch)
    run(_cfg("train.epochs=1", "train.momentum=0", "train.weight_decay=0.01",
             f"train.lam_weight_decay={str(flag).lower()}"), tmp_path, progress=False)
    for s in steps[:5]:  # plain SGD: lam' = lam - lr * (grad + wd * lam)
        lr = s["lr"][1]
        for before, grad, after in s["lam"]:
            wd = 0.01 if flag else 0.0
            torch.testing.assert_close(after, before - lr * (grad + wd * before), rtol=1e-6, atol=1e-9)
            if grad.abs() > 0:
                assert not torch.allclose(after, before - lr * (grad + (0.01 - wd) * before), rtol=0, atol=1e-9)


def load_dataset_sizes():
    from harness.data import load_dataset
    ds = load_dataset(_cfg().data, 0)
    return {"train": ds.train_y, "val": ds.val_y, "test": ds.test_y}


@pytest.mark.parametrize("split", ["val", "test"])
def test_selection_reads_the_configured_split(tmp_path, monkeypatch, split):
    import harness.train as train_mod
    sizes = {k: len(v) for k, v in load_dataset_sizes().items()}
    assert sizes["val"] != sizes["test"]
    calls = []
    orig = train_mod.evaluate_snn

    def spy(model, batches, T):
        batches = list(batches)
        out = orig(model, batches, T)
        calls.append((sum(len(y) for _, y in batches), T, out))
        return out

    monkeypatch.setattr(train_mod, "evaluate_snn", spy)
    res = run(_cfg("train.epochs=3", f"eval.select_on={split}"), tmp_path, progress=False)
    per_epoch, final = calls[:3], calls[3]
    assert [n for n, _, _ in per_epoch] == [sizes[split]] * 3 and all(T == 4 for _, T, _ in per_epoch)
    accs = [out[-1] for _, _, out in per_epoch]
    assert res["best_epoch"] == 1 + accs.index(max(accs))
    assert final[0] == sizes["test"] and final[1] == 16  # the selected model on test at max(eval.T)
    assert [r["snn_acc"] for r in res["history"]] == [out for _, _, out in per_epoch]


def test_calibration_sees_validation_images_only(tmp_path, monkeypatch):
    import harness.calibration as cal_mod
    from harness.data import load_dataset
    seen = []
    orig = cal_mod.residual_error

    def spy(model, batches, tau, *a, **k):
        batches = [b.clone() for b in batches]
        seen.append(torch.cat(batches))
        return orig(model, batches, tau, *a, **k)

    monkeypatch.setattr(cal_mod, "residual_error", spy)
    cfg = _cfg("train.epochs=2", "noise.calib_samples=60")
    run(cfg, tmp_path, progress=False)
    ds = load_dataset(cfg.data, 0)
    norm = lambda x: ((x.float() / 255 - torch.tensor(ds.mean).view(1, -1, 1, 1))  # noqa: E731
                      / torch.tensor(ds.std).view(1, -1, 1, 1))
    val = {r.numpy().tobytes() for r in norm(ds.val_x)}
    test_only = {r.numpy().tobytes() for r in norm(ds.test_x)} - val
    assert len(seen) == 3  # two epochs and the final calibration
    for x in seen:
        rows_ = [r.numpy().tobytes() for r in x]
        assert len(rows_) == 60 and all(r in val for r in rows_) and not any(r in test_only for r in rows_)


def test_mac_count_of_the_small_cnn_has_a_closed_form():
    from harness.models import create_model
    from harness.train import count_macs
    w, k2 = 32, 9
    conv = lambda h, cin, cout: h * h * cout * cin * k2  # noqa: E731  (3x3, padding 1, stride 1)
    expected = conv(8, 1, w) + conv(8, w, w) + conv(4, w, 2 * w) + (2 * 2 * 2 * w) * 128 + 128 * 10
    assert expected == 937_216
    assert count_macs(create_model("cnn_small", num_classes=10, in_chans=1), (1, 8, 8)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_digits_defaults_work_without_a_config_file(tmp_path, seed):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "harness", "train", "--quiet", "--set", "data.name=digits",
                        "--set", "train.epochs=8", "--set", f"train.seed={seed}", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["ann_test_acc"] >= 95.0, res["ann_test_acc"]
    assert abs(res["snn_test_acc"]["8"] - res["ann_test_acc"]) <= 2.0, res["snn_test_acc"]


def test_snn_evaluation_in_cache_sized_chunks_equals_one_simulation():
    """On CPU evaluate_snn simulates ResNet-20 batches in chunks of 128 images (the labels
    split alongside): the accuracies at every T equal those of one simulation of the whole
    batch (to one image: a convolution's rounding may differ with the batch size)."""
    import harness
    from harness.convert import simulation_chunk, to_snn
    from harness.train import evaluate_snn

    torch.manual_seed(0)
    model = harness.create_model("resnet20", num_classes=10, L=4, lam_init=2.0).eval()
    x, y = torch.randn(300, 3, 32, 32), torch.randint(0, 10, (300,))
    assert simulation_chunk(model, x) == 128
    with torch.no_grad():
        whole = to_snn(model).simulate(x, 4).argmax(-1)
    y = torch.where(torch.arange(300) % 3 == 0, whole[-1], y)  # accuracies well above chance
    expected = [100.0 * (whole[t] == y).sum().item() / 300 for t in range(4)]
    got = evaluate_snn(model, [(x, y)], 4)
    assert got == pytest.approx(expected, abs=100 / 300 + 1e-9) and got[-1] > 30
