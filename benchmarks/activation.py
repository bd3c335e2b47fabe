"""Cost of the NQ activation in training, and the statistics of its noise.

    python benchmarks/activation.py [--quick] [--threads N]

One training step (forward + backward + SGD step) of ResNet-20 with ReLU and four
activation variants, each timed with both gradient formulations
(`harness.neurons.GRAD_FORMULATIONS`: "nq", the default, and "qcfs_iclr"), all side
by side in the same run: NQ (delta = 0.1 in every layer, fused kernels), QCFS
(delta = 0, fused), NQ through the same autograd Function with eager ops
(HARNESS_FUSED=0), and the authors' op-by-op formulation with autograd through every
op (`harness.neurons.qcfs_reference`, plus the same Gaussian noise).
"""
from __future__ import annotations

import copy
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._common import DEFAULT_REPS, command, interleaved, main, ratio, section, set_threads, table, target

SCRIPT = "activation.py"
DELTA = 0.1
TARGET_NQ = 1.25  # NQ training step <= 1.25x the ReLU step
FULL = dict(batch=128, steps=3, noise_numel=1 << 24)
QUICK = dict(batch=16, steps=1, noise_numel=1 << 20)


class ReferenceNQ(nn.Module):
    """Eager, unfused NQ: the authors' formulation `act.grad` op by op, plus delta * N(0, 1)."""

    def __init__(self, act):
        super().__init__()
        from harness.neurons import qcfs_reference

        self.fn = qcfs_reference
        self.L = act.L
        self.grad = act.grad
        self.lam = nn.Parameter(act.lam.detach().clone())
        self.register_buffer("delta", act.delta.detach().clone())

    def forward(self, z):
        y = self.fn(z, self.lam, self.L, grad=self.grad)
        if self.training and float(self.delta) > 0:
            y = y + self.delta * torch.randn_like(y)
        return y


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _variant(base: nn.Module, make) -> nn.Module:
    from harness.convert import _set_module, activation_layers

    m = copy.deepcopy(base)
    for name, act in activation_layers(m):
        new = make(act)
        if new is not None:
            _set_module(m, name, new)
    return m.train()


def _stepper(model: nn.Module, x, y, steps: int, env: tuple[str, str] | None = None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    if env is None:
        return step

    def with_env():
        with _env(*env):
            return step()
    return with_env


def _with_grad(grad: str):
    """A `_variant` maker that keeps the activation and sets its gradient formulation."""
    def make(act):
        act.grad = grad
        return None
    return make


def part_step(cfg, reps) -> str:
    import harness
    from harness.calibration import set_deltas
    from harness.neurons import GRAD_FORMULATIONS

    B, steps = cfg["batch"], cfg["steps"]
    torch.manual_seed(0)
    base = harness.create_model("resnet20", num_classes=10, L=4, lam_init=8.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (B,), generator=g)

    nq_base = copy.deepcopy(base)
    set_deltas(nq_base, DELTA)
    qcfs_base = copy.deepcopy(base)
    set_deltas(qcfs_base, 0.0)
    fused_env, eager_env = None, ("HARNESS_FUSED", "0")
    # (variant, model with delta set, module maker after the formulation is set, env)
    variants = [
        (f"NQ (δ={DELTA}), fused", nq_base, None, fused_env),
        ("QCFS (δ=0), fused", qcfs_base, None, fused_env),
        (f"NQ (δ={DELTA}), eager ops (HARNESS_FUSED=0)", nq_base, None, eager_env),
        (f"NQ (δ={DELTA}), op-by-op reference (qcfs_reference + noise)", nq_base, ReferenceNQ, fused_env),
    ]
    names = {"ReLU": _stepper(_variant(base, lambda a: nn.ReLU()), x, y, steps)}
    rowinfo = {"ReLU": ("ReLU", "—")}
    for variant, vbase, make, env in variants:
        for grad in GRAD_FORMULATIONS:
            m = _variant(vbase, _with_grad(grad))
            if make is not None:
                m = _variant(m, make)
            key = f"{variant}, {grad} grad"
            names[key] = _stepper(m, x, y, steps, env)
            rowinfo[key] = (variant, grad)
    med = interleaved(names, reps)
    relu_s = med["ReLU"]
    rows = [[*rowinfo[n], s / steps * 1e3, B * steps / s, ratio(s, relu_s)] for n, s in med.items()]
    default, other = GRAD_FORMULATIONS
    pair_rows = [[v, ratio(med[f"{v}, {default} grad"], med[f"{v}, {other} grad"])] for v, *_ in variants]
    nq_r = med[f"NQ (δ={DELTA}), fused, {default} grad"] / relu_s
    nq_o = med[f"NQ (δ={DELTA}), fused, {other} grad"] / relu_s
    return (f"ResNet-20, batch {B}, 3×32×32 random input, SGD (momentum 0.9, wd 5e-4), train mode; "
            f"median of {reps} interleaved repetitions of {steps} step(s) after one warm-up. "
            f"Every variant is timed with both gradient formulations (`model.grad`: {default} = the "
            f"default, {other}); they differ in the backward only.\n\n"
            + table(["activation", "grad", "ms / step", "images/s", "vs ReLU"], rows)
            + f"\n\nStep time with the {default} gradient relative to {other}, same variant:\n\n"
            + table(["activation", f"{default} / {other}"], pair_rows)
            + f"\n\nNQ / ReLU = {nq_r:.2f}× ({default} grad), {nq_o:.2f}× ({other} grad) — target "
              f"≤ {TARGET_NQ}×: {target(nq_r <= TARGET_NQ)} ({default}), {target(nq_o <= TARGET_NQ)} ({other}).")


@torch.no_grad()
def part_noise(cfg) -> str:
    from harness.neurons import NQ, qcfs

    n = cfg["noise_numel"]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, generator=g) * 2.0
    rows = []
    for delta in (0.05, 0.1, 0.5):
        act = NQ(L=4, lam_init=1.5, delta=delta).train()
        noise = (act(z) - qcfs(z, act.lam, act.L)).double()
        m = noise.mean().item()
        s = noise.std().item()
        k = ((noise - m) ** 4).mean().item() / (s ** 4) - 3.0
        rows.append([delta, f"{m:+.2e}", f"{m / (delta / n ** 0.5):+.2f}", s, f"{s / delta:.4f}", f"{k:+.3f}"])
    return (f"NQ(L=4, λ=1.5) in train mode on {n:,} elements (z ~ N(0, 4)); noise = output − QCFS(z). "
            "For N(0, δ²): mean 0 (z-score within ±3), std/δ = 1, excess kurtosis 0 "
            f"(standard error ≈ {(24 / n) ** 0.5:.3f}).\n\n"
            + table(["δ", "mean", "mean / (δ/√n)", "std", "std / δ", "excess kurtosis"], rows))


def run(quick: bool, threads: int, reps: int = DEFAULT_REPS) -> str:
    set_threads(threads)
    cfg = QUICK if quick else FULL
    t0 = time.perf_counter()
    body = (f"### Training step\n\n{part_step(cfg, reps)}\n\n### Noise statistics\n\n{part_noise(cfg)}"
            f"\n\nSection wall time {time.perf_counter() - t0:.0f} s.")
    return section("Activation (NQ / QCFS) training cost", command(SCRIPT, quick, threads), body)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
