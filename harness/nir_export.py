"""Export a converted SNN as a NIR graph (https://neuroir.org, the `nir` package).

    g = to_nir(to_snn(model), input_shape=(3, 32, 32))      # a nir.NIRGraph
    export_nir(to_snn(model), "net.nir", (3, 32, 32))       # written with nir.write
    export_run("runs/x", "net.nir")                          # best.pt of a run (`harness export-nir`)

Mapping (the SNN's forward is traced with torch.fx; every node of the trace becomes
NIR nodes and edges):
  - input                 -> Input (C, H, W): the normalised image, the same analog current
                             at every step (no encoding)
  - Conv2d (+ BatchNorm)  -> Conv2d with bias; eval-mode BN is folded into the conv
  - Linear (+ BatchNorm1d)-> Affine
  - BatchNorm alone       -> Conv2d 1x1 depthwise with bias (exact)
  - AvgPool2d / AdaptiveAvgPool2d -> SumPool2d; the 1/(kernel area) goes into the next
                             layer's weights (exact with count_include_pad or no padding)
  - Flatten               -> Flatten (NIR dims: no batch, so torch's start_dim 1 is 0)
  - residual add          -> several edges into one node (NIR sums incoming edges)
  - IF neuron             -> IF with r = 1, v_threshold = lambda, v_reset = 0
  - the output layer      -> Output (logits of one step; the prediction is their mean)
Spike magnitude: our IF neuron emits lambda per spike; the exported IF emits 1 and every
synaptic layer it feeds carries lambda in its weights. Where the spikes reach a neuron
without a synaptic layer (an identity shortcut), a Scale node (lambda) sits on the edge.

Semantics. NIR's IF integrates dv/dt = R I, fires when v > v_threshold and then resets
v to v_reset; it has no initial state (v(0) = 0) and leaves the time step to the
reader. Ours is discrete (dt = 1): v[t] = v[t-1] + I[t], fires when v >= theta, resets
by subtraction (v -= theta, keeping the surplus) and starts at v(0) = theta / 2. Every
IF node records ours in its metadata:
    harness.reset = "subtract", harness.v_init = theta / 2 (harness.v_init_fraction = 0.5),
    harness.fire_condition = ">=", harness.dt = 1.0, harness.lambda = theta,
    harness.layer = the module name, harness.spike = "1 (weights carry lambda)"
and the graph's metadata names the convention (harness.semantics = "harness-if-v1") and
the input (mean, std) and output (per-step logits, averaged) conventions. A reader that
honours these reproduces `SpikingNet.simulate` (tests/test_nir.py does, to float
rounding). A reader that applies NIR's defaults computes a different network:
  - hard reset to 0 throws away the surplus charge above threshold at every spike: the
    rate becomes a floor-like function of the input with a large systematic error (the
    conversion error that reset by subtraction exists to avoid); this is the largest gap.
  - v(0) = 0 instead of theta/2: every neuron fires later; the average output over T
    steps is shifted by up to half a quantisation step (QCFS's +0.5 shift is undone).
    It cannot be fixed with a bias: theta/2 arrives once, at t = 1, and a constant
    bias would add it at every step. A reader without an initial state can only
    approximate it (e.g. by an extra first step with a theta/2 input, which shifts time).
  - fires on > instead of >=: differs only when v equals the threshold exactly. With
    real-valued inputs that has probability zero, but quantised or low-precision weights
    and inputs (and thresholds that are multiples of the input step) can hit it.
"""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .convert import SpikingNet, to_snn, trace
from .errors import BAD_INPUT, HarnessError
from .neurons import IFNeuron

__all__ = ["to_nir", "export_nir", "export_run", "ExportError", "SEMANTICS"]

SEMANTICS = "harness-if-v1"


class ExportError(HarnessError):
    kind = "NIR export error"
    exit_code = BAD_INPUT


@dataclass
class _Term:
    node: str           # NIR node whose output this is
    scale: float        # the true signal is scale * the node's output
    foldable: bool      # node is an Affine / Conv2d we made, used only here: scales may go into it


@dataclass
class _Expr:
    terms: list[_Term]
    shape: tuple[int, ...]      # per sample (no batch)


@dataclass
class _Builder:
    dtype: Any
    nodes: dict[str, Any] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # weight / bias of Conv2d / Affine
    kinds: dict[str, str] = field(default_factory=dict)

    def name(self, base: str) -> str:
        base = base or "node"
        if base not in self.nodes and base not in self.params:
            return base
        i = 1
        while f"{base}_{i}" in self.nodes or f"{base}_{i}" in self.params:
            i += 1
        return f"{base}_{i}"

    def arr(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
        return np.asarray(x, dtype=np.float64)

    # -- synaptic nodes are built last (their weights may still absorb scales)
    def synapse(self, base: str, kind: str, weight: np.ndarray, bias: np.ndarray, **conf) -> str:
        n = self.name(base)
        self.params[n] = dict(weight=weight, bias=bias, **conf)
        self.kinds[n] = kind
        self.nodes[n] = None  # placeholder, made in finish()
        return n

    def fold(self, node: str, scale: float) -> None:
        p = self.params[node]
        p["weight"] = p["weight"] * scale
        p["bias"] = p["bias"] * scale

    def sink(self, expr: _Expr, dst: str) -> None:
        """Edges from every term of `expr` into `dst`, with each term's scale applied:
        folded into its synaptic node where possible, else by a Scale node."""
        for t in expr.terms:
            src = t.node
            if t.scale != 1.0:
                if t.foldable and src in self.params:
                    self.fold(src, t.scale)
                else:
                    s = self.name(f"{src}.scale")
                    self.nodes[s] = ("Scale", np.full(expr.shape, t.scale))
                    self.edges.append((src, s))
                    src = s
            self.edges.append((src, dst))

    def finish(self, metadata: dict) -> "Any":
        import nir
        out = {}
        for n, spec in self.nodes.items():
            if spec is None:
                p, kind = self.params[n], self.kinds[n]
                w, b = p["weight"].astype(self.dtype), p["bias"].astype(self.dtype)
                meta = p.get("metadata", {})
                if kind == "Affine":
                    out[n] = nir.Affine(weight=w, bias=b, metadata=meta)
                else:
                    out[n] = nir.Conv2d(input_shape=p["input_shape"], weight=w, stride=p["stride"],
                                        padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
                                        bias=b, metadata=meta)
            elif isinstance(spec, tuple) and spec[0] == "Scale":
                out[n] = nir.Scale(scale=spec[1].astype(self.dtype))
            else:
                out[n] = spec
        return nir.NIRGraph(nodes=out, edges=list(self.edges), metadata=metadata, type_check=True)


def _shape(value) -> tuple[int, ...]:
    if not isinstance(value, torch.Tensor):
        raise ExportError("a traced value has no tensor shape")
    return tuple(int(s) for s in value.shape[1:])


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _flatten(b: _Builder, expr: _Expr, start: int, end: int, out_shape, base: str) -> _Expr:
    import nir
    if start < 1:
        raise ExportError(f"'{base}': flattening the batch dimension has no NIR counterpart")
    nstart = start - 1
    nend = end - 1 if end > 0 else end
    terms = []
    for t in expr.terms:
        n = b.name(base)
        b.nodes[n] = nir.Flatten(input_type={"input": np.array(expr.shape)}, start_dim=nstart, end_dim=nend)
        b.edges.append((t.node, n))
        terms.append(_Term(n, t.scale, False))
    return _Expr(terms, tuple(out_shape))


def _pool(b: _Builder, expr: _Expr, k, s, p, out_shape, base: str) -> _Expr:
    import nir
    k, s, p = _pair(k), _pair(s), _pair(p)
    terms = []
    for t in expr.terms:
        n = b.name(base)
        b.nodes[n] = nir.SumPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p))
        b.edges.append((t.node, n))
        terms.append(_Term(n, t.scale / (k[0] * k[1]), False))
    return _Expr(terms, tuple(out_shape))


def _conv_like(b: _Builder, expr: _Expr, m: nn.Module, out_shape, base: str) -> _Expr:
    """Conv2d / Linear: one synaptic node per input term (linear), bias on the first."""
    w = b.arr(m.weight)
    bias = b.arr(m.bias) if m.bias is not None else np.zeros(w.shape[0])
    terms = []
    for i, t in enumerate(expr.terms):
        bb = bias if i == 0 else np.zeros_like(bias)
        if isinstance(m, nn.Linear):
            n = b.synapse(base, "Affine", w * t.scale, bb)
        else:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ExportError(f"'{base}': only zero padding given as numbers is exported")
            n = b.synapse(base, "Conv2d", w * t.scale, bb, input_shape=expr.shape[1:], stride=_pair(m.stride),
                          padding=_pair(m.padding), dilation=_pair(m.dilation), groups=int(m.groups))
        b.edges.append((t.node, n))
        terms.append(_Term(n, 1.0, True))
    return _Expr(terms, tuple(out_shape))


def _batchnorm(b: _Builder, expr: _Expr, m: nn.Module, base: str) -> _Expr:
    g = b.arr(m.weight) if m.weight is not None else np.ones(m.num_features)
    beta = b.arr(m.bias) if m.bias is not None else np.zeros(m.num_features)
    mean = b.arr(m.running_mean)
    inv = 1.0 / np.sqrt(b.arr(m.running_var) + m.eps)
    a = g * inv                          # per channel scale
    c = beta - mean * a                  # per channel offset
    terms = []
    for i, t in enumerate(expr.terms):
        if t.foldable and t.node in b.params:
            p = b.params[t.node]
            k = a * t.scale
            p["weight"] = p["weight"] * k.reshape((-1,) + (1,) * (p["weight"].ndim - 1))
            p["bias"] = p["bias"] * k + (c if i == 0 else 0.0)
            p.setdefault("metadata", {})["harness.folded_batchnorm"] = base
            terms.append(_Term(t.node, 1.0, True))
            continue
        # BN on something that is not ours to fold: a depthwise 1x1 conv (or a diagonal Affine)
        C = m.num_features
        off = c if i == 0 else np.zeros(C)
        if len(expr.shape) == 1:
            n = b.synapse(f"{base}.affine", "Affine", np.diag(a * t.scale), off)
        else:
            n = b.synapse(f"{base}.affine", "Conv2d", (a * t.scale).reshape(C, 1, 1, 1), off,
                          input_shape=expr.shape[1:], stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=C)
        b.edges.append((t.node, n))
        terms.append(_Term(n, 1.0, True))
    return _Expr(terms, expr.shape)


def _if_node(b: _Builder, expr: _Expr, m: IFNeuron, base: str) -> _Expr:
    import nir
    theta = float(m.theta)
    n = b.name(base)
    shape = expr.shape
    meta = {"harness.reset": "subtract", "harness.v_init": theta * m.v0, "harness.v_init_fraction": float(m.v0),
            "harness.fire_condition": ">=", "harness.dt": 1.0, "harness.lambda": theta, "harness.layer": base,
            "harness.spike": "1 (the weights of the synaptic layers it feeds carry lambda)"}
    b.nodes[n] = nir.IF(r=np.ones(shape, dtype=b.dtype), v_threshold=np.full(shape, theta, dtype=b.dtype),
                        v_reset=np.zeros(shape, dtype=b.dtype), metadata=meta)
    b.sink(expr, n)
    return _Expr([_Term(n, theta, False)], shape)


GRAPH_NOTES = {  # how to read the graph, in its metadata
    "harness.neuron": "IF nodes: v[t] = v[t-1] + I[t] (dt = 1, r = 1); spike when v >= v_threshold; "
                      "then v -= v_threshold (reset by subtraction); v[0] = harness.v_init (theta/2); "
                      "spikes are 1, the weights they feed carry lambda",
    "harness.input": "the normalised image (x - mean) / std, the same analog input at every step",
    "harness.output": "logits of one step; the SNN's prediction at T is the mean of steps 1..T",
    "harness.time": "discrete steps; all nodes update within a step in edge order (no delays)"}


def _module_node(b: "_Builder", net: nn.Module, node, x: Any, val: Any) -> "_Expr":
    """The expression of a call_module node (its module applied to the signal `x`)."""
    m = net.get_submodule(node.target)
    base = str(node.target)
    if not isinstance(x, _Expr):
        raise ExportError(f"'{base}' gets no traced signal")
    if isinstance(m, IFNeuron):
        e = _if_node(b, x, m, base)
    elif isinstance(m, (nn.Conv2d, nn.Linear)):
        e = _conv_like(b, x, m, _shape(val), base)
    elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        e = _batchnorm(b, x, m, base)
    elif isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or (not m.count_include_pad and _pair(m.padding) != (0, 0)) \
                or m.divisor_override is not None:
            raise ExportError(f"'{base}': AvgPool2d with ceil_mode, divisor_override or padding "
                              "excluded from the count is not a uniform sum pool")
        e = _pool(b, x, m.kernel_size, m.stride if m.stride is not None else m.kernel_size,
                  m.padding, _shape(val), base)
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        H, W = x.shape[-2:]
        oh, ow = _shape(val)[-2:]
        if H % oh or W % ow:
            raise ExportError(f"'{base}': adaptive pooling {H}x{W} -> {oh}x{ow} has unequal windows")
        e = x if (oh, ow) == (H, W) else _pool(b, x, (H // oh, W // ow), (H // oh, W // ow), 0,
                                              _shape(val), base)
    elif isinstance(m, nn.Flatten):
        nd = len(x.shape) + 1
        e = _flatten(b, x, m.start_dim % nd, m.end_dim % nd if m.end_dim < 0 else m.end_dim,
                     _shape(val), base)
    elif isinstance(m, (nn.Dropout, nn.Identity)):
        e = x
    else:
        raise ExportError(f"'{base}' ({type(m).__name__}) has no NIR mapping here")
    return e


def _function_node(b: "_Builder", node, xs: list, val: Any, path: str) -> Any:
    """The expression of a call_function / call_method node with arguments `xs` (a plain
    value when no argument is a signal)."""
    t = node.target
    base = f"{path}.{node.name}" if path else node.name
    if not any(isinstance(a, _Expr) for a in xs):
        return val  # shapes, sizes: plain values
    if t in (operator.add, operator.iadd, torch.add) or t in ("add", "add_"):
        if not all(isinstance(a, _Expr) for a in xs[:2]) or node.kwargs.get("alpha", 1) != 1:
            raise ExportError(f"'{base}': only the sum of two signals is exported (a constant is a bias)")
        e = _Expr(xs[0].terms + xs[1].terms, xs[0].shape)
    elif t in (torch.flatten, "flatten"):
        start = xs[1] if len(xs) > 1 else node.kwargs.get("start_dim", 0)
        end = xs[2] if len(xs) > 2 else node.kwargs.get("end_dim", -1)
        nd = len(xs[0].shape) + 1
        e = _flatten(b, xs[0], start % nd, end % nd, _shape(val), base)
    elif t in ("view", "reshape") and len(_shape(val)) == 1:
        e = _flatten(b, xs[0], 1, len(xs[0].shape), _shape(val), base)
    elif t in (F.dropout, "contiguous", "clone"):
        e = xs[0]
    else:
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        raise ExportError(f"'{base}': {name} has no NIR mapping here")
    return e


def to_nir(snn: SpikingNet, input_shape: Sequence[int], dtype=np.float32,
           metadata: dict[str, Any] | None = None):
    """The NIR graph of a converted network (module docstring). `input_shape` = (C, H, W)."""
    import nir

    net = snn.net.eval()
    p0 = next(net.parameters())
    example = torch.zeros(1, *input_shape, dtype=p0.dtype, device=p0.device)
    snn.reset()
    try:
        graph, tracer = trace(net, example)
    finally:
        snn.reset()
    values = tracer.values
    b = _Builder(np.dtype(dtype))
    env: dict[str, Any] = {}
    out_expr = None
    for node in graph.nodes:
        val = values.get(node.name)
        path = tracer.node_name_to_scope.get(node.name, ("", None))[0]

        def arg(i):
            a = node.args[i]
            return env[a.name] if isinstance(a, torch.fx.Node) else a

        if node.op == "placeholder":
            b.nodes["input"] = nir.Input(input_type={"input": np.array(input_shape)})
            env[node.name] = _Expr([_Term("input", 1.0, False)], tuple(input_shape))
            continue
        if node.op == "get_attr":
            env[node.name] = val
            continue
        if node.op == "output":
            out_expr = arg(0)
            continue
        if node.op == "call_module":
            e = _module_node(b, net, node, arg(0), val)
        elif node.op in ("call_function", "call_method"):
            xs = [env.get(a.name) if isinstance(a, torch.fx.Node) else a for a in node.args]
            e = _function_node(b, node, xs, val, path)
            if not isinstance(e, _Expr):
                env[node.name] = e  # shapes, sizes: plain values
                continue
        else:
            raise ExportError(f"unexpected fx node {node.op}")
        # a value used twice may not absorb scales for one of its users
        if len(node.users) > 1:
            e = _Expr([_Term(t.node, t.scale, False) for t in e.terms], e.shape)
        env[node.name] = e
    if not isinstance(out_expr, _Expr):
        raise ExportError("the network's output is not a traced signal")
    b.nodes["output"] = nir.Output(output_type={"output": np.array(out_expr.shape)})
    b.sink(out_expr, "output")
    meta = {"harness.semantics": SEMANTICS, **GRAPH_NOTES, **(metadata or {})}
    return b.finish(meta)


def export_nir(snn_or_model: SpikingNet | nn.Module, path: str | Path, input_shape: Sequence[int],
               dtype=np.float32, metadata: dict[str, Any] | None = None, compression: str | None = "gzip"):
    """Convert (if given an ANN), build the NIR graph and write it with `nir.write`
    (`compression`: h5py's, e.g. "gzip", "lzf" or None)."""
    import nir
    snn = snn_or_model if isinstance(snn_or_model, SpikingNet) else to_snn(snn_or_model, input_shape=input_shape)
    g = to_nir(snn, input_shape, dtype=dtype, metadata=metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nir.write(str(path), g, compression=compression)
    return g


def _input_shape(result: dict) -> tuple[int, ...]:
    if result.get("input_shape"):
        return tuple(int(s) for s in result["input_shape"])
    d = result["config"]["data"]
    if d["name"] == "digits":
        return (1, 8, 8)
    if d["name"] in ("cifar10", "cifar100"):
        return (3, 32, 32)
    if d["name"] == "synthetic":
        s = d["synthetic"]
        return (s["channels"], s["size"], s["size"])
    raise ExportError("result.json has no input_shape (a run from an older harness on imagefolder data)")


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "float32", checkpoint: str = "best.pt"):
    """`harness export-nir RUN_DIR OUT.nir`: the run's selected checkpoint, converted and
    exported, with the run's input statistics and thresholds in the metadata."""
    from .config import Config
    from .models import create_model

    run_dir = Path(run_dir)
    rpath, cpath = run_dir / "result.json", run_dir / checkpoint
    if not rpath.exists() or not cpath.exists():
        raise ExportError(f"{run_dir} is not a finished run (expected result.json and {checkpoint})")
    if dtype not in ("float32", "float64"):
        raise ExportError(f"--dtype {dtype} (expected float32 or float64)")
    result = json.loads(rpath.read_text())
    cfg = Config.from_dict(result["config"])
    shape = _input_shape(result)
    state = torch.load(cpath, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    kw = dict(in_chans=shape[0], L=cfg.model.L, lam_init=1.0, grad=cfg.model.grad, cifar_stem=cfg.model.cifar_stem)
    probe = create_model(cfg.model.arch, num_classes=2, **kw)
    head = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier")
    head = head[0] if isinstance(head, (list, tuple)) else head
    if head and f"{head}.weight" in state:
        num_classes = int(state[f"{head}.weight"].shape[0])
    elif result.get("num_classes"):
        num_classes = int(result["num_classes"])
    else:
        raise ExportError(f"{cpath}: cannot tell the number of classes (no classifier weight, no num_classes "
                          "in result.json)")
    model = create_model(cfg.model.arch, num_classes=num_classes, **kw)
    model.load_state_dict(state)
    model.eval()
    snn = to_snn(model, input_shape=shape)
    meta = {"harness.run": str(run_dir.resolve()), "harness.arch": cfg.model.arch,
            "harness.method": str(result.get("method", "")), "harness.L": int(cfg.model.L),
            "harness.select_T": int(result.get("select_T", cfg.eval.select_T)), "harness.num_classes": num_classes}
    for key in ("input_mean", "input_std"):
        if result.get(key) is not None:
            meta[f"harness.{key}"] = np.asarray(result[key], dtype=np.float64)
    return export_nir(snn, out, shape, dtype=np.float32 if dtype == "float32" else np.float64, metadata=meta)
