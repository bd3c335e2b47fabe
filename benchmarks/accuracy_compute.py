"""Accuracy per unit of compute, from a finished sweep (default: the CPU CIFAR-10 one).

SNN accuracy at each T against the dense compute it costs, T x MACs per image (every
step runs every layer densely, as `simulate` does), for QCFS and NQ. Read from the
trials' result.json under ray_results/<sweep>/.

    python benchmarks/accuracy_compute.py [--sweep cpu_cifar10] [--results DIR]
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, parser, section

TITLE = "Accuracy per unit of compute"


def table(results_dir: Path) -> str:
    files = sorted(results_dir.glob("*/work/result.json"))
    if not files:
        return f"No finished trials under `{results_dir}` (run the sweep first)."
    acc = defaultdict(lambda: defaultdict(list))  # method -> T -> accs
    ann, macs = defaultdict(list), set()
    for f in files:
        r = json.loads(f.read_text())
        macs.add(r["macs"])
        ann[r["method"]].append(r["ann_test_acc"])
        for t, a in r["snn_test_acc"].items():
            acc[r["method"]][int(t)].append(a)
    m = max(macs)
    methods = sorted(acc)
    Ts = sorted({t for d in acc.values() for t in d})

    def cell(v):
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

    lines = [f"{len(files)} trials from `{results_dir.relative_to(ROOT) if results_dir.is_relative_to(ROOT) else results_dir}`; "
             f"MACs per image (one ANN inference) = {m / 1e6:.2f} M.", "",
             "| T | steps × MACs (M) | " + " | ".join(f"{k} SNN test acc (%)" for k in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    lines.append("| ANN | " + f"{m / 1e6:.1f} | " + " | ".join(cell(ann[k]) for k in methods) + " |")
    for t in Ts:
        lines.append(f"| {t} | {t * m / 1e6:.1f} | " + " | ".join(cell(acc[k][t]) if acc[k][t] else "—"
                                                            for k in methods) + " |")
    return "\n".join(lines)


def run(quick: bool = False, threads: int = 2, sweep: str = "cpu_cifar10", results: str | None = None) -> str:
    d = Path(results) if results else ROOT / "ray_results" / sweep
    cmd = f"python benchmarks/accuracy_compute.py --sweep {sweep}"
    return section(TITLE, cmd, table(d))


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--sweep", default="cpu_cifar10")
    p.add_argument("--results", default=None)
    a = p.parse_args()
    print(run(a.quick, a.threads, a.sweep, a.results))
