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
plus a plain simulation is already ~1.1x the ideal on CPU. On top of that: the summed
output, accumulated inside the IF step's kernel (`IFNeuron` with record="out"; the
summed input follows from the membrane potential, see the note above `_gaps`), and per
layer and chunk one fused reduction over three tensors that returns both residuals'
sums in float64 (torch.compile; eager ops with HARNESS_FUSED=0). On CPU each batch is
simulated in cache-sized chunks of images (`convert.simulation_chunk`): streaming a batch of 500
through memory cost more than all of the recording. benchmarks/calibration.py reports
the cost as a ratio to the ideal.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Protocol

import torch
from torch import nn

from .convert import TRACE_GUARD, activation_layers, simulation_chunk, to_snn
from .neurons import _qcfs_fwd, fused_enabled

__all__ = ["ResidualStats", "residual_error", "estimate_delta", "Calibrator", "LocalCalibrator",
           "RESIDUALS"]

RESIDUALS = ("end_to_end", "layer_local")
HIST_BINS = 80
HIST_RANGE = 1.0  # histogram of g / lambda over [-1, 1]; outliers land in the end bins
DEFAULT_BATCH = 500  # images per calibration batch (each simulated in cache-sized chunks on CPU)


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
# The statistics, fused. Per layer and chunk of images, from three tensors:
#   so = sum_t out(t)    the IF neuron's output summed over tau steps (accumulated by the
#                        step's own kernel, record="out")
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


def _histogram(g: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    return torch.histc(g.div(lam).clamp_(-HIST_RANGE, HIST_RANGE), HIST_BINS, -HIST_RANGE, HIST_RANGE).long()


class _Sums:
    """Per-layer float64 sums of both residuals (and histograms), chunk by chunk."""

    def __init__(self, acts, snn, tau: int, histograms: bool):
        self.acts, self.neurons, self.tau, self.histograms = acts, snn.neurons, tau, histograms
        self.sums: torch.Tensor | None = None  # [layers, 4] float64, on the device
        self.counts = [0] * len(acts)
        self.hist = {r: [None] * len(acts) for r in RESIDUALS}
        self.consts: list = [None] * len(acts)  # per layer: lam, L, tau, v(0) as tensors

    def _consts(self, l: int, so: torch.Tensor):
        c = self.consts[l]
        if c is None or c[0].dtype != so.dtype or c[0].device != so.device:
            a, neuron, dt, dev = self.acts[l][1], self.neurons[l], so.dtype, so.device
            v_init = float(neuron.theta.to(dt)) * neuron.v0  # v(0) exactly as IFNeuron sets it
            c = self.consts[l] = (a.lam.detach().float().to(dev, dt),
                                  *(torch.tensor(float(v), dtype=dt, device=dev) for v in (a.L, self.tau, v_init)))
        return c

    def add(self, ann_out: list[torch.Tensor]) -> None:
        """The chunk just simulated: the neurons' sum_out and v against the ANN's `ann_out`."""
        for l, neuron in enumerate(self.neurons):
            so = neuron.sum_out
            if self.sums is None:
                self.sums = torch.zeros(len(self.acts), _S, dtype=torch.float64, device=so.device)
            args = (so, neuron.v, ann_out[l], *self._consts(l, so))
            self.sums[l] += _residual_sums(*args)
            self.counts[l] += so.numel()
            if self.histograms:
                for r, g in zip(RESIDUALS, _gaps(*args)):
                    c = _histogram(g, args[3])
                    self.hist[r][l] = c if self.hist[r][l] is None else self.hist[r][l] + c


@torch.no_grad()
def residual_error(model: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor, tau: int,
                   batch_size: int = DEFAULT_BATCH, histograms: bool = True,
                   layout: str = "auto", chunk: int | None = None) -> ResidualStats:
    """Per-layer residual statistics (both definitions) of `model` against its SNN at tau.
    `batches`: normalised images, a tensor (split into `batch_size`) or an iterable.
    `histograms=False` skips the per-layer histograms (the per-epoch calibration).
    `layout`: the simulation layout (`SpikingNet.simulate`); `chunk`: images per ANN
    pass and simulation (default: cache-sized on CPU, see `convert.simulation_chunk`; the whole
    batch on an accelerator). The statistics depend on neither, up to the order of the
    float64 sums."""
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    was_training = model.training
    model.eval()  # no noise, BN affine
    acts = activation_layers(model)
    lams = [float(a.lam.detach().float()) for _, a in acts]
    snn = to_snn(model)
    ann_out: list[torch.Tensor] = []
    hooks = [a.register_forward_hook(lambda m, i, o: ann_out.append(o)) for _, a in acts]
    acc = _Sums(acts, snn, tau, histograms)
    n_images = 0
    try:
        for batch in batches:
            chunk = chunk or simulation_chunk(model, batch)  # its probe also fills ann_out: cleared below
            for x in batch.split(chunk):
                ann_out.clear()
                with TRACE_GUARD.forward():   # no torch.fx trace in another thread meanwhile
                    model(x)
                    snn.simulate(x, tau, layout=layout, record="out")  # sum_out, inside the IF step
                acc.add(ann_out)
                n_images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        snn.reset()
        snn.set_record(False)
        model.train(was_training)
    sums = acc.sums.tolist() if acc.sums is not None else [[0.0] * _S for _ in acts]
    mean, std = _moments(sums, acc.counts)
    edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1).tolist() if histograms else []
    hist_out = {r: [c.tolist() if c is not None else [] for c in acc.hist[r]] for r in RESIDUALS}
    return ResidualStats([n for n, _ in acts], lams, tau, n_images, mean, std, edges, hist_out)


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
