"""SNN simulation speed and memory: `SpikingNet.simulate` against one ANN inference
(the roofline of one step), spikingjelly 2.0 multi-step mode, and a plain
step-by-step Python loop with an eager IF module.

    python benchmarks/simulate.py [--quick] [--threads N] [--reps R] [--batch B]
                                  [--device cpu|cuda] [--amp] [--channels-last]
                                  [--parts speed,allT,memory,scaling,roofline]

The simulation step is compared with one ANN inference measured in the same repetition,
right before and after it (`_common.paired`): the reported figure is the median of the
per-repetition ratios, with their range. Other comparisons are ratios of medians of
interleaved repetitions after a warm-up. Peak memory is measured in fresh subprocesses
on CPU (RSS high-water mark) and with torch.cuda's peak-allocation counters on CUDA. The
roofline's reference is a measured peak: the fastest of several GEMM shapes and
convolutions (mkldnn on CPU, cuDNN on CUDA) timed alongside the networks; on CPU the
theoretical FMA peak from the processor's flags and clock is shown beside it. On CUDA
every timed call ends with torch.cuda.synchronize(). `--amp` runs every timed network
call (and the peak candidates) under fp16 autocast; `--channels-last` puts weights and
inputs in channels_last. Nothing here asserts on a timing.
"""
from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from benchmarks._common import (DEFAULT_REPS, fmt, fmt_spread, interleaved, interleaved_times, paired,
                                parser, ratio, section, set_threads, spread, table, target)

SCRIPT = "simulate.py"
IN_SHAPE = (3, 32, 32)
PARTS = ("speed", "allT", "memory", "scaling", "roofline")
# peak candidates: GEMMs (M, K, N) and 3x3 convolutions (channels, spatial size) at the batch
FULL = dict(archs=["vgg16", "resnet20"], batch=64, Ts=[4, 8, 32], roof_T=8, allT_max=64,
            scale_Ts=[1, 2, 4, 8, 16, 32, 64], mem_T=64, mem_chunk=8, mem_small_T=8, aux_arch="resnet20",
            gemms=[(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (16384, 1152, 128),
                   (4096, 2304, 256), (1024, 4608, 512)],
            convs=[(64, 32), (128, 16), (256, 8), (512, 4)], probe_workers=1)
QUICK = dict(archs=["resnet20"], batch=8, Ts=[4], roof_T=4, allT_max=8,
             scale_Ts=[1, 2, 4, 8], mem_T=64, mem_chunk=8, mem_small_T=8, aux_arch="resnet20",
             gemms=[(512, 512, 512), (1024, 1024, 1024), (8192, 576, 64)],
             convs=[(64, 32), (128, 16)], probe_workers=4)
CUDA_GEMMS = [(4096, 4096, 4096), (8192, 8192, 8192)]  # added on CUDA, where 2048 is far from peak
# glibc: serve every allocation >= 128 KiB by mmap (fixed threshold), so freed tensors
# leave the RSS at once and the peak reflects live memory, not allocator caching
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
TARGET_STEP = 1.1      # per-step cost <= 1.1x one ANN inference
TARGET_ALLT = 1.9      # all-T readout >= 1.9x faster than separate runs
TARGET_MEM = 1.25      # chunked peak at T=64 <= 1.25x peak at T=8
ANN = "ANN inference (1 step)"


@dataclass(frozen=True)
class Setup:
    """Where and how the networks run: device, fp16 autocast (CUDA only), memory format."""
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def sync(self):
        return torch.cuda.synchronize if self.cuda else None

    @property
    def fmt(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def model(self, arch: str, seed: int = 0) -> nn.Module:
        return build_model(arch, seed).to(self.device, memory_format=self.fmt)

    def input(self, B: int, seed: int) -> torch.Tensor:
        x = torch.randn(B, *IN_SHAPE, generator=torch.Generator().manual_seed(seed))
        return x.to(self.device).contiguous(memory_format=self.fmt)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def call(self, fn):
        """fn under no_grad and (with --amp) autocast."""
        def wrapped():
            with torch.no_grad(), self.autocast():
                return fn()
        return wrapped

    def describe(self) -> str:
        if self.cuda:
            where = f"CUDA ({torch.cuda.get_device_name()})"
            prec = ("fp16 autocast (AMP)" if self.amp else
                    f"fp32 (TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, "
                    f"cuDNN {torch.backends.cudnn.allow_tf32})")
        else:
            where, prec = "CPU", "fp32"
        return f"{where}, {prec}, {'channels_last' if self.channels_last else 'contiguous (NCHW)'}"

    def args(self) -> list[str]:
        out = [] if not self.cuda else ["--device", "cuda"]
        return out + (["--amp"] if self.amp else []) + (["--channels-last"] if self.channels_last else [])


CPU = Setup()


def _have_spikingjelly() -> bool:
    try:
        import spikingjelly.activation_based  # noqa: F401
        return True
    except ImportError:
        return False


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

def _contenders(model, x, T, setup: Setup, peers: bool):
    from harness import to_snn

    snn = to_snn(model)
    fns = {
        "ours, layout=step": lambda: snn.simulate(x, T, layout="step"),
        "ours, layout=multistep": lambda: snn.simulate(x, T, layout="multistep"),
    }
    if peers:
        sj = SJNet(model)
        fns["spikingjelly 2.0 multi-step"] = lambda: sj.simulate(x, T)
    naive = NaiveNet(model)
    fns["plain step-by-step loop"] = lambda: naive.simulate(x, T)
    fns = {k: setup.call(f) for k, f in fns.items()}
    ref = fns["ours, layout=step"]()
    agree = {k: float((f() - ref).abs().max()) for k, f in fns.items()}
    return setup.call(lambda: model(x)), fns, agree


def _per_rep(a: list[float], b: list[float], scale: float = 1.0) -> dict:
    return spread([scale * x / y for x, y in zip(a, b)])


def part_speed(cfg, reps, setup: Setup = CPU) -> tuple[str, dict]:
    B = cfg["batch"]
    peers = _have_spikingjelly()
    rows, summary, data, heads = [], [], {}, []
    for arch in cfg["archs"]:
        model = setup.model(arch)
        x = setup.input(B, 1)
        for T in cfg["Ts"]:
            ann, fns, agree = _contenders(model, x, T, setup, peers)
            times, base, every = paired(ann, fns, reps, sync=setup.sync)
            med = {n: spread(v)["median"] for n, v in times.items()}
            ann_s = spread(every)
            rows.append([arch, T, ANN, ann_s["median"] * 1e3, ann_s["median"] * 1e3, B / ann_s["median"],
                         f"1.00× (ANN {fmt(ann_s['min'] * 1e3)}–{fmt(ann_s['max'] * 1e3)} ms, "
                         f"{len(every)} calls)", "—"])
            step = {n: _per_rep(times[n], base[n], 1 / T) for n in fns}
            for name, s in med.items():
                rows.append([arch, T, name, s * 1e3, s / T * 1e3, B * T / s, fmt_spread(step[name]),
                             f"{agree[name]:.1e}"])
            st, ms = "ours, layout=step", "ours, layout=multistep"
            best = min(step[st]["median"], step[ms]["median"])
            peer = [(f"ours {lay} / {pname}", _per_rep(times[pk], times[k])["median"])
                    for pk, pname in (("spikingjelly 2.0 multi-step", "spikingjelly"),
                                      ("plain step-by-step loop", "plain loop")) if pk in times
                    for k, lay in ((st, "step"), (ms, "multistep"))]
            heads = [p for p, _ in peer]
            summary.append([arch, T, fmt_spread(step[st]), fmt_spread(step[ms]),
                            f"{target(best <= TARGET_STEP)} (best {best:.2f}×)",
                            *[f"{v:.2f}×" for _, v in peer]])
            data[(arch, T)] = dict(median=med, step_ratio=step, ann=ann_s)
    peer_note = ("" if peers else " spikingjelly is not installed here: its rows are left out.")
    lead = ""
    focus = [k for k in data if k[0] == "resnet20"]
    if focus:
        lead = ("**ResNet-20 simulation step / one ANN inference** (median of the paired per-repetition "
                "ratios, range over repetitions): "
                + "; ".join(f"T={T}: step {fmt_spread(data[(a, T)]['step_ratio']['ours, layout=step'])}, "
                            f"multistep {fmt_spread(data[(a, T)]['step_ratio']['ours, layout=multistep'])}"
                            for a, T in focus) + ".\n\n")
    body = (
        lead +
        f"{setup.describe()}. Batch {B}, input {IN_SHAPE}, random weights with random BN statistics and "
        "thresholds (dense compute does not depend on them). "
        f"{reps} repetitions after one warm-up; in each repetition every simulation runs between two ANN "
        "inferences (order rotated between repetitions), and its per-step cost is divided by the mean of "
        "those two: 'per-step / ANN' is the median of these paired ratios, with their range. Times are "
        "medians. 'max abs diff' is the largest difference of the [T, B, classes] running-mean output from "
        f"ours (step layout).{peer_note}\n\n"
        + table(["network", "T", "method", "ms / simulation", "ms / step", "images·steps/s",
                 "per-step / ANN (paired)", "max abs diff"], rows)
        + "\n\nRatios (per-step cost / one ANN inference, paired; throughput of ours / peer, median of "
          "per-repetition ratios):\n\n"
        + table(["network", "T", "step / ANN", "multistep / ANN", f"target ≤ {TARGET_STEP}× (median)",
                 *[f"{h}" for h in heads]], summary))
    return body, data


def part_all_T(cfg, reps, setup: Setup = CPU) -> str:
    from harness import to_snn

    B, Tmax = cfg["batch"], cfg["allT_max"]
    Ts = [2 ** i for i in range(int(math.log2(Tmax)) + 1)]
    model = setup.model(cfg["aux_arch"])
    snn = to_snn(model)
    x = setup.input(B, 2)
    one = setup.call(lambda: snn.simulate(x, Tmax))
    separate = setup.call(lambda: [snn.simulate(x, T)[-1] for T in Ts])
    full = one()
    diff = max(float((full[T - 1] - r).abs().max()) for T, r in zip(Ts, separate()))
    times = interleaved_times({"one": one, "separate": separate}, reps, sync=setup.sync)
    med = {k: spread(v)["median"] for k, v in times.items()}
    r = _per_rep(times["separate"], times["one"])
    return (f"{cfg['aux_arch']}, batch {B}, {setup.describe()}, default layout "
            f"({_layout_note(setup)}). Readout at every T in {Ts}: "
            f"rows of one T={Tmax} simulation vs one simulation per T (the peers' protocol, "
            f"{sum(Ts)} simulated steps instead of {Tmax}; ideal ratio {sum(Ts) / Tmax:.2f}×). "
            f"Largest difference between the two readouts: {diff:.1e}.\n\n"
            + table(["protocol", "median ms", "speed-up", f"target ≥ {TARGET_ALLT}×"],
                    [[f"one simulation, T={Tmax}", med["one"] * 1e3, "1.00×", ""],
                     [f"separate simulations, T in {Ts}", med["separate"] * 1e3, "", ""],
                     ["ratio separate / one (per repetition)", "", fmt_spread(r),
                      target(r["median"] >= TARGET_ALLT)]]))


def _layout_note(setup: Setup) -> str:
    from harness.convert import SpikingNet

    return f"{SpikingNet.default_layout(setup.device)} on {'CUDA' if setup.cuda else 'CPU'}"


# -- (f) peak memory, each case in a fresh subprocess (CPU) or by torch.cuda's counters (CUDA)

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


def _cuda_probe(setup: Setup, arch: str, B: int, case: dict) -> dict:
    """Peak CUDA memory allocated during one simulation, above what was allocated before."""
    from harness import to_snn

    model = setup.model(arch)
    snn = to_snn(model)
    x = setup.input(B, 4)
    for layout in ("step", "multistep"):
        setup.call(lambda: snn.simulate(x[:2], 2, layout=layout))()
    del model
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = setup.call(lambda: snn.simulate(x, case["T"], chunk=case["chunk"], layout=case["layout"]))()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out, snn, x
    gc.collect()
    torch.cuda.empty_cache()
    return dict(before_kb=before / 1024, delta_mb=max(peak - before, 0) / 2 ** 20, reset=True)


def part_memory(cfg, threads, setup: Setup = CPU) -> str:
    B, T, c, t8 = cfg["batch"], cfg["mem_T"], cfg["mem_chunk"], cfg["mem_small_T"]
    cases = [(f"T={t8}, multistep (one chunk of {t8})", dict(T=t8, chunk=None, layout="multistep")),
             (f"T={T}, multistep, chunk={c}", dict(T=T, chunk=c, layout="multistep")),
             (f"T={T}, multistep, chunk=None", dict(T=T, chunk=None, layout="multistep")),
             (f"T={T}, layout=step", dict(T=T, chunk=None, layout="step"))]

    def probe(case):
        try:
            if setup.cuda:
                return _cuda_probe(setup, cfg["aux_arch"], B, case)
            return _run_probe(dict(arch=cfg["aux_arch"], B=B, threads=threads, **case))
        except Exception as e:  # report, never fail the whole section
            return dict(error=str(e).splitlines()[0] if str(e) else type(e).__name__)

    if setup.cuda:  # one process, one case after another
        res = {n: probe(cs) for n, cs in cases}
    else:
        # quick mode runs the probes concurrently (only wall time is affected: each process
        # measures its own peak); full mode runs them one after another
        with ThreadPoolExecutor(cfg["probe_workers"]) as pool:
            res = dict(zip([n for n, _ in cases], pool.map(probe, [cs for _, cs in cases])))
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
    if setup.cuda:
        how = (f"{setup.describe()}. Each row: build the SNN, warm up the kernels on 2 images, then "
               "peak = `torch.cuda.max_memory_allocated()` during `simulate` (counters reset just before) "
               "minus the memory allocated just before it (the SNN's weights and the input).")
        before_col = "allocated before (MB)"
    else:
        method = ("peak reset via /proc/self/clear_refs before simulating"
                  if all(r.get("reset") for r in res.values()) else
                  "peak NOT reset (clear_refs unavailable): an earlier peak may hide part of the simulation's")
        how = ("Each row is a fresh Python process: build the SNN, "
               "warm up the kernels on 2 images, then peak = VmHWM after `simulate` minus the RSS "
               f"just before it ({method}; `MALLOC_MMAP_THRESHOLD_=131072`, so freed tensors "
               "leave the RSS).")
        before_col = "RSS before (MB)"
    return (f"{cfg['aux_arch']}, batch {B}. {how}\n\n"
            + table(["case", "peak extra memory (MB)", before_col, f"vs T={t8}"], rows)
            + f"\n\nChunked T={T} / T={t8}: target ≤ {TARGET_MEM}× — {verdict}.")


def part_scaling(cfg, reps, setup: Setup = CPU) -> str:
    from harness import to_snn

    B = cfg["batch"]
    model = setup.model(cfg["aux_arch"])
    snn = to_snn(model)
    x = setup.input(B, 3)
    fns = {T: setup.call(lambda T=T: snn.simulate(x, T, layout="step")) for T in cfg["scale_Ts"]}
    med = interleaved({**fns, "ann": setup.call(lambda: model(x))}, reps, sync=setup.sync)
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
    return (f"{cfg['aux_arch']}, batch {B}, {setup.describe()}, layout=step; least squares time = "
            "intercept + slope·T (medians of interleaved repetitions).\n\n"
            + table(["T", "median ms", "ms / step", "fit ms"], rows)
            + "\n\n" + table(["slope (ms/step)", "intercept (ms)", "R²", "ANN inference (ms)", "slope / ANN"],
                             [[slope, icpt, f"{r2:.4f}", ann_ms, ratio(slope, ann_ms)]]))


# -- (h) roofline: the reference is a measured peak

def _cpu_flags() -> tuple[set[str], float | None, str]:
    """(/proc/cpuinfo flags, clock in GHz, where the clock came from)."""
    flags: set[str] = set()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip().lower()
            if key == "flags" and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif key == "cpu mhz" and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    try:  # the highest (turbo) clock, where the kernel exposes it
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return flags, khz / 1e6, "cpufreq cpuinfo_max_freq (highest clock)"
    except (OSError, ValueError):
        pass
    return flags, (mhz / 1e3 if mhz else None), ("/proc/cpuinfo 'cpu MHz', in a VM the nominal TSC "
                                                   "clock, which turbo can exceed")


FMA_PORTS = 2  # AVX-512 FMA units per core of server Xeons (1 on some Xeon Bronze/Silver): not in the flags


def theoretical_cpu_peak(threads: int) -> tuple[float | None, str]:
    """fp32 GFLOP/s = threads (one per core) x FMA ports x SIMD lanes x 2 FLOP x GHz, from the
    processor's flags and clock; (None, why) if they cannot be read."""
    flags, ghz, src = _cpu_flags()
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags or "avx" in flags:
        lanes, isa = 8, "AVX2" if "avx2" in flags else "AVX"
    elif flags:
        lanes, isa = 4, "SSE"
    else:
        return None, "the processor's flags are not readable"
    fma = "fma" in flags
    if ghz is None:
        return None, f"{isa}, but no clock is readable"
    peak = threads * FMA_PORTS * lanes * 2 * ghz
    how = (f"{threads} core(s) × {FMA_PORTS} FMA units (assumed; the flags do not say) × {lanes} fp32 lanes "
           f"({isa}) × 2 FLOP per {'FMA' if fma else 'multiply-add pair'} × {ghz:.2f} GHz ({src})")
    return peak, how


def _peak_candidates(cfg, B: int, setup: Setup) -> dict[str, tuple]:
    """name -> (callable, FLOP per call): GEMMs and 3x3 convolutions, in the networks' dtype and
    (for the convolutions) both memory formats."""
    import torch.nn.functional as F

    dev = setup.device
    out = {}
    gemms = list(cfg["gemms"]) + ([g for g in CUDA_GEMMS if g not in cfg["gemms"]] if setup.cuda else [])
    for (m, k, n) in gemms:
        a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        out[f"GEMM {m}×{k}·{k}×{n}"] = (setup.call(lambda a=a, b=b: torch.mm(a, b)), 2 * m * k * n)
    for (c, hw) in cfg["convs"]:
        for mf, label in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels_last")):
            x = torch.randn(B, c, hw, hw, device=dev).contiguous(memory_format=mf)
            w = torch.randn(c, c, 3, 3, device=dev).contiguous(memory_format=mf)
            name = f"conv3×3 {c}→{c} @{hw}×{hw}, B={B}, {label}"
            out[name] = (setup.call(lambda x=x, w=w: F.conv2d(x, w, padding=1)), 2 * B * c * c * 9 * hw * hw)
    return out


def part_roofline(cfg, reps, threads: int = 2, setup: Setup = CPU) -> str:
    from harness import to_snn
    from harness.train import count_macs

    B, T = cfg["batch"], cfg["roof_T"]
    cand = _peak_candidates(cfg, B, setup)
    lib = "cuDNN / cuBLAS" if setup.cuda else ("mkldnn (oneDNN)" if torch.backends.mkldnn.is_available()
                                               else "native (no mkldnn)")
    rows, peak_rows, over = [], [], []
    theo, theo_how = (None, "") if setup.cuda else theoretical_cpu_peak(threads)
    for arch in cfg["archs"]:
        model = setup.model(arch)
        macs = count_macs(build_model(arch), IN_SHAPE)
        snn = to_snn(model)
        x = setup.input(B, 5)
        nets = {"ANN inference": setup.call(lambda: model(x)),
                f"SNN step (T={T}, step)": setup.call(lambda: snn.simulate(x, T, layout="step")),
                f"SNN step (T={T}, multistep)": setup.call(lambda: snn.simulate(x, T, layout="multistep"))}
        med = interleaved({**{k: f for k, (f, _) in cand.items()}, **nets}, reps, sync=setup.sync)
        rates = {k: flop / med[k] / 1e9 for k, (_, flop) in cand.items()}
        best = max(rates, key=rates.get)
        peak = rates[best]
        peak_rows += [[arch, k, g, "**peak**" if k == best else f"{100 * g / peak:.1f}%"]
                      for k, g in sorted(rates.items(), key=lambda kv: -kv[1])]
        flop = 2 * macs * B
        for name, s in [(n, med[n] / (1 if n.startswith("ANN") else T)) for n in nets]:
            g = flop / s / 1e9
            if g > peak:
                over.append(f"{arch} {name}")
            row = [arch, f"{macs / 1e6:.1f}", name, s * 1e3, g, f"{100 * g / peak:.1f}%", peak]
            if theo is not None:
                row.append(f"{100 * g / theo:.1f}%")
            rows.append(row)
    heads = ["network", "MMACs / image", "what", "ms", "GFLOP/s", "% of measured peak", "measured peak GFLOP/s"]
    text = (f"{setup.describe()}, batch {B}. **Reference: a measured peak**, the fastest of {len(cand)} "
            f"candidates timed in the same interleaved repetitions as each network: GEMMs (`torch.mm`, "
            f"2·M·K·N FLOP) of several shapes, square and im2col-like, and 3×3 convolutions "
            f"(`F.conv2d`, {lib}; 2·B·C²·9·H·W FLOP) in both memory formats. Achieved = 2·MACs·B / time (MACs "
            "of conv and linear layers from `harness.train.count_macs`; the IF/activation work is not counted).")
    if theo is not None:
        heads.append("% of theoretical")
        text += (f" The theoretical fp32 FMA peak, for comparison: **{theo:.0f} GFLOP/s** = {theo_how}.")
    text += "\n\n" + table(heads, rows)
    text += ("\n\n" + ("**A network ran faster than the measured peak** (" + ", ".join(over) + "): the "
                       "reference is not a peak for it and its percentage is not meaningful."
                       if over else "No network exceeds the measured peak."))
    text += "\n\nPeak candidates (GFLOP/s; the fastest is the reference):\n\n" + table(
        ["network block", "candidate", "GFLOP/s", "vs peak"], peak_rows)
    return text


# ----------------------------------------------------------------------------- entry points

def command(quick: bool, threads: int, reps: int, setup: Setup, batch: int | None,
            parts: tuple[str, ...]) -> str:
    """The shell command (from the repository root) that reproduces this section."""
    cmd = ["python", f"benchmarks/{SCRIPT}"] + (["--quick"] if quick else []) + ["--threads", str(threads)]
    if reps != DEFAULT_REPS:
        cmd += ["--reps", str(reps)]
    if batch is not None:
        cmd += ["--batch", str(batch)]
    cmd += setup.args()
    if tuple(parts) != PARTS:
        cmd += ["--parts", ",".join(parts)]
    return " ".join(cmd)


def config(quick: bool, batch: int | None = None) -> dict:
    cfg = dict(QUICK if quick else FULL)
    if batch is not None:
        cfg["batch"] = batch
    return cfg


def iter_parts(quick: bool, threads: int, reps: int = DEFAULT_REPS, *, setup: Setup = CPU,
               batch: int | None = None, parts: tuple[str, ...] = PARTS):
    """(title, Markdown body) of each part in `parts`, computed one at a time."""
    cfg = config(quick, batch)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown} (expected some of: {', '.join(PARTS)})")
    if setup.cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch.cuda.is_available() is False")
    set_threads(threads)
    makers = {
        "speed": ("(a–d) Simulation speed vs one ANN inference and peers", lambda: part_speed(cfg, reps, setup)[0]),
        "allT": ("(e) All-T readout from one simulation vs separate simulations", lambda: part_all_T(cfg, reps, setup)),
        "memory": ("(f) Peak memory", lambda: part_memory(cfg, threads, setup)),
        "scaling": ("(g) Scaling with T", lambda: part_scaling(cfg, reps, setup)),
        "roofline": ("(h) Roofline position", lambda: part_roofline(cfg, reps, threads, setup)),
    }
    for p in PARTS:
        if p in parts:
            yield makers[p][0], makers[p][1]()


def targets_line(quick: bool) -> str:
    cfg = config(quick)
    return (f"Targets (stated, not enforced): per-step ≤ {TARGET_STEP}× ANN inference (median of paired "
            f"ratios); all-T readout ≥ {TARGET_ALLT}× faster than separate runs; chunked peak at "
            f"T={cfg['mem_T']} ≤ {TARGET_MEM}× peak at T={cfg['mem_small_T']}.")


def run(quick: bool, threads: int, reps: int = DEFAULT_REPS, *, setup: Setup = CPU, batch: int | None = None,
        parts: tuple[str, ...] = PARTS) -> str:
    t0 = time.perf_counter()
    done = list(iter_parts(quick, threads, reps, setup=setup, batch=batch, parts=parts))
    body = "\n\n".join(f"### {t}\n\n{b}" for t, b in done)
    body += f"\n\n{targets_line(quick)} Section wall time {time.perf_counter() - t0:.0f} s."
    return section("Simulation", command(quick, threads, reps, setup, batch, tuple(parts)), body)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed repetitions (median)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 64, --quick 8)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", action="store_true", help="fp16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="weights and inputs in channels_last")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    p.add_argument("--memprobe", help=argparse.SUPPRESS)  # internal: one memory case, JSON in/out
    args = p.parse_args(argv)
    if args.memprobe:
        print(json.dumps(memprobe(json.loads(args.memprobe))))
        return
    if args.amp and args.device != "cuda":
        p.error("--amp needs --device cuda")
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    setup = Setup(args.device, args.amp, args.channels_last)
    print(run(args.quick, args.threads, args.reps, setup=setup, batch=args.batch, parts=parts))


if __name__ == "__main__":
    main()
