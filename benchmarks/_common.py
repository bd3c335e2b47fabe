"""Shared helpers: argument parsing, interleaved and paired timing, Markdown tables.

Every number the benchmarks report as a comparison is measured side by side in the same
process: each repetition runs every contender once (in a rotated order), after one
warm-up call of each (`interleaved`: ratios of medians). Where a cost is judged against a
baseline whose own time drifts with the machine's load (one SNN step against one ANN
inference), `paired` times the baseline right before and after each contender in every
repetition, and the figure is the median of the per-repetition ratios, with their range
(`spread`). `sync` (torch.cuda.synchronize on a GPU) ends every timed call."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_REPS = 5


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (under a minute)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    return p


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def command(script: str, quick: bool, threads: int, extra: str = "") -> str:
    """The shell command (from the repository root) that reproduces a section."""
    parts = ["python", f"benchmarks/{script}"]
    if quick:
        parts.append("--quick")
    parts += ["--threads", str(threads)]
    if extra:
        parts.append(extra)
    return " ".join(parts)


def section(title: str, cmd: str, body: str) -> str:
    return f"## {title}\n\nReproduce: `{cmd}`\n\n{body.strip()}\n"


def _timed(fn: Callable[[], object], sync: Callable[[], None] | None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int = DEFAULT_REPS, warmup: int = 1,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Wall times (s) of every repetition of each callable. Repetitions are interleaved, the
    order rotates by one every repetition, and `warmup` untimed calls of each come first.
    `sync` (e.g. torch.cuda.synchronize) runs inside each timed call, after it."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
        if sync is not None:
            sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(_timed(fns[n], sync))
    return times


def interleaved(fns: dict[str, Callable[[], object]], reps: int = DEFAULT_REPS,
                warmup: int = 1, sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall time (s) of each callable (see `interleaved_times`)."""
    return {n: statistics.median(v) for n, v in interleaved_times(fns, reps, warmup, sync).items()}


def paired(baseline: Callable[[], object], fns: dict[str, Callable[[], object]], reps: int = DEFAULT_REPS,
           warmup: int = 1, sync: Callable[[], None] | None = None
           ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Each contender timed next to its own baseline, in every repetition.

    One repetition runs  B, c1, B, c2, B, ..., cn, B  (the contenders' order rotates by one
    every repetition); the baseline paired with contender ci in that repetition is the mean
    of the two baseline calls around it. Returns (contender times, their paired baseline
    times, every baseline call), each contender's lists in repetition order, so
    `times[n][r] / base[n][r]` is repetition r's paired ratio: a slow spell of the machine
    moves both sides of a ratio, not one row against another."""
    names = list(fns)
    for _ in range(warmup):
        baseline()
        for n in names:
            fns[n]()
        if sync is not None:
            sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    base: dict[str, list[float]] = {n: [] for n in names}
    every: list[float] = []
    for r in range(reps):
        k = r % len(names) if names else 0
        before = _timed(baseline, sync)
        every.append(before)
        for n in names[k:] + names[:k]:
            times[n].append(_timed(fns[n], sync))
            after = _timed(baseline, sync)
            every.append(after)
            base[n].append(0.5 * (before + after))
            before = after
    return times, base, every


def spread(values: Sequence[float]) -> dict[str, float]:
    """median, min, max, quartiles (statistics.quantiles, 'inclusive') and n of `values`."""
    v = sorted(values)
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[::2] if len(v) >= 2 else (v[0], v[0]))
    return dict(median=statistics.median(v), min=v[0], max=v[-1], q1=q1, q3=q3, n=len(v))


def fmt_spread(s: dict[str, float], unit: str = "×") -> str:
    """'1.12× (range 1.05–1.19×, n=5)'."""
    return f"{s['median']:.2f}{unit} (range {s['min']:.2f}–{s['max']:.2f}{unit}, n={s['n']})"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return fmt(v)
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def fmt(v: float) -> str:
    if v != v:  # nan
        return "n/a"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def target(ok: bool) -> str:
    return "met" if ok else "not met"


def main(run: Callable[[bool, int], str], description: str) -> None:
    args = parser(description).parse_args()
    print(run(args.quick, args.threads))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"

