"""Cost of recording spikes, SOPs and energy during the final SNN evaluation.

    python benchmarks/energy_overhead.py [--quick] [--threads N] [--reps R]

Side by side in this process (interleaved repetitions after a warm-up, medians): a plain
`SpikingNet.simulate` and the same simulation with an `EnergyRecorder` attached (a
forward hook per IF layer). The one-off fan-out computation (`synaptic_fanout`, once
per evaluation, not per batch) is timed separately. Target: recording <= 10% of a plain
simulation. Nothing here asserts on a timing.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import DEFAULT_REPS, command, interleaved, parser, section, set_threads, table, target

SCRIPT = "energy_overhead.py"
TITLE = "Energy recording overhead"
IN_SHAPE = (3, 32, 32)
FULL = dict(archs=["vgg16", "resnet20"], batch=64, T=8)
QUICK = dict(archs=["resnet20"], batch=8, T=4)
TARGET = 1.10  # recording <= 10% of a plain simulation


def run(quick: bool, threads: int, reps: int = DEFAULT_REPS) -> str:
    from benchmarks.simulate import build_model
    from harness import to_snn
    from harness.energy import EnergyRecorder, synaptic_fanout

    set_threads(threads)
    cfg = QUICK if quick else FULL
    B, T = cfg["batch"], cfg["T"]
    t_start = time.perf_counter()
    rows = []
    for arch in cfg["archs"]:
        model = build_model(arch)
        x = torch.randn(B, *IN_SHAPE, generator=torch.Generator().manual_seed(1))
        plain_snn, rec_snn = to_snn(model), to_snn(model)
        t0 = time.perf_counter()
        rec = EnergyRecorder(IN_SHAPE, T)
        rec.attach(rec_snn)  # computes the fan-out once
        fan_s = time.perf_counter() - t0
        for layout in ("step", "multistep"):
            med = interleaved({"plain": lambda: plain_snn.simulate(x, T, layout=layout),
                               "recording": lambda: rec_snn.simulate(x, T, layout=layout)}, reps)
            same = torch.equal(plain_snn.simulate(x, T, layout=layout), rec_snn.simulate(x, T, layout=layout))
            r = med["recording"] / med["plain"]
            rows.append([arch, layout, med["plain"] * 1e3, med["recording"] * 1e3, f"{r:.3f}×",
                         f"{target(r <= TARGET)}", "yes" if same else "NO", fan_s * 1e3])
        rec.detach()
        t0 = time.perf_counter()
        synaptic_fanout(plain_snn, IN_SHAPE)
        rows[-1][-1] = f"{rows[-1][-1]:.0f} (again: {(time.perf_counter() - t0) * 1e3:.0f})"
    body = (f"Batch {B}, T = {T}, input {IN_SHAPE}, random weights with random BN statistics and "
            f"thresholds (benchmarks/simulate.py's `build_model`). Medians of {reps} interleaved repetitions "
            "after one warm-up; 'same output' compares the [T, B, classes] readouts exactly. The fan-out "
            "(one forward and backward pass of the all-ones network at batch 1) is paid once per evaluation.\n\n"
            + table(["network", "layout", "plain ms", "recording ms", "recording / plain",
                     f"target ≤ {TARGET:.2f}×", "same output", "fan-out ms (once)"], rows)
            + f"\n\nSection wall time {time.perf_counter() - t_start:.0f} s.")
    extra = "" if reps == DEFAULT_REPS else f"--reps {reps}"
    return section(TITLE, command(SCRIPT, quick, threads, extra), body)


def main(argv: list[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed repetitions (median)")
    args = p.parse_args(argv)
    out = run(args.quick, args.threads, args.reps)
    print(out)
    return out


if __name__ == "__main__":
    main()
