"""The benchmark scripts: run_all --quick on a subset writes a report with the expected
sections and a machine line; the paired timing and the roofline's peak reference; the
accuracy-per-compute table from an MLflow sweep; the GPU script's dry run. No timing is
asserted."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402


# ----------------------------------------------------------------------------- timing helpers

class FakeClock:
    """perf_counter that advances only when a timed callable runs (by its own cost)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def cost(self, seconds_per_rep):
        calls = iter(seconds_per_rep)

        def fn():
            self.t += next(calls)
        return fn


def test_paired_pairs_each_contender_with_the_baseline_around_it(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_common.time, "perf_counter", clock)
    # baseline calls: 1 warm-up, then per repetition 1 + one after each of the 2 contenders
    base = clock.cost([0.0] + [10, 20, 30] + [40, 50, 60])
    a = clock.cost([0.0, 100, 400])   # warm-up, rep 0, rep 1
    b = clock.cost([0.0, 200, 500])
    times, paired_base, every = _common.paired(base, {"a": a, "b": b}, reps=2)
    assert times == {"a": [100, 400], "b": [200, 500]}
    # rep 0 order a, b: a between 10 and 20, b between 20 and 30
    # rep 1 rotates to b, a: b between 40 and 50, a between 50 and 60
    assert paired_base == {"a": [15, 55], "b": [25, 45]}
    assert every == [10, 20, 30, 40, 50, 60]


def test_paired_calls_sync_inside_each_timed_call(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_common.time, "perf_counter", clock)
    syncs = []

    def sync():
        clock.t += 1.0  # the device finishing its queued work counts in the timing
        syncs.append(clock.t)

    times, base, every = _common.paired(lambda: None, {"x": lambda: None}, reps=3, sync=sync)
    assert times["x"] == [1.0, 1.0, 1.0] and every == [1.0] * 6
    assert len(syncs) == 1 + 3 * 3  # the warm-up, then baseline, x, baseline per repetition


def test_spread_and_fmt_spread():
    s = _common.spread([1.3, 1.0, 1.1, 1.2, 1.5])
    assert s["median"] == 1.2 and s["min"] == 1.0 and s["max"] == 1.5 and s["n"] == 5
    assert s["q1"] == pytest.approx(1.1) and s["q3"] == pytest.approx(1.3)
    assert _common.fmt_spread(s) == "1.20× (range 1.00–1.50×, n=5)"
    one = _common.spread([0.7])
    assert one["min"] == one["max"] == one["q1"] == 0.7


# ----------------------------------------------------------------------------- simulate

def test_theoretical_cpu_peak_from_flags_and_clock(monkeypatch):
    from benchmarks import simulate as sim

    monkeypatch.setattr(sim, "_cpu_flags", lambda: ({"fma", "avx2", "avx512f"}, 2.3, "test clock"))
    peak, how = sim.theoretical_cpu_peak(2)
    assert peak == pytest.approx(2 * 2 * 16 * 2 * 2.3)
    assert "AVX-512" in how and "assumed" in how and "test clock" in how
    monkeypatch.setattr(sim, "_cpu_flags", lambda: ({"fma", "avx2"}, 3.0, "x"))
    assert sim.theoretical_cpu_peak(1)[0] == pytest.approx(2 * 8 * 2 * 3.0)
    monkeypatch.setattr(sim, "_cpu_flags", lambda: (set(), None, "x"))
    assert sim.theoretical_cpu_peak(1)[0] is None


def test_simulate_reproduce_line_names_every_option():
    from benchmarks import simulate as sim

    assert sim.command(True, 1, 5, sim.CPU, None, sim.PARTS) == "python benchmarks/simulate.py --quick --threads 1"
    setup = sim.Setup("cuda", amp=True, channels_last=True)
    assert (sim.command(False, 16, 3, setup, 256, ("speed", "roofline"))
            == "python benchmarks/simulate.py --threads 16 --reps 3 --batch 256 --device cuda --amp "
               "--channels-last --parts speed,roofline")


@pytest.mark.slow
def test_simulate_tiny_paired_ratio_and_measured_peak():
    from benchmarks import simulate as sim

    text = sim.run(True, 1, reps=2, batch=2, parts=("speed", "roofline"))
    assert "Reproduce: `python benchmarks/simulate.py --quick --threads 1 --reps 2 --batch 2 --parts speed,roofline`" in text
    assert "**ResNet-20 simulation step / one ANN inference**" in text and "n=2)" in text
    assert "per-step / ANN (paired)" in text
    assert "**Reference: a measured peak**" in text and "**peak**" in text
    assert "% of matmul" not in text
    assert "### (e)" not in text


@pytest.mark.slow
def test_run_all_quick_writes_report(tmp_path):
    pytest.importorskip("spikingjelly")
    out = tmp_path / "bench.md"
    # one thread: the smoke test must not depend on a quiet machine
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--threads", "1",
                           "--only", "simulate,activation", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert "**Machine:**" in text and "os.cpu_count()" in text and "torch threads used = 1" in text
    assert "**Versions:**" in text and "spikingjelly" in text
    for heading in ("## Simulation", "### (a–d)", "### (e)", "### (f)", "### (g)", "### (h)",
                    "## Activation", "### Training step", "### Noise statistics"):
        assert heading in text, heading
    assert "Reproduce: `python benchmarks/simulate.py --quick --threads 1`" in text
    assert "Reproduce: `python benchmarks/activation.py --quick --threads 1`" in text
    assert "per-step / ANN (paired)" in text and "**Reference: a measured peak**" in text
    assert "Failed:" not in text
    assert "## Data pipeline" not in text and "## Calibration" not in text



def test_snn_eval_quick_splits_into_chunks_and_agrees():
    """The chunked-evaluation benchmark really chunks (256 images -> 128) and finds the
    same predictions as whole batches."""
    from benchmarks import snn_eval

    text = snn_eval.run(quick=True, threads=1, reps=1)
    (row,) = [line for line in text.splitlines() if line.startswith("| resnet20 ")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["2", "256", "128"] and cells[-1] == "100.0%", row


def test_data_pipeline_quick_runs():
    """The data-pipeline benchmark runs on the real archive (it once failed on an
    unresolved augmentation default and nobody noticed until a full run)."""
    from benchmarks import data_pipeline

    if data_pipeline.archive_path() is None:
        pytest.skip("the CIFAR-10 JPEG archive is not on this machine")
    text = data_pipeline.run(quick=True, threads=1, reps=1)
    assert "Failed" not in text and "| " in text, text[:500]


@pytest.mark.slow
def test_sweep_overhead_pair_quick():
    """The sweep-overhead benchmark's pair part runs end to end (it once failed on a
    renamed LocalCalibrator attribute, seen only in a full `make bench`)."""
    pytest.importorskip("ray")
    from benchmarks import sweep_overhead

    text = sweep_overhead.run(quick=True, parts="pair", calib_calls=2)
    assert "sweep overhead per trial" in text and "calibration per call, actor" in text

# ----------------------------------------------------------------------------- accuracy per compute

def _result(method: str, ann: float, accs: dict) -> dict:
    return {"method": method, "config": {"model": {"arch": "cnn_small"}, "data": {"name": "digits"}},
            "macs": 1_000_000, "ann_test_acc": ann, "snn_test_acc": {str(t): a for t, a in accs.items()}}


@pytest.mark.slow
def test_accuracy_compute_reads_the_newest_parents_finished_trials(tmp_path):
    pytest.importorskip("mlflow")
    from benchmarks import accuracy_compute as ac
    from harness import tracking
    from harness.config import Config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "toy", uri)
    space = tmp_path / "toy.yaml"
    space.write_text("name: toy\n")
    qcfs, nq = Config.from_dict({"noise": {"mode": "qcfs"}}), Config.from_dict({})

    def child(parent, label, cfg, result=None, metrics=None, status="FINISHED"):
        rid = tracking.create_child(c, exp, parent, label, cfg.method)
        if result is not None:
            f = tmp_path / label / "result.json"
            f.parent.mkdir()
            f.write_text(json.dumps(result))
            c.log_artifact(rid, str(f))
        for k, v in (metrics or {}).items():
            c.log_metric(rid, k, v)
        c.log_param(rid, "model.arch", "cnn_small")
        c.log_param(rid, "data.name", "digits")
        tracking.set_status(c, rid, status)

    old = tracking.create_parent(c, exp, "toy", space)
    child(old, "old-0", qcfs, _result("QCFS", 50.0, {1: 10.0, 4: 20.0}))
    time.sleep(0.05)
    new = tracking.create_parent(c, exp, "toy", space)
    child(new, "q0", qcfs, _result("QCFS", 90.0, {1: 40.0, 4: 80.0}))
    child(new, "q1", qcfs, _result("QCFS", 92.0, {1: 44.0, 4: 84.0}))
    child(new, "n0", nq, metrics={"final/ann_test_acc": 91.0, "final/snn_test_acc_T01": 50.0,
                                  "final/snn_test_acc_T04": 86.0})  # no result.json: metrics
    child(new, "n1", nq, _result("NQ", 0.0, {1: 0.0}), status="FAILED")  # left out

    text = ac.run(tracking_uri=uri, experiment="toy")
    assert f"--experiment toy --parent {new}" in text
    assert f"3 FINISHED trial(s) of parent run `{new}` (the newest of 2 parent run(s))" in text
    assert "1 FAILED" in text and "2 × result.json" in text and "1 × metrics" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "QCFS SNN test acc (%) | NQ SNN test acc (%)" in rows["| T"]
    assert "91.00 ± 1.41 (n=2) | 91.00 (n=1)" in rows["| ANN"]
    assert "82.00 ± 2.83 (n=2) | 86.00 (n=1)" in rows["| 4"]
    assert rows["| 4"].startswith("| 4 | 4.0 |")  # T x MACs in millions

    older = ac.run(tracking_uri=uri, experiment="toy", parent=old)
    assert "given with `--parent`" in older and "| ANN | 1.0 | 50.00 (n=1) |" in older
    assert "No experiment `nope`" in ac.run(tracking_uri=uri, experiment="nope")
    assert "No MLflow store" in ac.run(tracking_uri=f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()


# ----------------------------------------------------------------------------- GPU script

def test_gpu_check_sizes_the_pair_from_the_probe():
    from benchmarks.gpu_check import plan_epochs

    # 300 s left: 20 s start-up, 11 s final test (x1.1), 22 s per epoch (x1.1) -> 11 epochs
    assert plan_epochs(300, 20, 22, 10, 200) == 11
    assert plan_epochs(300, 20, 22, 10, 5) == 5
    assert plan_epochs(40, 20, 22, 10, 200) == 0
    assert plan_epochs(10, 20, 22, 10, 200) == 0


def test_gpu_check_archive_fallbacks(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    a = tmp_path / "a.tar.gz"
    a.write_bytes(b"x")
    monkeypatch.setenv("CIFAR_ARCHIVE", str(a))
    assert gpu_check.archive_path(None) == a.resolve()
    assert gpu_check.archive_path(str(a)) == a.resolve()
    monkeypatch.setenv("CIFAR_ARCHIVE", str(tmp_path / "missing"))
    got = gpu_check.archive_path(str(tmp_path / "missing2"))
    shared = ROOT.parent / "shared" / "data" / gpu_check.ARCHIVE
    local = ROOT / ".data" / gpu_check.ARCHIVE
    assert got == (local.resolve() if local.is_file() else shared.resolve() if shared.is_file() else None)


def test_gpu_check_sh_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_file(tmp_path):
    pytest.importorskip("spikingjelly")
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["summary.md", "gpu_env.txt", "simulate.md", "activation.md", "train_pair.md",
                            "qcfs_result.json", "nq_result.json", "log.txt"])
    summary = (out / "summary.md").read_text()
    for step in ("env", "simulate fp32", "simulate amp+channels_last", "activation cpu", "activation cuda",
                 "data", "train pair"):
        assert f"| {step}" in summary, step
    assert "| failed" not in summary and "| timed out" not in summary and "| skipped" not in summary
    assert "Dry run" in summary
    q, n = (json.loads((out / f"{m}_result.json").read_text()) for m in ("qcfs", "nq"))
    assert q["method"] == "QCFS" and n["method"] == "NQ"
    assert len(q["history"]) == len(n["history"]) == 2  # the probe, then E = 2 (--max-epochs in a dry run)
    assert q["protocol"]["extended_from_epochs"] is None
    pair = (out / "train_pair.md").read_text()
    assert "E = 2 epochs fit" in pair and "NQ − QCFS" in pair
    sim = (out / "simulate.md").read_text()
    assert sim.count("## Simulation") == 2 and "channels_last" in sim
    act = (out / "activation.md").read_text()
    assert "has no CUDA option" in act and "## Activation training step on CPU (gpu_check.py)" in act
    assert "== train pair: OK" in (out / "log.txt").read_text()
