"""Spikes, synaptic operations (SOPs) and an energy estimate of a converted network.

    rec = EnergyRecorder(input_shape=(3, 32, 32), T_max=64)
    with convert.observe_conversions(rec.attach):                      # or rec.attach(snn)
        accs = train.evaluate_snn(model, batches, 64)                  # one simulation per batch
    rec.detach()
    block = rec.summary(Ts=[1, 2, 4, 8], ann_macs=train.count_macs(model, (3, 32, 32)))

What is counted (per image, for every T <= T_max, from the same single simulation):

- spikes: events emitted by the IF neurons of each layer in steps 1..T.
- SOPs (synaptic operations): every spike of neuron p costs F(p) accumulates, its
  fan-out: the number of synapses it drives in the synaptic layers (conv, linear) it
  feeds, plus one per direct connection into a later neuron that passes no synaptic
  layer (an identity shortcut: one accumulate into the target membrane). Pooling
  between a spiking layer and the next synaptic layer forwards each spike to every
  pooling window that contains it (event-driven sum pooling), so a spike's fan-out is
  the number of (window, synapse) paths; for non-overlapping pooling that is the
  number of distinct synapses. F is exact at borders, strides and groups: it is
  computed once per network by running the network with all weights set to one
  (`synaptic_fanout`): a synaptic layer's output, summed, is the number of
  (input, synapse) pairs, and its gradient with respect to a spiking layer's output
  is F per neuron (integers; checked). Per step, SOPs = sum_p count_p * F(p), where
  count_p is the number of images in which p fired: exact in float64.
- MACs: the synaptic layers fed by the analog image (no spiking layer upstream; the
  first conv) run dense multiply-accumulates. The image is presented at every step, so
  by default they count at every step (`first_layer_every_step`); a chip that caches
  the constant first-layer current would pay them once: `macs_first_layer` is recorded
  so the report can recompute. MACs per layer are counted as `train.count_macs` does
  (output elements x input channels per group x kernel area; zero padding included).
- energy (uJ per image) = (e_mac * MACs + e_ac * SOPs) * 1e-6, with e_ac = 0.9 pJ and
  e_mac = 4.6 pJ (45 nm, 32-bit float, Horowitz ISSCC 2014; the figures conversion
  papers use), configurable in `EnergyConstants`. The ANN's energy is e_mac * its MACs.
  Neuron updates, memory traffic and BN (folded into the weights) are not counted.

Recording only adds a forward hook on each IF neuron: one sum over the batch per step
and layer, and a [k, N] @ [N, 2] product (benchmarks/energy_overhead.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import HarnessError
from .neurons import IFNeuron

__all__ = ["EnergyConstants", "EnergyRecorder", "EnergyError", "synaptic_fanout", "layer_macs", "Fanout",
           "E_AC_PJ", "E_MAC_PJ"]

E_AC_PJ = 0.9   # one accumulate (45 nm, fp32)
E_MAC_PJ = 4.6  # one multiply-accumulate (45 nm, fp32)


class EnergyError(HarnessError):
    kind = "energy error"


@dataclass(frozen=True)
class EnergyConstants:
    e_ac_pJ: float = E_AC_PJ
    e_mac_pJ: float = E_MAC_PJ
    first_layer_every_step: bool = True
    source: str = "45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014): accumulate 0.9 pJ, multiply-accumulate 4.6 pJ"


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        return out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    if isinstance(m, nn.Conv1d):
        return out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0]
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features * (out[0].numel() // m.out_features)
    return 0


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs of one inference per conv / linear module (name -> MACs), as
    `train.count_macs` counts them (their sum equals it)."""
    out: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(m, i, o):
        out[names[m]] = out.get(names[m], 0) + _macs(m, o)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in hs:
            h.remove()
    return out


# ---------------------------------------------------------------------------- fan-out

@dataclass
class Fanout:
    """Per spiking layer: F (float64, flattened neuron order) and the analog layers."""
    layers: list[str]
    fanout: list[torch.Tensor]            # F(p) per neuron, float64 integers
    analog_macs: dict[str, int]           # synaptic layers fed by the image: MACs per image per step

    @property
    def neurons(self) -> list[int]:
        return [int(f.numel()) for f in self.fanout]


def _adaptive_windows(n: int, out: int) -> torch.Tensor:
    return torch.tensor([math.ceil((i + 1) * n / out) - (i * n) // out for i in range(out)], dtype=torch.float64)


class _OnesMode(TorchFunctionMode):
    """The network with every weight one, BN and dropout identities and average pooling
    as sum pooling; synaptic layers record their output sum and cut the graph."""

    SYNAPTIC = {F.conv1d, F.conv2d, torch.conv1d, torch.conv2d, F.linear}
    PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.div,
                torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.mul_, torch.Tensor.__imul__}

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.endpoints: list[torch.Tensor] = []
        self.analog: list[tuple[int, int]] = []  # (id of weight, MACs)
        self.names = names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.SYNAPTIC:
            x, w = args[0], args[1]
            args = (x, torch.ones_like(w, dtype=x.dtype), None, *args[3:])
            kwargs.pop("bias", None)
            y = func(*args, **kwargs)
            self.endpoints.append(y.sum())
            if not x.requires_grad:  # fed by the analog input only
                self.analog.append((id(w), self._macs(func, w, y)))
            return y.detach().clone()
        if func is F.batch_norm or func is F.dropout or func is F.dropout2d:
            return args[0]
        if func is F.avg_pool2d:  # sum pooling: every window a spike falls in gets it once
            args = args[:6]
            kwargs["divisor_override"] = 1
            return func(*args, **kwargs)
        if func is F.adaptive_avg_pool2d:
            x = args[0]
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            oh = size[0] if size[0] is not None else x.shape[-2]
            ow = size[1] if size[1] is not None else x.shape[-1]
            area = torch.outer(_adaptive_windows(x.shape[-2], oh), _adaptive_windows(x.shape[-1], ow))
            return func(*args, **kwargs) * area.to(x.dtype).to(x.device)
        if func in self.PRODUCTS:
            # scaling by a constant (x * 0.5, a layer-scale parameter) keeps the connections
            out = func(*args, **kwargs)
            sig = [a for a in args[:2] if isinstance(a, torch.Tensor) and a.requires_grad]
            if len(sig) == 1 and not all(isinstance(a, torch.Tensor) and a.requires_grad for a in args[:2]):
                return sig[0] + torch.zeros_like(out)
            return out
        if func in (torch.mean, torch.Tensor.mean):
            return torch.sum(*args, **kwargs) if func is torch.mean else torch.Tensor.sum(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _macs(func, w, y) -> int:
        if func is F.linear:
            return int(w.shape[0] * w.shape[1] * (y[0].numel() // w.shape[0]))
        return int(y[0].numel() * w.shape[1] * math.prod(w.shape[2:]))


def synaptic_fanout(snn, input_shape: Sequence[int]) -> Fanout:
    """F(p) for every neuron of every spiking layer of `snn` (a SpikingNet), and the MACs
    of the layers fed by the analog input (module docstring)."""
    net = snn.net
    names = {id(m.weight): n for n, m in net.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    leaves: dict[int, torch.Tensor] = {}
    mode = _OnesMode(names)

    def probe(i):
        def forward(x):
            mode.endpoints.append(x.sum())
            s = torch.ones_like(x).requires_grad_(True)
            leaves[i] = s
            return s * 1.0
        return forward

    for i, n in enumerate(snn.neurons):
        n.forward = probe(i)
    try:
        p = next(net.parameters())
        x = torch.ones(1, *input_shape, dtype=torch.float64, device=p.device)
        with torch.enable_grad(), mode:
            y = net(x)
            total = sum(mode.endpoints) + y.sum()
        if total.requires_grad:
            total.backward()
    finally:
        for n in snn.neurons:
            del n.forward  # back to the class's forward
        snn.reset()
    fanout = []
    for i, (name, n) in enumerate(zip(snn.layer_names, snn.neurons)):
        s = leaves.get(i)
        if s is None:
            raise EnergyError(f"spiking layer '{name}' was not reached when counting synapses")
        g = s.grad if s.grad is not None else torch.zeros_like(s)
        g = g.detach().flatten()
        if not torch.equal(g, g.round()):
            raise EnergyError(f"non-integer fan-out for '{name}': an op between it and the next synaptic layer "
                              "scales spikes in a way the counter does not know (e.g. a functional average)")
        fanout.append(g)
    analog = {names.get(wid, f"<weight {k}>"): macs for k, (wid, macs) in enumerate(mode.analog)}
    return Fanout(list(snn.layer_names), fanout, analog)


# ---------------------------------------------------------------------------- recording

class EnergyRecorder:
    """Counts spikes and SOPs per layer and per step while `SpikingNet.simulate` runs.
    `attach(snn)` computes the fan-out and hooks the
    IF neurons (use it with `convert.observe_conversions`); `detach()` removes the hooks;
    `summary()` builds result.json's block."""

    def __init__(self, input_shape: Sequence[int], T_max: int, constants: EnergyConstants = EnergyConstants()):
        self.input_shape = tuple(int(s) for s in input_shape)
        self.T_max = int(T_max)
        self.constants = constants
        self.fan: Fanout | None = None
        self._acc: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self.n_images = 0
        self.error: str | None = None
        self._hooks: list = []

    def attach(self, snn) -> None:
        """Compute the fan-out and hook `snn`'s IF neurons. A network whose synapses cannot
        be counted (EnergyError) is not hooked: `summary()` then reports the error, and
        the evaluation itself goes on."""
        self.detach()
        self.error = None
        try:
            self.fan = synaptic_fanout(snn, self.input_shape)
        except EnergyError as e:
            self.fan, self.error = None, str(e)
            return
        dev = self.fan.fanout[0].device
        # per layer: [N, 2] = (1, F(p)); counts [k, N] @ it = (spikes, SOPs) per step, in float64
        self._weights = [torch.stack([torch.ones_like(f), f], 1) for f in self.fan.fanout]
        self._acc = [torch.zeros(self.T_max, 2, dtype=torch.float64, device=dev) for _ in self.fan.fanout]
        self.n_images = 0
        for i, n in enumerate(snn.neurons):
            self._hooks.append(n.register_forward_hook(self._hook(i)))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _hook(self, i: int):
        weights, acc = self._weights[i], self._acc[i]

        def hook(mod: IFNeuron, inputs, out: torch.Tensor) -> None:
            k = mod.steps
            t1 = mod.t
            t0 = t1 - k
            if t1 > self.T_max:
                raise EnergyError(f"simulation ran {t1} steps; the recorder was made for T_max = {self.T_max}")
            B = out.shape[0] // k
            if i == 0 and t0 == 0:
                self.n_images += B
            # images in which each neuron fired, per step: [k, N]. The output is 0 or theta, so
            # a sum over the batch divided by theta is the count; rounding makes it exact (the
            # float32 sum of at most B thetas is off by far less than 1/2). A float sum over the
            # batch is one pass; count_nonzero(dim=1) measured ~15x slower on CPU.
            y = out.reshape(k, B, -1)
            if y.dtype in (torch.float16, torch.bfloat16):
                y = y.float()
            theta = mod.theta.to(device=y.device, dtype=y.dtype)
            counts = y.sum(1).div_(theta).round_()
            acc[t0:t1] += counts.to(torch.float64) @ weights
        return hook

    # -- results

    @property
    def spikes(self) -> list[torch.Tensor]:
        return [a[:, 0] for a in self._acc]

    @property
    def sops(self) -> list[torch.Tensor]:
        return [a[:, 1] for a in self._acc]

    def per_step(self) -> dict[str, Any]:
        """Per layer, per step (0-based), summed over all images: spikes and SOPs."""
        return {"spikes": [s.cpu() for s in self.spikes], "sops": [s.cpu() for s in self.sops]}

    def summary(self, Ts: Sequence[int], ann_macs: int) -> dict[str, Any]:
        """result.json's `energy` block (per image; see module docstring). When the synapses
        could not be counted: {"error": message, "ann_macs": ..., "ann_uJ": ...}."""
        if self.error is not None:
            return dict(error=self.error, ann_macs=int(ann_macs), ann_uJ=self.constants.e_mac_pJ * ann_macs * 1e-6)
        if self.fan is None or self.n_images == 0:
            raise EnergyError("nothing was recorded (attach the recorder and simulate first)")
        c = self.constants
        n = self.n_images
        first = int(sum(self.fan.analog_macs.values()))
        cum_spk = [torch.cumsum(s.cpu(), 0) for s in self.spikes]
        cum_sop = [torch.cumsum(s.cpu(), 0) for s in self.sops]
        neurons = self.fan.neurons
        ann_uJ = c.e_mac_pJ * ann_macs * 1e-6
        by_T, per_layer = {}, {}
        for T in sorted(set(int(t) for t in Ts)):
            if not 1 <= T <= self.T_max:
                raise EnergyError(f"T = {T} outside the recorded 1..{self.T_max}")
            spk = [float(s[T - 1]) / n for s in cum_spk]
            sop = [float(s[T - 1]) / n for s in cum_sop]
            macs = first * (T if c.first_layer_every_step else 1)
            uJ = (c.e_mac_pJ * macs + c.e_ac_pJ * sum(sop)) * 1e-6
            by_T[str(T)] = dict(spikes=sum(spk), sops=sum(sop), macs=macs, uJ=uJ,
                                ratio_to_ann=uJ / ann_uJ if ann_uJ > 0 else None,
                                firing_rate=sum(spk) / (sum(neurons) * T))
            per_layer[str(T)] = dict(spikes=spk, sops=sop, firing_rate=[s / (N * T) for s, N in zip(spk, neurons)])
        return dict(
            constants=asdict(c), n_images=n, ann_macs=int(ann_macs), ann_uJ=ann_uJ,
            analog_layers=dict(self.fan.analog_macs), first_layer_macs=first,
            layers=list(self.fan.layers), neurons=neurons,
            synapses=[int(f.sum()) for f in self.fan.fanout],
            T=sorted(set(int(t) for t in Ts)), by_T=by_T, per_layer=per_layer,
            method=("SOPs = spikes x fan-out (synapses driven, exact at borders/strides; identity shortcuts "
                    "count one per spike; pooling forwards a spike to every window holding it); analog-input "
                    "layers are MACs" + (" at every step" if c.first_layer_every_step else " once")),
        )
