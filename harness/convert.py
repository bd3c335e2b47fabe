"""ANN -> SNN conversion and simulation.

`to_snn(model)` deep-copies the ANN, puts it in eval mode (BN is then affine) and
replaces every NQ/QCFS activation by an IF neuron with theta = lambda and
v(0) = v0 * theta. The ANN is not touched.

Before converting, `check_convertible` proves that nothing but NQ/QCFS is nonlinear:
  1. module inspection: every leaf module is NQ/QCFS or known to be linear/affine in
     eval mode (max-pooling, ReLU, SiLU, GELU, ... are refused by name);
  2. tracing (torch.fx): the forward methods are traced with NQ/QCFS as leaves, so a
     functional op that module inspection cannot see (`F.relu(x)` inside a forward,
     `q @ k.transpose(-2, -1)`, `x * gate`) is found and refused with the module path of
     the forward that calls it. When a plain symbolic trace fails, tracing is repeated
     with a concrete example input propagated alongside the symbolic one (`trace`), so
     forwards that branch on shapes (timm's VGG head) trace too. A model that cannot be
     traced is refused: its forward cannot be checked. An NQ module called at two
     places would share one membrane state in the SNN; that is refused as well.
  Custom leaf modules (no children, not from torch.nn) pass module inspection and are
  judged by their traced forward.

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
import operator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import BAD_INPUT, HarnessError
from .neurons import NQ, IFNeuron

__all__ = ["to_snn", "SpikingNet", "ConversionError", "activation_layers", "check_convertible", "trace",
           "example_input", "observe_conversions", "chunk_images", "simulation_chunk"]

_OBSERVERS: ContextVar[tuple] = ContextVar("harness_conversion_observers", default=())


@contextmanager
def observe_conversions(fn: Callable[["SpikingNet"], None]) -> Iterator[None]:
    """Within the block, every SpikingNet that `to_snn` returns is first passed to
    `fn` (e.g. `EnergyRecorder.attach`, to count the spikes of an evaluation that converts
    the model itself)."""
    token = _OBSERVERS.set(_OBSERVERS.get() + (fn,))
    try:
        yield
    finally:
        _OBSERVERS.reset(token)

# Leaf modules that are linear/affine in eval mode (or identity): safe in an SNN.
_SAFE_LEAVES = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.Sequential,  # empty = identity
)
_REASONS = {
    nn.MaxPool2d: "max-pooling of spike trains is not equivalent to max-pooling of rates; use AvgPool2d",
    nn.AdaptiveMaxPool2d: "max-pooling of spike trains is not equivalent to max-pooling of rates",
    nn.ReLU: "an activation that was never replaced by NQ/QCFS has no IF counterpart",
    nn.MultiheadAttention: "attention multiplies two activations; IF neurons only sum weighted spikes",
}


class ConversionError(HarnessError, ValueError):
    """A module that has no faithful IF counterpart (bad input: exit 2)."""

    kind = "conversion error"
    exit_code = BAD_INPUT


def activation_layers(model: nn.Module) -> list[tuple[str, NQ]]:
    """The (name, module) of every NQ/QCFS activation, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NQ)]


def _check_modules(model: nn.Module) -> None:
    """Module inspection: leaves from torch.nn must be safe; custom leaves are left to
    the trace (their forward is traced into)."""
    for name, m in model.named_modules():
        if isinstance(m, (NQ, IFNeuron)) or len(list(m.children())) > 0:
            continue
        if isinstance(m, _SAFE_LEAVES):
            continue
        reason = next((r for t, r in _REASONS.items() if isinstance(m, t)), None)
        if reason is None and not _is_torch_nn(m):
            continue  # a custom module without children: `_check_traced` reads its forward
        if reason is None:
            reason = ("activation that was never replaced by NQ/QCFS has no IF counterpart"
                      if "activation" in type(m).__module__ else
                      "not known to be linear or affine in eval mode")
        raise ConversionError(f"cannot convert module '{name}' ({type(m).__name__}): {reason}")


def _is_torch_nn(m: nn.Module) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


# ---------------------------------------------------------------------------- tracing

class _ValueProxy(torch.fx.Proxy):
    """A Proxy that carries the concrete value computed for it (or None), so that
    `x.shape`, `x.size()`, `x.dim()` are plain Python values during tracing."""

    def _value(self):
        return self.__dict__.get("value")

    @property
    def shape(self):
        v = self._value()
        if isinstance(v, torch.Tensor):
            return v.shape
        return self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})

    @property
    def ndim(self):
        v = self._value()
        if isinstance(v, torch.Tensor):
            return v.ndim
        return self.tracer.create_proxy("call_function", getattr, (self, "ndim"), {})

    @property
    def dtype(self):
        v = self._value()
        if isinstance(v, torch.Tensor):
            return v.dtype
        return self.tracer.create_proxy("call_function", getattr, (self, "dtype"), {})

    def size(self, dim=None):
        v = self._value()
        if isinstance(v, torch.Tensor):
            return v.size() if dim is None else v.size(dim)
        return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})

    def dim(self):
        v = self._value()
        if isinstance(v, torch.Tensor):
            return v.dim()
        return self.tracer.create_proxy("call_method", "dim", (self,), {})


class Tracer(torch.fx.Tracer):
    """torch.fx tracer with NQ/QCFS and IF neurons as leaves. With an example input it
    also computes every node's concrete value (`values`, node name -> value), so that
    shape-dependent Python control flow resolves as it would at run time. Leaf NQ/IF
    modules pass their input's value through (the shapes are what matters)."""

    def __init__(self, example: torch.Tensor | None = None):
        super().__init__()
        self.example = example
        self.values: dict[str, Any] = {}
        self._concrete = False
        self._placeholder_seen = False

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (NQ, IFNeuron)) or super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._concrete:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._concrete:
            return forward(*args, **kwargs)
        self._forward = forward
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        rv = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                  proxy_factory_fn or (lambda node: _ValueProxy(node, self)))
        if self.example is None or not isinstance(rv, _ValueProxy):
            return rv
        value = None
        try:
            a = torch.fx.node.map_aggregate(args, _concrete_value)
            kw = torch.fx.node.map_aggregate(kwargs, _concrete_value)
            if not any(v is _UNKNOWN for v in _flat(a) + _flat(kw)):
                self._concrete = True
                try:
                    value = self._evaluate(kind, target, a, kw)
                finally:
                    self._concrete = False
        except Exception:  # noqa: BLE001 - a value we cannot compute stays symbolic
            value = None
        rv.value = value
        self.values[rv.node.name] = value
        return rv

    def _evaluate(self, kind, target, args, kwargs):
        if kind == "placeholder":
            first, self._placeholder_seen = not self._placeholder_seen, True
            return self.example if first else None
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            mod = self.root.get_submodule(target)
            if isinstance(mod, (NQ, IFNeuron)):
                return args[0]
            return self._forward(*args, **kwargs)
        if kind == "get_attr":
            obj = self.root
            for atom in str(target).split("."):
                obj = getattr(obj, atom)
            return obj
        return None


_UNKNOWN = object()


def _concrete_value(a):
    if isinstance(a, _ValueProxy):
        v = a.__dict__.get("value")
        return _UNKNOWN if v is None else v
    if isinstance(a, torch.fx.Proxy):
        return _UNKNOWN
    return a


def _flat(tree) -> list:
    out: list = []
    torch.fx.node.map_aggregate(tree, lambda v: out.append(v) or v)
    return out


def example_input(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """A batch of one input for tracing: `input_shape` (without batch), else the model's
    timm `pretrained_cfg['input_size']`, else (in_channels of the first conv, 32, 32) or
    (in_features of the first linear layer,). None when nothing says."""
    if input_shape is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_shape = cfg.get("input_size")
    if input_shape is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if isinstance(first, nn.Conv2d):
            input_shape = (first.in_channels, 32, 32)
        elif isinstance(first, nn.Linear):
            input_shape = (first.in_features,)
    if input_shape is None:
        return None
    p = next(iter(model.parameters()), None)
    return torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)


class _TraceGuard:
    """torch.fx tracing patches ``nn.Module.__call__`` for the whole process while it
    runs, so a forward pass in another thread meanwhile goes through the tracer and
    fails ("module is not installed as a submodule"). Forward passes that may run
    beside a conversion in the same process (the calibration actor's concurrent
    calibrations) hold :meth:`forward`, one batch at a time; a trace holds :meth:`trace`
    alone. A waiting trace goes before new forward passes, so it waits one batch at
    most."""

    def __init__(self):
        import threading
        self._cond = threading.Condition()
        self._forwards = 0
        self._tracing = False
        self._waiting = 0

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._tracing and not self._waiting)
            self._forwards += 1
        try:
            yield
        finally:
            with self._cond:
                self._forwards -= 1
                self._cond.notify_all()

    @contextmanager
    def trace(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._tracing and not self._forwards)
            self._waiting -= 1
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


TRACE_GUARD = _TraceGuard()

# Images per simulated chunk on CPU: a layer's largest tensor (activation, membrane
# potential, output sum) at about CHUNK_BYTES, so a step's tensors stay in the cache between
# the convolution, the IF step and what reads them, instead of streaming through memory.
# ResNet-20 (largest layer 64 KiB per image: chunks of 128), 2 cores: an SNN evaluation at
# T = 8 of 1,024 images took 9.4 s in batches of 512 and 5.0 s in chunks of 128 (the same
# outputs), calibration at tau = 4 1.6x its ideal against 1.2x (benchmarks/calibration.py).
CHUNK_BYTES = 8 << 20
CHUNK_MIN = 16


def chunk_images(largest_bytes: int, batch: int, device: torch.device | str) -> int:
    """Images per chunk for a batch of `batch` whose largest layer tensor takes
    `largest_bytes` per image: cache-sized on CPU (above), the whole batch elsewhere."""
    if torch.device(device).type != "cpu":
        return batch
    return max(CHUNK_MIN, min(batch, CHUNK_BYTES // max(largest_bytes, 1)))


@torch.no_grad()
def simulation_chunk(model: nn.Module, x: torch.Tensor) -> int:
    """`chunk_images` for batches like `x` through `model` (an ANN with NQ/QCFS layers;
    one image's forward pass measures its activations)."""
    if x.device.type != "cpu":
        return x.shape[0]
    sizes: list[int] = []
    was_training = model.training
    model.eval()
    hooks = [a.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel() * o.element_size()))
             for _, a in activation_layers(model)]
    try:
        with TRACE_GUARD.forward():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return chunk_images(max(sizes, default=1), x.shape[0], x.device)


def trace(model: nn.Module, example: torch.Tensor | None = None) -> tuple[torch.fx.Graph, Tracer]:
    """Trace `model` (NQ/QCFS and IF neurons as leaves). With `example` every node's
    concrete value is kept in `tracer.values`. The model should be in eval mode (leaf
    modules run on the example: BN in train mode would update its statistics). Holds
    :data:`TRACE_GUARD` while it traces."""
    tracer = Tracer(example)
    with TRACE_GUARD.trace(), torch.no_grad():
        graph = tracer.trace(model)
    return graph, tracer


# Functions / methods that are linear (or affine with constant operands) in the tensors
# they get, or only move data: an SNN computes them on rates exactly.
_LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, operator.iadd, operator.isub,
    torch.add, torch.sub, torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.mean,
    torch.sum, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split,
    torch.narrow, torch.unbind, torch.movedim, torch.conv2d, torch.conv1d, F.conv1d, F.conv2d, F.linear, F.batch_norm, F.avg_pool1d,
    F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.dropout, F.pad, F.interpolate,
    getattr, torch.Tensor.size, torch.Tensor.dim, len, int, float,
}
_LINEAR_METHODS = {
    "add", "add_", "sub", "sub_", "neg", "flatten", "view", "reshape", "permute", "transpose", "contiguous",
    "mean", "sum", "size", "dim", "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split", "narrow",
    "clone", "to", "float", "double", "half", "type_as", "view_as", "reshape_as", "repeat", "__getitem__",
    "unbind", "movedim", "select", "t",
}
# bilinear in their two tensor operands: linear when one of them is a constant
_PRODUCTS = {operator.mul, operator.imul, operator.truediv, operator.itruediv, operator.matmul, torch.mul,
             torch.div, torch.matmul, torch.bmm, torch.mm, torch.einsum}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_", "matmul", "bmm", "mm"}
_OP_REASONS = {
    "relu": "a functional ReLU has no IF counterpart (use an NQ/QCFS module, which conversion replaces)",
    "max_pool": "max-pooling of spike trains is not equivalent to max-pooling of rates",
    "softmax": "softmax (attention) has no IF counterpart",
    "attention": "attention multiplies two activations; IF neurons only sum weighted spikes",
}


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional") or any(t is v for k, v in vars(F).items() if k == name):
        return f"F.{name}"
    if mod == "_operator" or mod == "operator":
        return f"operator.{name}"
    return f"torch.{name}" if mod.startswith("torch") or not mod else f"{mod}.{name}"


def _op_reason(name: str) -> str:
    low = name.lower()
    for key, reason in _OP_REASONS.items():
        if key in low:
            return reason
    if any(k in low for k in ("gelu", "silu", "sigmoid", "tanh", "hardswish", "elu", "mish", "softplus",
                              "leaky", "relu6", "hardtanh", "clamp", "clip", "exp", "log", "sqrt", "abs",
                              "max", "min", "norm")):
        return "a nonlinear op that was never replaced by NQ/QCFS has no IF counterpart"
    return "not known to be linear; a functional nonlinearity has no IF counterpart"


def _check_traced(model: nn.Module, graph: torch.fx.Graph, tracer: Tracer) -> None:
    depends: dict[torch.fx.Node, bool] = {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        ins = [a for a in node.all_input_nodes]
        depends[node] = node.op == "placeholder" or any(depends.get(a, False) for a in ins)
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        path = tracer.node_name_to_scope.get(node.name, ("", None))[0]
        where = f"'{path}'" if path else f"'' (the forward of {type(model).__name__})"
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            if isinstance(m, (NQ, IFNeuron)):
                calls[node.target] = calls.get(node.target, 0) + 1
                if calls[node.target] > 1:
                    raise ConversionError(
                        f"cannot convert module '{node.target}' ({type(m).__name__}): it is called more than once "
                        "in forward; an IF neuron keeps one membrane state per call site, so each call needs "
                        "its own activation module")
                continue
            if isinstance(m, _SAFE_LEAVES):
                continue
            reason = next((r for t, r in _REASONS.items() if isinstance(m, t)), None) or (
                "activation that was never replaced by NQ/QCFS has no IF counterpart"
                if "activation" in type(m).__module__ else "not known to be linear or affine in eval mode")
            raise ConversionError(f"cannot convert module '{node.target}' ({type(m).__name__}): {reason}")
        # call_function / call_method: only if it touches an activation
        if not depends[node]:
            continue
        name = _op_name(node)
        if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
            continue
        if node.op == "call_method" and node.target in _LINEAR_METHODS:
            continue
        if (node.op == "call_function" and node.target in _PRODUCTS) or (
                node.op == "call_method" and node.target in _PRODUCT_METHODS):
            if sum(1 for a in ins if depends.get(a, False)) <= 1:
                continue  # scaling by a constant is linear
            raise ConversionError(f"cannot convert module {where} ({name} of two activations in its forward): "
                                  f"{_OP_REASONS['attention']}")
        raise ConversionError(f"cannot convert module {where} ({name} in its forward): {_op_reason(name)}")


def check_convertible(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
    """Raise ConversionError unless every op of `model` other than NQ/QCFS is linear or
    affine in eval mode (module docstring). `model` must be in eval mode: when a plain
    symbolic trace fails it is run once on a zero input of `input_shape` (`example_input`)."""
    _check_modules(model)
    try:  # symbolic first (no compute); concrete values only for forwards that branch on shapes
        graph, tracer = trace(model, None)
    except Exception:  # noqa: BLE001
        graph = None
    try:
        if graph is None:
            graph, tracer = trace(model, example_input(model, input_shape))
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(f"cannot convert {type(model).__name__}: torch.fx cannot trace its forward "
                              f"({type(e).__name__}: {first}), so functional ops in it cannot be checked") from None
    _check_traced(model, graph, tracer)


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

    def set_record(self, on: bool | str) -> None:
        """False, True (sums of input and output) or "out" (the fused output sum); see IFNeuron."""
        if on not in (False, True, "out"):
            raise ValueError(f"record = {on!r} (expected False, True or 'out')")
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
                 layout: str = "auto", record: bool | str = False) -> torch.Tensor:
        """Simulate T steps with the image as constant input. Returns [T, B, classes],
        row t-1 = mean output over the first t steps. State is reset first.
        `record=True` keeps per-neuron sums of input and output, `record="out"` the sum
        of the output only, inside the step's kernel (see IFNeuron)."""
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


def to_snn(model: nn.Module, v0: float = 0.5, input_shape: tuple[int, ...] | None = None) -> SpikingNet:
    """Convert an ANN with NQ/QCFS activations into a separate SpikingNet.
    `input_shape` (C, H, W) is the example input for the trace (`example_input`)."""
    _check_modules(model)
    acts = activation_layers(model)
    if not acts:
        raise ConversionError("cannot convert: the model has no NQ/QCFS activation")
    net = copy.deepcopy(model).eval()
    check_convertible(net, input_shape)
    for name, act in acts:
        lam = act.lam.detach()
        if not bool(lam > 0):
            raise ConversionError(f"cannot convert module '{name}': lambda = {lam.item():.4g} "
                                  "(expected > 0; an IF threshold must be positive)")
        _set_module(net, name, IFNeuron(theta=lam.float().cpu(), v0=v0).to(lam.device))
    for p in net.parameters():
        p.requires_grad_(False)
    snn = SpikingNet(net, [n for n, _ in acts]).eval()
    for fn in _OBSERVERS.get():
        fn(snn)
    return snn
