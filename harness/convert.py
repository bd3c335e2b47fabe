"""ANN -> SNN conversion and simulation.

`to_snn(model)` deep-copies the ANN, puts it in eval mode (BN is then affine) and
replaces every NQ/QCFS activation by an IF neuron with theta = lambda and
v(0) = v0 * theta. The ANN is not touched.

`SpikingNet.simulate(x, T)` feeds the image at every step and returns the running
mean of the output layer, shape [T, B, classes]: row t-1 is exactly the result of
a T' = t simulation, because IF dynamics are causal and v(0) does not depend on T.

Two layouts, one mechanism: the network is run on chunks of k time steps folded
into the batch ([k*B, ...]); the neurons unfold time, loop over it and keep
their membrane state across chunks.
  - "step":      k = 1, T network calls at batch B (no T-fold activations).
  - "multistep": k = chunk or T, layer by layer over T*B (fewer, larger kernels).
Selection rule for layout="auto": CPU -> "step" (benchmarks/simulate.py, batch 64:
faster on VGG-16, within noise of "multistep" on ResNet-20, and it never holds T-fold
activation tensors; at very small batches "multistep" can be faster); CUDA ->
"multistep" (large batched kernels amortise launch overhead; not measured here).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import BAD_INPUT, HarnessError
from .neurons import NQ, IFNeuron

__all__ = ["to_snn", "SpikingNet", "ConversionError", "activation_layers"]

# Leaf modules that are linear/affine in eval mode (or identity): safe in an SNN.
_SAFE_LEAVES = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.Sequential,  # empty = identity
)
_REASONS = {
    nn.MaxPool2d: "max-pooling of spike trains is not equivalent to max-pooling of rates; use AvgPool2d",
    nn.AdaptiveMaxPool2d: "max-pooling of spike trains is not equivalent to max-pooling of rates",
    nn.ReLU: "an activation that was never replaced by NQ/QCFS has no IF counterpart",
}


class ConversionError(HarnessError, ValueError):
    """A module that has no faithful IF counterpart (bad input: exit 2)."""

    kind = "conversion error"
    exit_code = BAD_INPUT


def activation_layers(model: nn.Module) -> list[tuple[str, NQ]]:
    """The (name, module) of every NQ/QCFS activation, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NQ)]


def _check_convertible(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, NQ) or len(list(m.children())) > 0:
            continue
        if isinstance(m, _SAFE_LEAVES):
            continue
        reason = next((r for t, r in _REASONS.items() if isinstance(m, t)), None)
        if reason is None:
            reason = ("activation that was never replaced by NQ/QCFS has no IF counterpart"
                      if "activation" in type(m).__module__ else
                      "not known to be linear or affine in eval mode")
        raise ConversionError(f"cannot convert module '{name}' ({type(m).__name__}): {reason}")


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


class SpikingNet(nn.Module):
    """A converted network. Holds the IF neurons; see `simulate`."""

    def __init__(self, net: nn.Module, layer_names: list[str]):
        super().__init__()
        self.net = net
        self.layer_names = layer_names
        self.neurons: list[IFNeuron] = [net.get_submodule(n) for n in layer_names]

    def reset(self) -> None:
        for n in self.neurons:
            n.reset()

    def set_record(self, on: bool) -> None:
        for n in self.neurons:
            n.record = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run one chunk. x: [k*B, ...] time-major with k = the neurons' `steps`."""
        return self.net(x)

    @staticmethod
    def default_layout(device: torch.device | str) -> str:
        return "multistep" if torch.device(device).type == "cuda" else "step"

    @torch.no_grad()
    def simulate(self, x: torch.Tensor, T: int, chunk: int | None = None,
                 layout: str = "auto", record: bool = False) -> torch.Tensor:
        """Simulate T steps with the image as constant input. Returns [T, B, classes],
        row t-1 = mean output over the first t steps. State is reset first.
        `record=True` keeps per-neuron sums of input and output (see IFNeuron)."""
        if T < 1:
            raise ValueError(f"T = {T} (expected an integer >= 1)")
        if layout == "auto":
            layout = self.default_layout(x.device)
        if layout == "step":
            k = 1
        elif layout == "multistep":
            k = T if chunk is None else chunk
        else:
            raise ValueError(f"layout = {layout!r} (expected one of: auto, step, multistep)")
        if k < 1:
            raise ValueError(f"chunk = {chunk} (expected an integer >= 1)")
        self.reset()
        self.set_record(record)
        B = x.shape[0]
        outs, running, t = [], None, 0
        try:
            while t < T:
                kk = min(k, T - t)
                for n in self.neurons:
                    n.steps = kk
                xin = x if kk == 1 else x.unsqueeze(0).expand(kk, *x.shape).reshape(kk * B, *x.shape[1:])
                y = self.net(xin).reshape(kk, B, -1).float()
                csum = y.cumsum(0)
                if running is not None:
                    csum += running
                running = csum[-1]
                outs.append(csum)
                t += kk
        finally:  # an exception must not leave the neurons in multi-step mode
            for n in self.neurons:
                n.steps = 1
        total = torch.cat(outs)
        steps = torch.arange(1, T + 1, device=total.device, dtype=total.dtype).view(T, 1, 1)
        return total / steps


def to_snn(model: nn.Module, v0: float = 0.5) -> SpikingNet:
    """Convert an ANN with NQ/QCFS activations into a separate SpikingNet."""
    _check_convertible(model)
    acts = activation_layers(model)
    if not acts:
        raise ConversionError("cannot convert: the model has no NQ/QCFS activation")
    net = copy.deepcopy(model).eval()
    for name, act in acts:
        lam = act.lam.detach()
        if not bool(lam > 0):
            raise ConversionError(f"cannot convert module '{name}': lambda = {lam.item():.4g} "
                                  "(expected > 0; an IF threshold must be positive)")
        _set_module(net, name, IFNeuron(theta=lam.float().cpu(), v0=v0).to(lam.device))
    for p in net.parameters():
        p.requires_grad_(False)
    return SpikingNet(net, [n for n, _ in acts]).eval()
