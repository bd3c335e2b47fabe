"""Smoke test of the benchmark scripts: run_all --quick on a subset writes a report
with the expected sections and a machine line. No timing is asserted."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    assert "Failed:" not in text
    assert "## Data pipeline" not in text and "## Calibration" not in text
