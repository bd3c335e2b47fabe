"""Section 1 of the beyond-peers issue: any timm CNN, prepared for conversion.

Fast tests build the models (no training); the slow test trains resnet18, resnet34 and
vgg11_bn from a search space for one epoch on synthetic data, converts them, and checks
`simulate` against an independent step-by-step IF loop."""
import copy
import json
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import nn

import harness
from harness.config import ConfigError, load_config
from harness.convert import ConversionError, activation_layers
from harness.models import TimmAdaptationWarning, create_model, from_timm
from harness.neurons import NQ


# ---------------------------------------------------------------------------- building

def test_from_timm_replaces_every_relu_and_warns_about_max_pooling():
    with pytest.warns(TimmAdaptationWarning, match=r"max-pooling 'maxpool' .* replaced by AvgPool2d.*changes the ANN"):
        m = from_timm("resnet18", num_classes=7, L=8, lam_init=3.0, in_chans=3)
    assert not any(type(x) is nn.ReLU for x in m.modules())
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    acts = activation_layers(m)
    assert len(acts) == 17 and all(a.L == 8 and float(a.lam.detach()) == 3.0 for _, a in acts)
    pool = m.maxpool
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    rec = [a for a in m.harness_adaptations if a["change"] == "max_pool_to_avg_pool"]
    assert [a["module"] for a in rec] == ["maxpool"] and rec[0]["changes_ann"]
    assert json.loads(json.dumps(m.harness_adaptations)) == m.harness_adaptations  # result.json-ready
    assert m.pretrained_cfg["num_classes"] == 7 and m(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_cifar_stem_adapts_resnet_and_vgg_to_32x32():
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimmAdaptationWarning)  # the stem max-pool is removed, not replaced
        r = from_timm("resnet18", num_classes=10, cifar_stem=True)
    assert (r.conv1.kernel_size, r.conv1.stride, r.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(r.maxpool, nn.Identity)
    assert r.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    cfg = resolve_data_config(model=r)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == pytest.approx((0.4914, 0.4822, 0.4465))
    with pytest.warns(TimmAdaptationWarning):
        v = from_timm("vgg11_bn", num_classes=10, cifar_stem=True)
    assert v.pre_logits.fc1.kernel_size == (1, 1) and v.pre_logits.input_kernel_size == 1
    assert sum(isinstance(x, nn.AvgPool2d) for x in v.modules()) == 5
    assert {a["module"] for a in v.harness_adaptations if a["change"] == "cifar_stem"} == {"pre_logits.fc1"}
    assert v(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_config_and_create_model_route_timm_names():
    cfg = load_config(overrides=["model.arch=timm/resnet18", "model.cifar_stem=true"])
    assert cfg.model.arch == "timm/resnet18" and cfg.model.cifar_stem
    with pytest.raises(ConfigError, match=r"^config error: model\.arch = 'timm/no_such_net' \(expected timm/<name>"):
        load_config(overrides=["model.arch=timm/no_such_net"])
    m = create_model("timm/resnet18", num_classes=10, L=4, lam_init=8.0, in_chans=1, cifar_stem=True)
    assert m.conv1.in_channels == 1 and len(activation_layers(m)) == 17
    with pytest.raises(ValueError, match="unknown timm model 'nope'"):
        from_timm("nope")


def test_builtin_models_have_a_cifar_pretrained_cfg_and_timm_methods():
    for arch, classes in [("resnet20", 10), ("vgg16", 100), ("cnn_small", 10)]:
        m = timm.create_model(f"nq_{arch}", num_classes=classes)
        cfg = resolve_data_config(model=m)
        expect = (3, 8, 8) if arch == "cnn_small" else (3, 32, 32)
        assert cfg["input_size"] == expect and cfg["crop_pct"] == 1.0
        mean = (0.5071, 0.4865, 0.4409) if classes == 100 else (0.4914, 0.4822, 0.4465)
        assert cfg["mean"] == pytest.approx(mean)
        assert m.pretrained_cfg["num_classes"] == classes == m.num_classes
        assert timm.models.get_pretrained_cfg(f"nq_{arch}").input_size == expect
        x = torch.randn(2, *expect)
        feats = m.forward_features(x)
        assert torch.equal(m.forward_head(feats), m(x))
        pre = m.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, m.get_classifier().in_features)
        m.reset_classifier(3)
        assert m(x).shape == (2, 3) and m.num_classes == 3 and m.pretrained_cfg["num_classes"] == 3
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("nq_resnet20", pretrained=True)


# ---------------------------------------------------------------------------- refusals

class _FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = NQ()

    def forward(self, x):
        return self.act(F.relu(self.conv(x)))  # invisible to module inspection


class _Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 1), NQ())
        self.block = block
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = NQ()

    def forward(self, x):
        t = self.act(self.conv(x)).flatten(2)              # [B, C, N]
        a = (t.transpose(1, 2) @ t).softmax(-1)            # attention: activation x activation
        return (t @ a).reshape(x.shape[0], 4, *x.shape[2:])


class _TimmAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = NQ()
        self.attn = timm.layers.Attention(4, num_heads=2)

    def forward(self, x):
        t = self.act(self.conv(x)).flatten(2).transpose(1, 2)
        return self.attn(t).transpose(1, 2).reshape(x.shape[0], 4, *x.shape[2:])


@pytest.mark.parametrize("block,message", [
    (_FunctionalReLU(), "cannot convert module 'block' (F.relu in its forward)"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.SiLU(), NQ()), "cannot convert module 'block.1' (SiLU)"),
    (nn.Sequential(nn.Conv2d(3, 4, 1), nn.GELU(), NQ()), "cannot convert module 'block.1' (GELU)"),
    (_Attention(), "cannot convert module 'block' (operator.matmul of two activations"),
    (_TimmAttention(), "cannot convert module 'block.attn' (F.scaled_dot_product_attention"),
])
def test_ops_without_an_if_counterpart_fail_with_their_module_path(block, message):
    with pytest.raises(ConversionError, match=re.escape(message)):
        harness.to_snn(_Net(block).eval(), input_shape=(3, 4, 4))


def test_timm_model_with_gelu_and_attention_is_refused():
    vit = from_timm("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ConversionError, match=r"cannot convert module 'blocks\.0\.mlp\.act' \(GELU\)"):
        harness.to_snn(vit)


def test_an_activation_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = NQ()

        def forward(self, x):
            return self.act(self.lin(self.act(x)))

    with pytest.raises(ConversionError, match="module 'act' .*called more than once"):
        harness.to_snn(Twice(), input_shape=(4,))


def test_a_shape_dependent_forward_is_traced_with_concrete_shapes():
    """timm's VGG head branches on x.shape: a plain symbolic trace fails, the concrete one
    does not, and a functional ReLU after the branch is still found."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TimmAdaptationWarning)
        v = from_timm("vgg11_bn", num_classes=10, cifar_stem=True, mlp_ratio=1 / 64).eval()
    harness.to_snn(v, input_shape=(3, 32, 32))  # converts
    head = v.pre_logits
    orig = type(head).forward

    def forward(self, x):
        return F.relu(orig(self, x))
    head.forward = forward.__get__(head)
    with pytest.raises(ConversionError, match=re.escape("cannot convert module 'pre_logits' (F.relu")):
        harness.to_snn(v, input_shape=(3, 32, 32))


# ---------------------------------------------------------------------------- train, convert, simulate

class _StepIF(nn.Module):
    """An independent IF neuron for a plain Python loop over time."""

    def __init__(self, theta):
        super().__init__()
        self.theta, self.v = float(theta), None

    def forward(self, x):
        if self.v is None:
            self.v = torch.full_like(x, 0.5 * self.theta)
        self.v = self.v + x
        s = (self.v >= self.theta).to(x.dtype) * self.theta
        self.v = self.v - s
        return s


def step_by_step(model: nn.Module, x: torch.Tensor, T: int) -> torch.Tensor:
    net = copy.deepcopy(model).eval()
    for name, act in activation_layers(net):
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, _StepIF(act.lam.detach()))
    outs, acc = [], None
    with torch.no_grad():
        for t in range(T):
            y = net(x)
            acc = y if acc is None else acc + y
            outs.append(acc / (t + 1))
    return torch.stack(outs)


SPACE = """
name: timm_smoke
data:
  name: synthetic
  batch_size: 8
  eval_batch_size: 8
  val_fraction: 0.25
  synthetic: {{num_train: 12, num_test: 4, channels: 3, size: 32, num_classes: 4}}
  augment: {{crop_pad: 0, flip: false, cutout: 0, autoaugment: false}}
model: {{cifar_stem: true, L: 4}}
noise: {{mode: layerwise, tau: 2}}
train: {{epochs: 1, lr: 0.05, threads: 2}}
eval: {{T: [1, 2, 4], select_T: 2, select_on: val}}
grid:
  model.arch: [timm/resnet18, timm/resnet34, timm/vgg11_bn]
resources: {{cpu: 1}}
calibration: {{mode: local}}
"""


@pytest.mark.slow
def test_timm_models_from_a_search_space_train_convert_and_match_a_step_loop(tmp_path):
    from harness.space import load_space
    from harness.train import run

    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE.format())
    space = load_space(space_file)
    assert [t.cfg.model.arch for t in space.trials] == ["timm/resnet18", "timm/resnet34", "timm/vgg11_bn"]
    for i, trial in enumerate(space.trials):
        out = tmp_path / f"trial{i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TimmAdaptationWarning)
            result = run(trial.cfg, out, progress=False)
        saved = json.loads((out / "result.json").read_text())
        assert saved["snn_test_acc"].keys() == {"1", "2", "4"}
        changes = {a["change"] for a in saved["model_adaptations"]}
        assert {"cifar_stem", "activation"} <= changes
        if trial.cfg.model.arch == "timm/vgg11_bn":
            assert sum(a["change"] == "max_pool_to_avg_pool" for a in saved["model_adaptations"]) == 5
        assert saved["energy"]["by_T"]["4"]["sops"] >= 0 and saved["energy"]["ann_macs"] == saved["macs"]
        if i == 0:  # the MLflow model of a cifar_stem timm net is rebuilt with its stem and loads back
            from harness import tracking
            c = tracking.client(f"sqlite:///{tmp_path}/m.db")
            run_id = c.create_run(c.create_experiment("timm", artifact_location=(tmp_path / "art").as_uri())).info.run_id
            tracking.log_model(c, run_id, saved, out / "best.pt")
            import mlflow.pytorch
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/m.db")
            back = mlflow.pytorch.load_model(f"runs:/{run_id}/model")  # an exported graph, traced in eval mode
            ref = create_model(trial.cfg.model.arch, num_classes=saved["num_classes"], in_chans=3, L=trial.cfg.model.L,
                               cifar_stem=True)
            ref.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
            x = torch.randn(1, 3, 32, 32)  # the exported graph has the input example's batch of 1
            torch.testing.assert_close(back(x), ref.eval()(x))
        # the trained, selected network: simulate == a plain step-by-step IF loop
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TimmAdaptationWarning)
            model = create_model(trial.cfg.model.arch, num_classes=4, in_chans=3, cifar_stem=True)
        model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
        model.eval()
        x = torch.randn(3, 3, 32, 32)
        snn = harness.to_snn(model)
        got = snn.simulate(x, 6)
        ref = step_by_step(model, x, 6)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        spikes = []
        hooks = [n.register_forward_hook(lambda m, i, o: spikes.append(int(o.count_nonzero()))) for n in snn.neurons]
        snn.simulate(x, 6)
        for h in hooks:
            h.remove()
        assert sum(spikes) > 0, trial.label
        assert result["best_epoch"] == 1
