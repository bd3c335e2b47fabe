"""Activations (QCFS, NQ) and the integrate-and-fire neuron.

QCFS (Bu et al. 2022, Eq. 6):  a = lam * clip(floor(z*L/lam + 0.5) / L, 0, 1)
NQ   (Huang et al., Eq. 13):   a = QCFS(z) + delta * N(0, 1)   (training forward only)

The activation is one autograd node with a hand-written backward: floor is
straight-through, and z and lam get exactly the gradients that autograd gives for
one of two op-by-op formulations (`grad=`, see GRAD_FORMULATIONS). Both have the
same forward values; they differ in where clip sits relative to the floor, and so
in the window where the gradient passes. Per element, with u = z / lam and
q = clip(floor(u*L + 0.5) / L, 0, 1) (the forward value divided by lam):

  "nq" (default): the NQ authors' MPLayer (hzp2022/ANN2SNN_NQ), also
      putshua/ANN_SNN_QCFS: lam * floor(clip(u, 0, 1) * L + 0.5) / L.
      clip before the floor; window 0 <= u <= 1:
          d a / d z   = 1[0 <= u <= 1]
          d a / d lam = q - 1[0 <= u <= 1] * u
  "qcfs_iclr": putshua/SNN_conversion_QCFS: lam * clip(floor(u*L + 0.5) / L, 0, 1).
      clip after the floor; with t = floor(u*L + 0.5) the window is 0 <= t <= L,
      i.e. -1/(2L) <= u < 1 + 1/(2L):
          d a / d z   = 1[0 <= t <= L]
          d a / d lam = q - 1[0 <= t <= L] * u

clip's subgradient is 1 on the closed window (both ends included), as torch.clamp
had in torch 1.x when both codes were written; torch 2.x clamp gives 0 at the
bounds (1/2 with tensor bounds), so `qcfs_reference` states the rule explicitly.

Precision: lam may have another dtype than z (NQ passes its fp32 parameter as is,
also under autocast). The forward and d a / d z are in z's dtype: lam is cast to
z's dtype first; fp16 / bf16 arithmetic is carried out in float32 and rounded once
at the end (as the fused kernels do anyway, so fused and eager agree). The lam
gradient is a sum over every element of the activation; it is accumulated in
float32 (float64 for float64 z), never in fp16 / bf16, where it overflows or loses
digits, and returned in lam's dtype.
"""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["NQ", "QCFS", "IFNeuron", "qcfs", "qcfs_reference", "if_step", "GRAD_FORMULATIONS"]

# gradient formulations of the activation (module docstring); the first is the default
GRAD_FORMULATIONS = ("nq", "qcfs_iclr")


def check_grad_formulation(grad: str) -> str:
    """Return `grad` if it names a gradient formulation, else raise ValueError."""
    if not isinstance(grad, str) or grad not in GRAD_FORMULATIONS:
        raise ValueError(f"unknown gradient formulation {grad!r}: expected one of "
                         f"{', '.join(repr(g) for g in GRAD_FORMULATIONS)}")
    return grad


# ---------------------------------------------------------------------------
# Pure functions. The "kernels" below are written so that torch.compile can fuse
# each of them into one loop; eager mode runs them as-is (same math). fp16 / bf16
# inputs are computed in float32 and the results rounded once (what the fused
# kernels do anyway; for float32 and float64 inputs `_up` is the identity).

def _up(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _q(z: torch.Tensor, lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The quantization level floor(z*L/lam + 0.5) clipped to [0, L] (computed as `_up`)."""
    return torch.floor(_up(z) * (_up(L) / _up(lam)) + 0.5).clamp_min(0).minimum(_up(L))


def _qcfs_fwd(z: torch.Tensor, lam: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    return (_q(z, lam, L) * (_up(lam) / _up(L))).to(z.dtype)


def _nq_fwd(z: torch.Tensor, lam: torch.Tensor, delta: torch.Tensor, L: torch.Tensor,
            g: torch.Tensor) -> torch.Tensor:
    return (_q(z, lam, L) * (_up(lam) / _up(L)) + _up(delta) * _up(g)).to(z.dtype)


# Backward kernels: (z, upstream gradient g, lam, L) -> (dz in z's dtype, dlam summed
# over all elements in `_up(z).dtype`, i.e. at least float32).

def _qcfs_iclr_bwd(z: torch.Tensor, g: torch.Tensor, lam: torch.Tensor, L: torch.Tensor):
    zu, lamu, Lu = _up(z), _up(lam), _up(L)
    t = torch.floor(zu * (Lu / lamu) + 0.5)
    inside = (t >= 0) & (t <= Lu)  # -1/(2L) <= z/lam < 1 + 1/(2L)
    gz = torch.where(inside, g, torch.zeros_like(g))
    c = t.clamp_min(0).minimum(Lu) / Lu
    glam = (_up(g) * (c - torch.where(inside, zu / lamu, torch.zeros_like(zu)))).sum()
    return gz, glam


def _nq_bwd(z: torch.Tensor, g: torch.Tensor, lam: torch.Tensor, L: torch.Tensor):
    zu, lamu, Lu = _up(z), _up(lam), _up(L)
    u = zu / lamu
    inside = (u >= 0) & (u <= 1)
    gz = torch.where(inside, g, torch.zeros_like(g))
    c = _q(z, lam, L) / Lu  # the forward's level
    glam = (_up(g) * (c - torch.where(inside, u, torch.zeros_like(u)))).sum()
    return gz, glam


def _if_step(v: torch.Tensor, x: torch.Tensor, theta: torch.Tensor):
    """One IF step: charge, fire if u >= theta (emit theta), reset by subtraction."""
    u = v + x
    out = torch.where(u >= theta, theta, torch.zeros_like(u))
    return u - out, out


def _if_step_sum(v: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, s: torch.Tensor):
    """`_if_step` that also adds its output to the running sum s (the calibration's
    recording, in the same loop as the step: no second pass over the output).
    Returns new tensors (v, out, s + out); v and s may be 0-dim (the first step)."""
    v, out = _if_step(v, x, theta)
    return v, out, s + out


def _if_step_sum_(v: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, s: torch.Tensor):
    """`_if_step_sum` that updates v and s in place and returns the output: the steps
    after the first write into the state they read (fresh tensors each step page-fault
    their memory in: 1.24 against 0.88 ms per step on a [128, 16, 32, 32] layer, 2 cores)."""
    v_next, out = _if_step(v, x, theta)
    v.copy_(v_next)
    s.add_(out)
    return out


_KERNELS = {"qcfs_fwd": _qcfs_fwd, "nq_fwd": _nq_fwd, "bwd_nq": _nq_bwd, "bwd_qcfs_iclr": _qcfs_iclr_bwd,
            "if_step": _if_step, "if_step_sum": _if_step_sum, "if_step_sum_": _if_step_sum_}
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
    # computed in z's dtype: lam (and delta) are cast to it
    z, lam, L = z.detach(), lam.detach().to(z.dtype), torch.tensor(float(L), dtype=z.dtype, device=z.device)
    if noisy:
        # torch's generator (mt19937) draws the N(0,1) sample; the add is fused. A
        # counter-based hash RNG inside the fused kernel measured slower on CPU.
        return _call("nq_fwd", z, lam, delta.detach().to(z.dtype), L, torch.randn_like(z))
    return _call("qcfs_fwd", z, lam, L)


class _QCFSFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, lam, delta, L, noisy, grad):
        ctx.save_for_backward(z, lam)
        ctx.L = L
        ctx.grad = grad
        return _forward(z, lam, delta, L, noisy)

    @staticmethod
    def backward(ctx, g):
        z, lam = ctx.saved_tensors
        L = torch.tensor(float(ctx.L), dtype=z.dtype, device=z.device)
        # the lam-gradient sum runs over every element: the kernels accumulate it in
        # float32 (float64 for float64 z); it is returned in lam's dtype
        gz, glam = _call("bwd_" + ctx.grad, z.detach(), g.contiguous(), lam.detach().to(z.dtype), L)
        return gz, glam.to(lam.dtype).reshape(lam.shape), None, None, None, None


def qcfs(z: torch.Tensor, lam: torch.Tensor, L: int, delta: torch.Tensor | None = None,
         noisy: bool = False, grad: str = "nq") -> torch.Tensor:
    """Fused QCFS / NQ activation (see module docstring). `lam` may have another dtype
    than `z` (e.g. an fp32 parameter under autocast): the output has z's dtype, the lam
    gradient lam's dtype. `grad`: the gradient formulation, one of GRAD_FORMULATIONS."""
    check_grad_formulation(grad)
    if delta is None:
        delta = torch.zeros((), dtype=z.dtype, device=z.device)
        noisy = False
    if not torch.is_grad_enabled() or not (z.requires_grad or lam.requires_grad):
        return _forward(z, lam, delta, L, noisy)
    return _QCFSFn.apply(z, lam, delta, L, noisy, grad)


def qcfs_reference(z: torch.Tensor, lam: torch.Tensor, L: int, grad: str = "nq") -> torch.Tensor:
    """The authors' formulation `grad` (module docstring), op by op, with autograd
    through every op (floor straight-through). Used by the tests as the independent
    reference for values and gradients; no dtype handling (use one dtype throughout).

    clip is written as torch.where with the subgradient 1 on the closed window
    [0, 1] (both ends included, as torch.clamp had in torch 1.x when both codes were
    written), so the reference does not depend on the torch version: torch 2.x
    torch.clamp(x, 0, 1) gives the gradient 0 at x = 0 and x = 1."""
    check_grad_formulation(grad)
    if grad == "nq":  # hzp2022/ANN2SNN_NQ MPLayer, putshua/ANN_SNN_QCFS: clip, then floor
        y = z / lam
        y = torch.where(y < 0, torch.zeros_like(y), torch.where(y > 1, torch.ones_like(y), y))
        y = _FloorSTE.apply(y * L + 0.5) / L
        return y * lam
    # "qcfs_iclr", putshua/SNN_conversion_QCFS: floor, then clip
    y = z / lam
    y = y * L + 0.5
    y = _FloorSTE.apply(y) / L
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
    forward pass; eval mode is deterministic. grad: the gradient formulation, one of
    GRAD_FORMULATIONS (module docstring); it changes gradients only, not values.
    """

    def __init__(self, L: int = 4, lam_init: float = 8.0, delta: float = 0.0, grad: str = "nq"):
        super().__init__()
        self.L = int(L)
        self.grad = check_grad_formulation(grad)
        self.lam = nn.Parameter(torch.tensor(float(lam_init)))
        self.register_buffer("delta", torch.tensor(float(delta)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        noisy = self.training and bool(self.delta > 0)
        # lam goes in its own dtype: its gradient stays fp32 under autocast
        return qcfs(z, self.lam, self.L, self.delta, noisy, grad=self.grad)

    def extra_repr(self) -> str:
        return f"L={self.L}, lam={self.lam.item():.4g}, delta={self.delta.item():.4g}, grad={self.grad}"


class QCFS(NQ):
    """QCFS activation: NQ whose delta stays 0."""

    def __init__(self, L: int = 4, lam_init: float = 8.0, grad: str = "nq"):
        super().__init__(L=L, lam_init=lam_init, delta=0.0, grad=grad)


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
    or k = 1 for step-by-step use. `record`: False; True keeps the sums over time of
    the inputs and of the outputs (`sum_in`, `sum_out`: the time-averaged input and
    the average postsynaptic potential, each by its own pass); "out" keeps `sum_out`
    only, accumulated inside the step's kernel (the calibration's recording: the summed
    input follows from `v`, see `harness.calibration`).

    The first step after `reset()` reads no state tensor: v(0) is a constant, so the
    step adds it as a scalar (the same arithmetic as a filled state tensor).
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
        keep = self.record == "out"
        outs = []
        v, s = self.v, self.sum_out
        for i in range(k):
            if v is None:  # t = 0: v(0) = float(theta) * v0 in x's dtype, as a 0-dim tensor
                v = torch.tensor(float(theta) * self.v0, dtype=x.dtype, device=x.device)
                if keep:  # the sum starts as a copy of the output, written by the same kernel
                    v, o, s = _call("if_step_sum", v, xs[i], theta, torch.zeros((), dtype=x.dtype, device=x.device))
                else:
                    v, o = if_step(v, xs[i], theta)
            elif keep:  # v and s belong to this neuron (made by its first step): updated in place
                o = _call("if_step_sum_", v, xs[i], theta, s)
            else:
                v, o = if_step(v, xs[i], theta)
            outs.append(o)
        self.v = v
        self.t += k
        out = outs[0] if k == 1 else torch.stack(outs)
        if keep:
            self.sum_out = s
        elif self.record:
            self.sum_in = _accumulate(self.sum_in, xs)
            self.sum_out = _accumulate(self.sum_out, out.reshape(xs.shape))
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"theta={self.theta.item():.4g}, v0={self.v0}"
