"""Residual error between an ANN and its converted SNN, and the layer-wise delta.

Per activation layer l, on calibration images, in one pass through each network:
  end_to_end:  g_l = phi_l(tau) - a_l               (ANN activation from the ANN's own
                                                     inputs; includes propagated error,
                                                     as the official NQ code measures it)
  layer_local: g_l = phi_l(tau) - QCFS_L(zbar_l)    (zbar_l: the SNN's own time-averaged
                                                     input at layer l; one layer's error)
phi_l(tau) is the average postsynaptic potential over tau steps. delta_l is the
(pooled, population) std of g_l over all elements of all calibration images.

Cost. The ideal is tau + 1 forward passes per image (one ANN pass, tau SNN steps); an
SNN step costs somewhat more than an ANN pass (the IF neuron's state), so one ANN pass
plus a plain simulation is already ~1.1x the ideal on CPU. On top of that: one add per
neuron and step (the summed output, recorded by a forward hook into a reused buffer;
the summed input follows from the membrane potential, see the note above `_gaps`), and
per layer and batch one fused reduction over three tensors that returns both
residuals' sums in float64 (torch.compile; eager ops with HARNESS_FUSED=0).
benchmarks/calibration.py reports the cost as a ratio to the ideal.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Protocol

import torch
from torch import nn

from .convert import TRACE_GUARD, activation_layers, to_snn
from .neurons import _qcfs_fwd, fused_enabled

__all__ = ["ResidualStats", "residual_error", "estimate_delta", "Calibrator", "LocalCalibrator",
           "RESIDUALS"]

RESIDUALS = ("end_to_end", "layer_local")
HIST_BINS = 80
HIST_RANGE = 1.0  # histogram of g / lambda over [-1, 1]; outliers land in the end bins
DEFAULT_BATCH = 500  # images per calibration forward pass (the SNN holds tau steps of it)


@dataclass
class ResidualStats:
    layers: list[str]
    lam: list[float]
    tau: int
    n_images: int
    mean: dict[str, list[float]]  # residual definition -> per-layer mean
    std: dict[str, list[float]]
    hist_edges: list[float] = field(default_factory=list)
    hist: dict[str, list[list[int]]] = field(default_factory=dict)

    def delta(self, residual: str = "end_to_end", scale: float = 1.0) -> list[float]:
        return estimate_delta(self, residual, scale)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ResidualStats":
        return cls(**d)


# ---------------------------------------------------------------------------
# The statistics, fused. Per layer and batch, from three tensors:
#   so = sum_t out(t)    the IF neuron's output summed over tau steps (a hook records it:
#                        one add per step, into a buffer reused across batches)
#   v  = v(tau)          the membrane potential the neuron is left with
#   a                    the ANN's activation (a forward hook keeps a reference)
# Reset by subtraction gives v(tau) = v(0) + sum_t z(t) - sum_t out(t), so the SNN's
# summed input is v(tau) - v(0) + so and needs no recording of its own (in exact
# arithmetic this is the sum of the inputs; in floating point it is the sum the neuron
# itself integrated, and differs from a separately accumulated sum by rounding only:
# on ResNet-20 at tau = 4, batch 500, the layer_local std moved by < 1e-8 except in the
# first layer, where one element of 8 million at a quantisation boundary changed level).
# Then
#   phi = so / tau,  zbar = (v - v(0) + so) / tau,
#   end_to_end  g = phi - a,  layer_local  g = phi - QCFS(zbar)   (in the tensors' dtype)
# and one pass returns sum g and sum g^2 of both, accumulated in float64 (torch.compile
# fuses the whole expression into one reduction loop: no phi / zbar / g tensors).

_S = 4  # sums per layer: end_to_end sum g, sum g^2; layer_local sum g, sum g^2


def _gaps(so, v, a, lam, L, tau, v_init):
    """(end_to_end g, layer_local g), in the tensors' dtype."""
    phi = so / tau
    zbar = (v - v_init + so) / tau
    return phi - a, phi - _qcfs_fwd(zbar, lam, L)


def _sums_fused(so, v, a, lam, L, tau, v_init):
    ge, gl = _gaps(so, v, a, lam, L, tau, v_init)
    ge, gl = ge.double(), gl.double()
    return torch.stack([ge.sum(), (ge * ge).sum(), gl.sum(), (gl * gl).sum()])


def _sums_eager(so, v, a, lam, L, tau, v_init):
    """Without torch.compile (HARNESS_FUSED=0, or no compiler): sums in g's dtype
    (pairwise summation) per batch, accumulated in float64 by the caller."""
    ge, gl = _gaps(so, v, a, lam, L, tau, v_init)
    return torch.stack([ge.sum().double(), torch.linalg.vector_norm(ge).double().square(),
                        gl.sum().double(), torch.linalg.vector_norm(gl).double().square()])


_FUSED: list = []  # [the compiled _sums_fused], or [_sums_eager] once compiling failed


def _residual_sums(*args) -> torch.Tensor:
    """float64 [4]: sum g, sum g^2 of the end_to_end and the layer_local residual."""
    if not fused_enabled():
        return _sums_eager(*args)
    if not _FUSED:
        try:
            _FUSED.append(torch.compile(_sums_fused, dynamic=True, fullgraph=True))
        except Exception:  # no compiler backend
            _FUSED.append(_sums_eager)
    try:
        return _FUSED[0](*args)
    except Exception as e:  # a backend failure at first call degrades to eager, loudly once
        if _FUSED[0] is _sums_eager:
            raise
        import warnings
        warnings.warn(f"harness: fused calibration statistics unavailable ({type(e).__name__}); using eager ops")
        _FUSED[0] = _sums_eager
        return _sums_eager(*args)


class _OutputSum:
    """Forward hook on an IF neuron: the sum over time of its output, in a buffer that is
    allocated once per calibration and reused for every batch (a fresh tensor per step
    would page-fault its memory in again). Works with either simulation layout."""

    def __init__(self):
        self.buf: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.steps = 0

    def start(self) -> None:
        self.steps = 0

    def __call__(self, neuron, inputs, out: torch.Tensor) -> None:
        k = neuron.steps
        o = out.reshape(k, out.shape[0] // k, *out.shape[1:])
        if self.steps == 0:
            b = o.shape[1]
            if self.buf is None or self.buf.shape[0] < b or self.buf.shape[1:] != o.shape[2:] \
                    or self.buf.dtype != o.dtype:
                self.buf = torch.empty_like(o[0])
            self.sum = self.buf[:b]
            torch.sum(o, 0, out=self.sum) if k > 1 else self.sum.copy_(o[0])
        else:
            self.sum.add_(o.sum(0) if k > 1 else o[0])
        self.steps += k


def _histogram(g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.histc(g.div(lam).clamp_(-HIST_RANGE, HIST_RANGE), HIST_BINS, -HIST_RANGE, HIST_RANGE).long()


@torch.no_grad()
def residual_error(model: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor, tau: int,
                   batch_size: int = DEFAULT_BATCH, histograms: bool = True,
                   layout: str = "auto") -> ResidualStats:
    """Per-layer residual statistics (both definitions) of `model` against its SNN at tau.
    `batches`: normalised images, a tensor (split into `batch_size`) or an iterable.
    `histograms=False` skips the per-layer histograms (the per-epoch calibration).
    `layout`: the simulation layout (`SpikingNet.simulate`); the statistics do not
    depend on it."""
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    was_training = model.training
    model.eval()  # no noise, BN affine
    acts = activation_layers(model)
    names = [n for n, _ in acts]
    lams = [a.lam.detach().float() for _, a in acts]
    snn = to_snn(model)
    ann_out: list[torch.Tensor] = []
    out_sums = [_OutputSum() for _ in snn.neurons]
    hooks = [a.register_forward_hook(lambda m, i, o: ann_out.append(o)) for _, a in acts]
    hooks += [n.register_forward_hook(h) for n, h in zip(snn.neurons, out_sums)]
    sums: torch.Tensor | None = None  # [layers, 4] float64, on the device
    counts = [0] * len(acts)
    hist = {r: [None] * len(acts) for r in RESIDUALS}
    n_images = 0
    try:
        for x in batches:
            ann_out.clear()
            with TRACE_GUARD.forward():   # no torch.fx trace in another thread meanwhile
                model(x)
                for h in out_sums:
                    h.start()
                snn.simulate(x, tau, layout=layout)  # the hooks record; the neurons' own recording stays off
            if sums is None:
                sums = torch.zeros(len(acts), _S, dtype=torch.float64, device=x.device)
            for l, ((_, a), neuron, h) in enumerate(zip(acts, snn.neurons, out_sums)):
                so = h.sum
                dt, dev = so.dtype, so.device
                lam = lams[l].to(dt)
                # v(0) exactly as IFNeuron sets it: float(theta in x's dtype) * v0
                v_init = float(neuron.theta.to(dt)) * neuron.v0
                args = (so, neuron.v, ann_out[l], lam, *(torch.tensor(float(c), dtype=dt, device=dev)
                                                         for c in (a.L, tau, v_init)))
                sums[l] += _residual_sums(*args)
                counts[l] += so.numel()
                if histograms:
                    for r, g in zip(RESIDUALS, _gaps(*args)):
                        c = _histogram(g, lam)
                        hist[r][l] = c if hist[r][l] is None else hist[r][l] + c
            n_images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    mean, std = _moments(sums.tolist() if sums is not None else [[0.0] * _S for _ in acts], counts)
    edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1).tolist() if histograms else []
    hist_out = {r: [c.tolist() if c is not None else [] for c in hist[r]] for r in RESIDUALS}
    return ResidualStats(names, [float(v) for v in lams], tau, n_images, mean, std, edges, hist_out)


def _moments(rows: list[list[float]], counts: list[int]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-layer (mean, std) of each residual from its [sum, sum of squares] per layer."""
    mean: dict[str, list[float]] = {r: [] for r in RESIDUALS}
    std: dict[str, list[float]] = {r: [] for r in RESIDUALS}
    for l, row in enumerate(rows):
        n = max(counts[l], 1)
        for i, r in enumerate(RESIDUALS):
            m = row[2 * i] / n
            mean[r].append(m)
            std[r].append(max(row[2 * i + 1] / n - m * m, 0.0) ** 0.5)
    return mean, std


def estimate_delta(stats: ResidualStats, residual: str = "end_to_end", scale: float = 1.0) -> list[float]:
    """delta_l = scale * std of the residual under the chosen definition."""
    if residual not in RESIDUALS:
        raise ValueError(f"residual = {residual!r} (expected one of: {', '.join(RESIDUALS)})")
    return [scale * s for s in stats.std[residual]]


def set_deltas(model: nn.Module, deltas: list[float] | float) -> None:
    acts = activation_layers(model)
    if isinstance(deltas, (int, float)):
        deltas = [float(deltas)] * len(acts)
    if len(deltas) != len(acts):
        raise ValueError(f"{len(deltas)} deltas for {len(acts)} activation layers")
    for (_, a), d in zip(acts, deltas):
        a.delta.fill_(float(d))


def get_deltas(model: nn.Module) -> list[float]:
    return [float(a.delta) for _, a in activation_layers(model)]


class Calibrator(Protocol):
    """Computes residual statistics of a model on a fixed calibration split
    (with per-layer histograms when epoch is None: the final calibration)."""

    def calibrate(self, model: nn.Module, *, tau: int, trial_id: str | None = None,
                  epoch: int | None = None) -> ResidualStats: ...


class LocalCalibrator:
    """In-process calibration on a `harness.data.CalibrationSet` (the validation split or
    a stratified subset of it). Histograms are computed for the final calibration only
    (epoch=None)."""

    def __init__(self, calib_set, batch_size: int = DEFAULT_BATCH):
        """`calib_set`: a CalibrationSet, or a tensor of normalised images."""
        self.calib_set = calib_set
        self.batch_size = batch_size

    def calibrate(self, model: nn.Module, *, tau: int, trial_id: str | None = None,
                  epoch: int | None = None) -> ResidualStats:
        device = next(model.parameters()).device
        if isinstance(self.calib_set, torch.Tensor):
            batches = self.calib_set.to(device).split(self.batch_size)
        else:
            batches = self.calib_set.batches(self.batch_size, epoch, device)
        return residual_error(model, batches, tau, histograms=epoch is None)
