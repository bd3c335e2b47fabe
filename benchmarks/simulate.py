"""SNN simulation speed and memory: `SpikingNet.simulate` against one ANN inference
(the roofline of one step), spikingjelly 2.0 multi-step mode, and a plain
step-by-step Python loop with an eager IF module.

    python benchmarks/simulate.py [--quick] [--threads N] [--reps R]

All comparisons are ratios of medians measured side by side in this process
(interleaved repetitions after a warm-up); peak memory is measured in fresh
subprocesses. Nothing here asserts on a timing.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks._common import (DEFAULT_REPS, command, interleaved, parser, ratio, section,
                                set_threads, table, target)

SCRIPT = "simulate.py"
IN_SHAPE = (3, 32, 32)
FULL = dict(archs=["vgg16", "resnet20"], batch=64, Ts=[4, 8, 32], roof_T=8, allT_max=64,
            scale_Ts=[1, 2, 4, 8, 16, 32, 64], mem_T=64, mem_chunk=8, mem_small_T=8, aux_arch="resnet20",
            matmul_n=2048, probe_workers=1)
QUICK = dict(archs=["resnet20"], batch=8, Ts=[4], roof_T=4, allT_max=8,
             scale_Ts=[1, 2, 4, 8], mem_T=64, mem_chunk=8, mem_small_T=8, aux_arch="resnet20",
             matmul_n=1024, probe_workers=4)
# glibc: serve every allocation >= 128 KiB by mmap (fixed threshold), so freed tensors
# leave the RSS at once and the peak reflects live memory, not allocator caching
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
TARGET_STEP = 1.1      # per-step cost <= 1.1x one ANN inference
TARGET_ALLT = 1.9      # all-T readout >= 1.9x faster than separate runs
TARGET_MEM = 1.25      # chunked peak at T=64 <= 1.25x peak at T=8


# ----------------------------------------------------------------------------- networks

def build_model(arch: str, seed: int = 0) -> nn.Module:
    """A converted-ready ANN with BN statistics and thresholds drawn at random (as in
    tests/test_convert.py), so that the SNN spikes at realistic rates."""
    import harness
    from harness.neurons import NQ

    torch.manual_seed(seed)
    model = harness.create_model(arch, num_classes=10, in_chans=IN_SHAPE[0])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if isinstance(m, NQ):
                m.lam.fill_(float(torch.empty(()).uniform_(0.3, 2.0, generator=g)))
    return model.eval()


def _replace_acts(model: nn.Module, make) -> nn.Module:
    from harness.convert import _set_module, activation_layers

    net = copy.deepcopy(model).eval()
    for name, act in activation_layers(net):
        _set_module(net, name, make(float(act.lam.detach())))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class _SJ(nn.Module):
    """spikingjelly HalfThresholdIFNode (multi-step mode) on a time-folded [T*B] tensor,
    emitting theta * spike (the same adapter as tests/test_convert.py)."""

    def __init__(self, theta: float):
        super().__init__()
        from spikingjelly.activation_based import neuron

        self.node = neuron.HalfThresholdIFNode(v_threshold=float(theta), step_mode="m")
        self.theta, self.T = float(theta), 1

    def forward(self, x):
        s = self.node(x.reshape(self.T, -1, *x.shape[1:]))
        return (s * self.theta).reshape(x.shape)


class SJNet:
    """The same network in spikingjelly 2.0 multi-step mode: the whole T*B batch
    layer by layer, one reset_net per simulation."""

    def __init__(self, model: nn.Module):
        self.net = _replace_acts(model, _SJ)
        self.nodes = [m for m in self.net.modules() if isinstance(m, _SJ)]

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T: int) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.net)
        for n in self.nodes:
            n.T = T
        B = x.shape[0]
        y = self.net(x.unsqueeze(0).expand(T, *x.shape).reshape(T * B, *x.shape[1:])).reshape(T, B, -1)
        return y.cumsum(0) / torch.arange(1, T + 1, dtype=y.dtype).view(T, 1, 1)


class _NaiveIF(nn.Module):
    """A plain eager IF neuron (reset by subtraction, v(0) = theta/2), unfused ops."""

    def __init__(self, theta: float):
        super().__init__()
        self.theta = float(theta)
        self.v = None

    def forward(self, x):
        if self.v is None:
            self.v = torch.full_like(x, 0.5 * self.theta)
        self.v = self.v + x
        spike = (self.v >= self.theta).to(x.dtype)
        self.v = self.v - spike * self.theta
        return spike * self.theta


class NaiveNet:
    """Plain step-by-step loop: a Python loop over T calling the network at batch B."""

    def __init__(self, model: nn.Module):
        self.net = _replace_acts(model, _NaiveIF)
        self.nodes = [m for m in self.net.modules() if isinstance(m, _NaiveIF)]

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T: int) -> torch.Tensor:
        for n in self.nodes:
            n.v = None
        acc, outs = None, []
        for t in range(T):
            y = self.net(x)
            acc = y if acc is None else acc + y
            outs.append(acc / (t + 1))
        return torch.stack(outs)


# ----------------------------------------------------------------------------- parts

def _contenders(model, x, T):
    from harness import to_snn

    snn, sj, naive = to_snn(model), SJNet(model), NaiveNet(model)

    @torch.no_grad()
    def ann():
        return model(x)

    fns = {
        "ANN inference (1 step)": ann,
        "ours, layout=step": lambda: snn.simulate(x, T, layout="step"),
        "ours, layout=multistep": lambda: snn.simulate(x, T, layout="multistep"),
        "spikingjelly 2.0 multi-step": lambda: sj.simulate(x, T),
        "plain step-by-step loop": lambda: naive.simulate(x, T),
    }
    ref = snn.simulate(x, T, layout="step")
    agree = {k: float((f() - ref).abs().max()) for k, f in fns.items() if k != "ANN inference (1 step)"}
    return fns, agree


def part_speed(cfg, reps) -> tuple[str, dict]:
    B = cfg["batch"]
    rows, summary, data = [], [], {}
    for arch in cfg["archs"]:
        model = build_model(arch)
        x = torch.randn(B, *IN_SHAPE, generator=torch.Generator().manual_seed(1))
        for T in cfg["Ts"]:
            fns, agree = _contenders(model, x, T)
            med = interleaved(fns, reps)
            ann = med["ANN inference (1 step)"]
            for name, s in med.items():
                steps = 1 if name.startswith("ANN") else T
                per_step = s / steps
                rows.append([arch, T, name, s * 1e3, per_step * 1e3, B * steps / s, ratio(per_step, ann),
                             "—" if name.startswith("ANN") else f"{agree[name]:.1e}"])
            st, ms = med["ours, layout=step"], med["ours, layout=multistep"]
            sj, nv = med["spikingjelly 2.0 multi-step"], med["plain step-by-step loop"]
            best = min(st, ms)
            summary.append([arch, T, ratio(st / T, ann), ratio(ms / T, ann),
                            f"{target(best / T <= TARGET_STEP * ann)} (best {best / T / ann:.2f}×)",
                            ratio(sj, st), ratio(sj, ms), ratio(nv, st), ratio(nv, ms)])
            data[(arch, T)] = med
    body = (
        f"Batch {B}, input {IN_SHAPE}, random weights with random BN statistics and thresholds "
        "(dense compute does not depend on them). Medians of "
        f"{reps} interleaved repetitions after one warm-up. 'max abs diff' is the largest "
        "difference of the [T, B, classes] running-mean output from ours (step layout).\n\n"
        + table(["network", "T", "method", "ms / simulation", "ms / step", "images·steps/s",
                 "per-step / ANN", "max abs diff"], rows)
        + "\n\nRatios (per-step cost / one ANN inference; throughput of ours / peer):\n\n"
        + table(["network", "T", "step / ANN", "multistep / ANN", f"target ≤ {TARGET_STEP}×",
                 "ours step / spikingjelly", "ours multistep / spikingjelly",
                 "ours step / plain loop", "ours multistep / plain loop"], summary))
    return body, data


def part_all_T(cfg, reps) -> str:
    from harness import to_snn

    B, Tmax = cfg["batch"], cfg["allT_max"]
    Ts = [2 ** i for i in range(int(math.log2(Tmax)) + 1)]
    model = build_model(cfg["aux_arch"])
    snn = to_snn(model)
    x = torch.randn(B, *IN_SHAPE, generator=torch.Generator().manual_seed(2))

    def one():
        return snn.simulate(x, Tmax)

    def separate():
        return [snn.simulate(x, T)[-1] for T in Ts]

    full = one()
    diff = max(float((full[T - 1] - r).abs().max()) for T, r in zip(Ts, separate()))
    med = interleaved({"one": one, "separate": separate}, reps)
    r = med["separate"] / med["one"]
    return (f"{cfg['aux_arch']}, batch {B}, default layout (step on CPU). Readout at every T in {Ts}: "
            f"rows of one T={Tmax} simulation vs one simulation per T (the peers' protocol, "
            f"{sum(Ts)} simulated steps instead of {Tmax}; ideal ratio {sum(Ts) / Tmax:.2f}×). "
            f"Largest difference between the two readouts: {diff:.1e}.\n\n"
            + table(["protocol", "median ms", "speed-up", f"target ≥ {TARGET_ALLT}×"],
                    [[f"one simulation, T={Tmax}", med["one"] * 1e3, "1.00×", ""],
                     [f"separate simulations, T in {Ts}", med["separate"] * 1e3, "",
                      ""],
                     ["ratio separate / one", "", f"{r:.2f}×", target(r >= TARGET_ALLT)]]))


# -- (f) peak memory, each case in a fresh subprocess

def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _hwm_kb() -> int:
    """VmHWM: the RSS high-water mark, which clear_refs resets (ru_maxrss is never reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark VmHWM (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memprobe(spec: dict) -> dict:
    from harness import to_snn

    set_threads(spec["threads"])
    model = build_model(spec["arch"])
    snn = to_snn(model)
    x = torch.randn(spec["B"], *IN_SHAPE)
    # compile the fused kernels and touch every code path outside the measurement
    for layout in ("step", "multistep"):
        snn.simulate(x[:2], 2, layout=layout)
    gc.collect()
    reset = _reset_peak()
    before = _rss_kb()
    snn.simulate(x, spec["T"], chunk=spec["chunk"], layout=spec["layout"])
    peak = _hwm_kb()
    return dict(before_kb=before, peak_kb=peak, delta_mb=max(peak - before, 0) / 1024, reset=reset)


def _run_probe(spec: dict) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memprobe", json.dumps(spec)],
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, **PROBE_ENV})
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"memory probe failed ({out.returncode}): {out.stderr.strip()[-500:]}")


def part_memory(cfg, threads) -> str:
    B, T, c, t8 = cfg["batch"], cfg["mem_T"], cfg["mem_chunk"], cfg["mem_small_T"]
    cases = [(f"T={t8}, multistep (one chunk of {t8})", dict(T=t8, chunk=None, layout="multistep")),
             (f"T={T}, multistep, chunk={c}", dict(T=T, chunk=c, layout="multistep")),
             (f"T={T}, multistep, chunk=None", dict(T=T, chunk=None, layout="multistep")),
             (f"T={T}, layout=step", dict(T=T, chunk=None, layout="step"))]
    def probe(case):
        try:
            return _run_probe(dict(arch=cfg["aux_arch"], B=B, threads=threads, **case))
        except Exception as e:  # report, never fail the whole section
            return dict(error=str(e).splitlines()[0] if str(e) else type(e).__name__)

    # quick mode runs the probes concurrently (only wall time is affected: each process
    # measures its own peak); full mode runs them one after another
    with ThreadPoolExecutor(cfg["probe_workers"]) as pool:
        res = dict(zip([n for n, _ in cases], pool.map(probe, [c for _, c in cases])))
    base = res[cases[0][0]].get("delta_mb")
    rows = []
    for name, _ in cases:
        r = res[name]
        if "error" in r:
            rows.append([name, "failed: " + r["error"], "", ""])
            continue
        rows.append([name, r["delta_mb"], r["before_kb"] / 1024, ratio(r["delta_mb"], base) if base else "n/a"])
    chunked = res[cases[1][0]].get("delta_mb")
    verdict = (target(chunked <= TARGET_MEM * base) + f" ({chunked / base:.2f}×)"
               if base and chunked is not None else "n/a")
    method = ("peak reset via /proc/self/clear_refs before simulating"
              if all(r.get("reset") for r in res.values()) else
              "peak NOT reset (clear_refs unavailable): an earlier peak may hide part of the simulation's")
    return (f"{cfg['aux_arch']}, batch {B}. Each row is a fresh Python process: build the SNN, "
            "warm up the kernels on 2 images, then peak = VmHWM after `simulate` minus the RSS "
            f"just before it ({method}; `MALLOC_MMAP_THRESHOLD_=131072`, so freed tensors "
            "leave the RSS).\n\n"
            + table(["case", "peak extra RSS (MB)", "RSS before (MB)", f"vs T={t8}"], rows)
            + f"\n\nChunked T={T} / T={t8}: target ≤ {TARGET_MEM}× — {verdict}.")


def part_scaling(cfg, reps) -> str:
    from harness import to_snn

    B = cfg["batch"]
    model = build_model(cfg["aux_arch"])
    snn = to_snn(model)
    x = torch.randn(B, *IN_SHAPE, generator=torch.Generator().manual_seed(3))
    fns = {T: (lambda T=T: snn.simulate(x, T, layout="step")) for T in cfg["scale_Ts"]}

    @torch.no_grad()
    def ann():
        return model(x)

    med = interleaved({**fns, "ann": ann}, reps)
    Ts = cfg["scale_Ts"]
    ys = [med[T] * 1e3 for T in Ts]
    n, mx, my = len(Ts), sum(Ts) / len(Ts), sum(ys) / len(ys)
    sxx = sum((t - mx) ** 2 for t in Ts)
    slope = sum((t - mx) * (y - my) for t, y in zip(Ts, ys)) / sxx
    icpt = my - slope * mx
    ss_res = sum((y - (icpt + slope * t)) ** 2 for t, y in zip(Ts, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    ann_ms = med["ann"] * 1e3
    rows = [[T, y, y / T, icpt + slope * T] for T, y in zip(Ts, ys)]
    return (f"{cfg['aux_arch']}, batch {B}, layout=step; least squares time = intercept + slope·T.\n\n"
            + table(["T", "median ms", "ms / step", "fit ms"], rows)
            + "\n\n" + table(["slope (ms/step)", "intercept (ms)", "R²", "ANN inference (ms)", "slope / ANN"],
                             [[slope, icpt, f"{r2:.4f}", ann_ms, ratio(slope, ann_ms)]]))


def part_roofline(cfg, reps) -> str:
    from harness import to_snn
    from harness.train import count_macs

    B, T, n = cfg["batch"], cfg["roof_T"], cfg["matmul_n"]
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    rows, mm_all = [], []
    for arch in cfg["archs"]:
        model = build_model(arch)
        macs = count_macs(model, IN_SHAPE)
        snn = to_snn(model)
        x = torch.randn(B, *IN_SHAPE)

        @torch.no_grad()
        def ann():
            return model(x)

        med = interleaved({"mm": lambda: torch.mm(a, b), "ann": ann,
                           "step": lambda: snn.simulate(x, T, layout="step"),
                           "multistep": lambda: snn.simulate(x, T, layout="multistep")}, reps)
        mm = 2 * n ** 3 / med["mm"] / 1e9
        mm_all.append(mm)
        flop = 2 * macs * B
        for name, s in [("ANN inference", med["ann"]), (f"SNN step (T={T}, step)", med["step"] / T),
                        (f"SNN step (T={T}, multistep)", med["multistep"] / T)]:
            g = flop / s / 1e9
            rows.append([arch, f"{macs / 1e6:.1f}", name, s * 1e3, g, f"{100 * g / mm:.1f}%", mm])
    return (f"Batch {B}. Matmul peak: `torch.mm` of two {n}×{n} fp32 matrices (2n³ FLOP), measured "
            "interleaved with the networks. Achieved = 2·MACs·B / time (MACs of conv and linear layers "
            "from `harness.train.count_macs`; the IF/activation work is not counted).\n\n"
            + table(["network", "MMACs / image", "what", "ms", "GFLOP/s", "% of matmul", "matmul GFLOP/s"],
                    rows))


# ----------------------------------------------------------------------------- entry points

def run(quick: bool, threads: int, reps: int = DEFAULT_REPS) -> str:
    import spikingjelly  # noqa: F401  (fail early, clearly, if the peer is missing)

    set_threads(threads)
    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    speed, _ = part_speed(cfg, reps)
    parts = [
        ("(a–d) Simulation speed vs one ANN inference and peers", speed),
        ("(e) All-T readout from one simulation vs separate simulations", part_all_T(cfg, reps)),
        ("(f) Peak memory", part_memory(cfg, threads)),
        ("(g) Scaling with T", part_scaling(cfg, reps)),
        ("(h) Roofline position", part_roofline(cfg, reps)),
    ]
    body = "\n\n".join(f"### {t}\n\n{b}" for t, b in parts)
    body += (f"\n\nTargets (stated, not enforced): per-step ≤ {TARGET_STEP}× ANN inference; all-T readout "
             f"≥ {TARGET_ALLT}× faster than separate runs; chunked peak at T={cfg['mem_T']} ≤ {TARGET_MEM}× "
             f"peak at T={cfg['mem_small_T']}. Section wall time {time.perf_counter() - t0:.0f} s.")
    extra = "" if reps == DEFAULT_REPS else f"--reps {reps}"
    return section("Simulation", command(SCRIPT, quick, threads, extra), body)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed repetitions (median)")
    p.add_argument("--memprobe", help=argparse.SUPPRESS)  # internal: one memory case, JSON in/out
    args = p.parse_args()
    if args.memprobe:
        print(json.dumps(memprobe(json.loads(args.memprobe))))
        return
    print(run(args.quick, args.threads, args.reps))


if __name__ == "__main__":
    main()
