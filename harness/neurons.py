"""Activations (QCFS, NQ) and the integrate-and-fire neuron.

QCFS (Bu et al. 2022, Eq. 6):  a = lam * clip(floor(z*L/lam + 0.5) / L, 0, 1)
NQ   (Huang et al., Eq. 13):   a = QCFS(z) + delta * N(0, 1)   (training forward only)

The activation is one autograd node with a hand-written backward: floor is
straight-through, and lam gets exactly the gradient that autograd would give for
the expression above (as in the QCFS authors' code, with clip's subgradient 1 at
both ends, as torch.clamp had in torch 1.x), i.e. per element
    d a / d z   = 1[0 <= u <= 1]
    d a / d lam = clip(u, 0, 1) - 1[0 <= u <= 1] * z / lam,    u = floor(z*L/lam + 0.5) / L
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["NQ", "QCFS", "IFNeuron", "qcfs", "qcfs_reference", "if_step"]


# ---------------------------------------------------------------------------
# Pure functions. The "kernels" below are written so that torch.compile can fuse
# each of them into one loop; eager mode runs them as-is (same math).

def _qcfs_fwd(z: torch.Tensor, lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    q = torch.floor(z * (L / lam) + 0.5).clamp_min(0).minimum(L)
    return q * (lam / L)


def _nq_fwd(z: torch.Tensor, lam: torch.Tensor, delta: torch.Tensor, L: torch.Tensor,
            g: torch.Tensor) -> torch.Tensor:
    return _qcfs_fwd(z, lam, L) + delta * g


def _qcfs_bwd(z: torch.Tensor, g: torch.Tensor, lam: torch.Tensor, L: torch.Tensor):
    t = torch.floor(z * (L / lam) + 0.5)
    inside = (t >= 0) & (t <= L)
    gz = torch.where(inside, g, torch.zeros_like(g))
    c = t.clamp_min(0).minimum(L) / L
    glam = (g * (c - torch.where(inside, z / lam, torch.zeros_like(z)))).sum()
    return gz, glam


def _if_step(v: torch.Tensor, x: torch.Tensor, theta: torch.Tensor):
    """One IF step: charge, fire if u >= theta (emit theta), reset by subtraction."""
    u = v + x
    out = torch.where(u >= theta, theta, torch.zeros_like(u))
    return u - out, out


_KERNELS = {"qcfs_fwd": _qcfs_fwd, "nq_fwd": _nq_fwd, "qcfs_bwd": _qcfs_bwd, "if_step": _if_step}
_COMPILED: dict = {}


def fused_enabled() -> bool:
    """Fused (torch.compile) kernels are on by default; HARNESS_FUSED=0 turns them off."""
    return os.environ.get("HARNESS_FUSED", "1") != "0"


def _kernel(name: str):
    if not fused_enabled():
        return _KERNELS[name]
    fn = _COMPILED.get(name)
    if fn is None:
        try:
            import logging
            import torch._dynamo
            # inductor's CPU backend warns that no CUDA runtime exists; irrelevant here
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            # one graph per dtype/device; L is passed as a tensor so it never specialises
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            fn = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
        except Exception:  # no compiler backend: eager math is identical
            fn = _KERNELS[name]
        _COMPILED[name] = fn
    return fn


def _call(name: str, *args):
    try:
        return _kernel(name)(*args)
    except Exception as e:  # a backend failure at first call degrades to eager, loudly once
        if _COMPILED.get(name) is _KERNELS[name]:
            raise
        import warnings
        warnings.warn(f"harness: fused kernel {name} unavailable ({type(e).__name__}); using eager ops")
        _COMPILED[name] = _KERNELS[name]
        return _KERNELS[name](*args)


def _forward(z, lam, delta, L, noisy):
    z, lam, L = z.detach(), lam.detach(), torch.tensor(float(L), dtype=z.dtype, device=z.device)
    if noisy:
        # torch's generator (mt19937) draws the N(0,1) sample; the add is fused. A
        # counter-based hash RNG inside the fused kernel measured slower on CPU.
        return _call("nq_fwd", z, lam, delta, L, torch.randn_like(z))
    return _call("qcfs_fwd", z, lam, L)


class _QCFSFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, lam, delta, L, noisy):
        ctx.save_for_backward(z, lam)
        ctx.L = L
        return _forward(z, lam, delta, L, noisy)

    @staticmethod
    def backward(ctx, g):
        z, lam = ctx.saved_tensors
        L = torch.tensor(float(ctx.L), dtype=z.dtype, device=z.device)
        gz, glam = _call("qcfs_bwd", z.detach(), g.contiguous(), lam.detach(), L)
        return gz, glam.reshape(lam.shape), None, None, None


def qcfs(z: torch.Tensor, lam: torch.Tensor, L: int, delta: torch.Tensor | None = None,
         noisy: bool = False) -> torch.Tensor:
    """Fused QCFS / NQ activation (see module docstring)."""
    if delta is None:
        delta = torch.zeros((), dtype=z.dtype, device=z.device)
        noisy = False
    if not torch.is_grad_enabled() or not (z.requires_grad or lam.requires_grad):
        return _forward(z, lam, delta, L, noisy)
    return _QCFSFn.apply(z, lam, delta, L, noisy)


def qcfs_reference(z: torch.Tensor, lam: torch.Tensor, L: int) -> torch.Tensor:
    """The QCFS authors' formulation, op by op, with autograd through every op.
    Used by the tests as the independent reference for values and gradients."""
    y = z / lam
    y = y * L + 0.5
    y = _FloorSTE.apply(y) / L
    # clip with the subgradient 1 at both ends, as torch.clamp had when the QCFS code
    # was written (torch 1.x); current torch.clamp gives 0 there.
    y = torch.where(y < 0, y * 0, torch.where(y > 1, y * 0 + 1, y))
    return y * lam


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, g):
        return g


def if_step(v: torch.Tensor, x: torch.Tensor, theta: torch.Tensor):
    """Pure IF dynamics for one step. Returns (new membrane potential, output theta*spike)."""
    return _call("if_step", v, x, theta)


# ---------------------------------------------------------------------------
# Modules

class NQ(nn.Module):
    """Noisy quantized activation. With delta = 0 it is exactly QCFS.

    lam: trainable scalar threshold (init `lam_init`); delta: buffer (saved in
    state_dict), the std of the Gaussian noise added per element on every training
    forward pass; eval mode is deterministic.
    """

    def __init__(self, L: int = 4, lam_init: float = 8.0, delta: float = 0.0):
        super().__init__()
        self.L = int(L)
        self.lam = nn.Parameter(torch.tensor(float(lam_init)))
        self.register_buffer("delta", torch.tensor(float(delta)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        noisy = self.training and bool(self.delta > 0)
        return qcfs(z, self.lam.to(z.dtype), self.L, self.delta.to(z.dtype), noisy)

    def extra_repr(self) -> str:
        return f"L={self.L}, lam={self.lam.item():.4g}, delta={self.delta.item():.4g}"


class QCFS(NQ):
    """QCFS activation: NQ whose delta stays 0."""

    def __init__(self, L: int = 4, lam_init: float = 8.0):
        super().__init__(L=L, lam_init=lam_init, delta=0.0)


def _accumulate(acc: torch.Tensor | None, xs: torch.Tensor) -> torch.Tensor:
    """acc + sum over time of xs [k, ...], in place after the first call."""
    if acc is None:
        return xs.sum(0) if xs.shape[0] > 1 else xs[0].clone()
    for x in xs:
        acc.add_(x)
    return acc


class IFNeuron(nn.Module):
    """Integrate-and-fire neuron, reset by subtraction.

    u(t) = v(t-1) + x(t);  fires when u >= theta and emits theta;  v(t) = u(t) - theta*s(t).
    v(0) = v0 * theta. The membrane state persists across calls until `reset()`, so a
    simulation can be cut into chunks of time.

    Multi-step input: a tensor of shape [k*B, ...] with `self.steps = k` (time-major),
    or k = 1 for step-by-step use. `record` keeps the sum of inputs and outputs over
    time (for calibration: the time-averaged input and the average postsynaptic
    potential).
    """

    def __init__(self, theta: float | torch.Tensor = 1.0, v0: float = 0.5):
        super().__init__()
        self.register_buffer("theta", torch.as_tensor(theta, dtype=torch.float32).clone().reshape(()))
        self.v0 = float(v0)
        self.steps = 1
        self.record = False
        self.v: torch.Tensor | None = None
        self.t = 0
        self.sum_in: torch.Tensor | None = None
        self.sum_out: torch.Tensor | None = None

    def reset(self) -> None:
        self.v = None
        self.t = 0
        self.sum_in = None
        self.sum_out = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.steps
        xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        theta = self.theta.to(x.dtype)
        if self.v is None:
            self.v = torch.empty_like(xs[0]).fill_(float(theta) * self.v0)
        outs = []
        v = self.v
        for i in range(k):
            v, o = if_step(v, xs[i], theta)
            outs.append(o)
        self.v = v
        self.t += k
        out = outs[0] if k == 1 else torch.stack(outs)
        if self.record:
            self.sum_in = _accumulate(self.sum_in, xs)
            self.sum_out = _accumulate(self.sum_out, out.reshape(xs.shape))
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"theta={self.theta.item():.4g}, v0={self.v0}"
