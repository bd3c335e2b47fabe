"""Residual error between an ANN and its converted SNN, and the layer-wise delta.

Per activation layer l, on calibration images, in one pass through each network:
  end_to_end:  g_l = phi_l(tau) - a_l               (ANN activation from the ANN's own
                                                     inputs; includes propagated error,
                                                     as the official NQ code measures it)
  layer_local: g_l = phi_l(tau) - QCFS_L(zbar_l)    (zbar_l: the SNN's own time-averaged
                                                     input at layer l; one layer's error)
phi_l(tau) is the average postsynaptic potential over tau steps. delta_l is the
(pooled, population) std of g_l over all elements of all calibration images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Protocol

import torch
from torch import nn

from .convert import activation_layers, to_snn
from .neurons import qcfs

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


class _Acc:
    """Running sum / sum of squares / count (float64, on the device) and a histogram.
    Nothing leaves the device until `mean_std()`."""

    def __init__(self):
        self.s = self.ss = None
        self.n = 0
        self.h = None

    def add(self, g: torch.Tensor, lam: torch.Tensor, hist: bool) -> None:
        # per-batch sums in g's dtype (pairwise summation), accumulated in float64
        s = g.sum().double()
        ss = torch.linalg.vector_norm(g).double().square()
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += g.numel()
        if hist:
            r = torch.histc(g.div_(lam).clamp_(-HIST_RANGE, HIST_RANGE), HIST_BINS, -HIST_RANGE, HIST_RANGE)
            self.h = r.long() if self.h is None else self.h + r.long()

    def mean_std(self) -> tuple[float, float]:
        n = max(self.n, 1)
        m = float(self.s) / n
        return m, max(float(self.ss) / n - m * m, 0.0) ** 0.5

    def counts(self) -> list[int]:
        return self.h.tolist() if self.h is not None else []


@torch.no_grad()
def residual_error(model: nn.Module, batches: Iterable[torch.Tensor] | torch.Tensor, tau: int,
                   batch_size: int = DEFAULT_BATCH, histograms: bool = True) -> ResidualStats:
    """Per-layer residual statistics (both definitions) of `model` against its SNN at tau.
    `batches`: normalised images, a tensor (split into `batch_size`) or an iterable.
    `histograms=False` skips the per-layer histograms (the per-epoch calibration)."""
    if isinstance(batches, torch.Tensor):
        batches = batches.split(batch_size)
    was_training = model.training
    model.eval()  # no noise, BN affine
    acts = activation_layers(model)
    names = [n for n, _ in acts]
    lams = [a.lam.detach().float() for _, a in acts]
    snn = to_snn(model)
    ann_out: list[torch.Tensor] = []
    hooks = [a.register_forward_hook(lambda m, i, o: ann_out.append(o)) for _, a in acts]
    accs = {r: [_Acc() for _ in acts] for r in RESIDUALS}
    n_images = 0
    try:
        for x in batches:
            ann_out.clear()
            model(x)
            snn.simulate(x, tau, record=True)
            for l, ((_, a), neuron) in enumerate(zip(acts, snn.neurons)):
                phi = neuron.sum_out / tau
                zbar = neuron.sum_in.div_(tau)
                lam = lams[l].to(phi.dtype)
                accs["layer_local"][l].add(qcfs(zbar, lam, a.L).neg_().add_(phi), lam, histograms)
                accs["end_to_end"][l].add(phi.sub_(ann_out[l]), lam, histograms)
            n_images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    mean = {r: [acc.mean_std()[0] for acc in accs[r]] for r in RESIDUALS}
    std = {r: [acc.mean_std()[1] for acc in accs[r]] for r in RESIDUALS}
    edges = torch.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1).tolist() if histograms else []
    hist = {r: [acc.counts() for acc in accs[r]] for r in RESIDUALS}
    return ResidualStats(names, [float(v) for v in lams], tau, n_images, mean, std, edges, hist)


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
