import re
import pytest
import torch
from torch import nn

import harness
from harness.convert import ConversionError, activation_layers, _set_module
from harness.neurons import NQ, IFNeuron, qcfs


def _randomise(model, seed=0, lam=(0.5, 3.0)):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if isinstance(m, NQ):
            m.lam.data.fill_(float(torch.empty(()).uniform_(*lam, generator=g)))
    return model.eval()


@pytest.mark.parametrize("L,T", [(4, 4), (4, 2), (4, 7), (8, 3), (2, 16)])
def test_first_layer_average_psp_is_qcfs_with_L_equal_T(L, T):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), NQ(L, 1.3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double()
    _randomise(model)
    model.double()
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    snn = harness.to_snn(model)
    snn.simulate(x, T, record=True)
    first = snn.neurons[0]
    with torch.no_grad():
        z = model[1](model[0](x))
        expected = qcfs(z, model[2].lam.detach(), T)  # QCFS with L = T
    torch.testing.assert_close(first.sum_out / T, expected, rtol=0, atol=1e-12)
    if T == L:
        torch.testing.assert_close(first.sum_out / T, model[2](z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch,shape", [("cnn_small", (8, 1, 8, 8)), ("resnet20", (4, 3, 32, 32))])
@pytest.mark.parametrize("layout", ["step", "multistep"])
def test_all_T_readout_equals_separate_runs(arch, shape, layout):
    model = _randomise(harness.create_model(arch, in_chans=shape[1]))
    snn = harness.to_snn(model)
    x = torch.randn(shape)
    full = snn.simulate(x, 12, layout=layout)
    assert full.shape == (12, shape[0], 10)
    for T in (1, 2, 5, 12):
        torch.testing.assert_close(full[T - 1], snn.simulate(x, T, layout=layout)[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 16, 17])
def test_chunked_equals_unchunked(chunk):
    model = _randomise(harness.create_model("resnet20"))
    snn = harness.to_snn(model)
    x = torch.randn(4, 3, 32, 32)
    ref = snn.simulate(x, 16, layout="multistep")
    got = snn.simulate(x, 16, layout="multistep", chunk=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(snn.simulate(x, 16, layout="step"), ref, rtol=1e-5, atol=1e-5)


def test_simulate_resets_state_between_calls():
    snn = harness.to_snn(_randomise(harness.create_model("cnn_small", in_chans=1)))
    x = torch.randn(4, 1, 8, 8)
    a = snn.simulate(x, 5)
    b = snn.simulate(x, 5)
    assert torch.equal(a, b)


def test_ann_is_untouched_and_neurons_take_lambda():
    model = _randomise(harness.create_model("resnet20")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snn = harness.to_snn(model, v0=0.5)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, IFNeuron) for m in model.modules())
    acts = activation_layers(model)
    assert len(snn.neurons) == len(acts) == 19
    for (name, a), n in zip(acts, snn.neurons):
        assert float(n.theta) == pytest.approx(a.lam.item()) and n.v0 == 0.5
    assert not snn.net.training


class _SJ(nn.Module):
    """spikingjelly HalfThresholdIFNode (multi-step mode) on a time-folded [T*B] tensor."""

    def __init__(self, theta, T):
        super().__init__()
        from spikingjelly.activation_based import neuron
        self.node = neuron.HalfThresholdIFNode(v_threshold=float(theta), step_mode="m")
        self.theta, self.T = float(theta), T

    def forward(self, x):
        s = self.node(x.reshape(self.T, -1, *x.shape[1:]))
        return (s * self.theta).reshape(x.shape)


@pytest.mark.parametrize("arch,shape", [("cnn_small", (6, 1, 8, 8)), ("resnet20", (3, 3, 32, 32)),
                                        ("vgg16", (2, 3, 32, 32))])
def test_cross_check_against_spikingjelly(arch, shape):
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional
    T = 6
    model = _randomise(harness.create_model(arch, in_chans=shape[1]), seed=3, lam=(0.3, 2.0))
    x = torch.randn(shape)
    sj = _randomise(harness.create_model(arch, in_chans=shape[1]), seed=3, lam=(0.3, 2.0))
    sj.load_state_dict(model.state_dict())
    for name, a in activation_layers(sj):
        _set_module(sj, name, _SJ(a.lam.item(), T))
    functional.reset_net(sj)
    spikes_sj = []
    hooks = [m.register_forward_hook(lambda m, i, o: spikes_sj.append(o.clone()))
             for m in sj.modules() if isinstance(m, _SJ)]
    with torch.no_grad():
        y = sj(x.unsqueeze(0).expand(T, *x.shape).reshape(T * shape[0], *shape[1:]))
    for h in hooks:
        h.remove()
    ref = y.reshape(T, shape[0], -1).cumsum(0) / torch.arange(1, T + 1).view(T, 1, 1)

    snn = harness.to_snn(model)
    spikes = []
    hooks = [n.register_forward_hook(lambda m, i, o: spikes.append(o.clone())) for n in snn.neurons]
    got = snn.simulate(x, T, layout="multistep")
    for h in hooks:
        h.remove()
    assert len(spikes) == len(spikes_sj) == len(snn.neurons)
    for a, b in zip(spikes, spikes_sj):
        assert torch.equal(a, b)
    assert sum(int(s.count_nonzero()) for s in spikes) > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class _Clip(nn.Module):
    def __init__(self, lam):
        super().__init__()
        self.lam = lam

    def forward(self, z):
        return z.clamp(0, self.lam)


def test_snn_converges_to_clip_network_as_T_grows():
    model = _randomise(harness.create_model("resnet20"), seed=5, lam=(0.8, 2.0))
    x = torch.randn(16, 3, 32, 32)
    clip = _randomise(harness.create_model("resnet20"), seed=5, lam=(0.8, 2.0))
    clip.load_state_dict(model.state_dict())
    for name, a in activation_layers(clip):
        _set_module(clip, name, _Clip(a.lam.item()))
    with torch.no_grad():
        target = clip(x)
    out = harness.to_snn(model).simulate(x, 64)
    err = {T: (out[T - 1] - target).abs().mean().item() for T in (4, 16, 64)}
    assert err[64] < err[16] < err[4]
    assert err[64] < 0.5 * err[4]


@pytest.mark.parametrize("bad,name", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), NQ(), nn.MaxPool2d(2)), "'2' (MaxPool2d)"),
    (nn.Sequential(nn.Linear(3, 3), NQ(), nn.Linear(3, 3), nn.ReLU()), "'3' (ReLU)"),
    (nn.Sequential(nn.Linear(3, 3), nn.SiLU(), NQ()), "'1' (SiLU)"),
    (nn.Sequential(nn.Linear(3, 3), nn.GELU(), NQ()), "'1' (GELU)"),
])
def test_unconvertible_modules_raise_clear_error(bad, name):
    with pytest.raises(ConversionError, match=re.escape(f"cannot convert module {name}")):
        harness.to_snn(bad)


def test_nested_path_in_error_and_no_activation():
    m = harness.create_model("cnn_small", in_chans=1)
    m.features[6] = nn.MaxPool2d(2)
    with pytest.raises(ConversionError, match=r"'features.6' \(MaxPool2d\): max-pooling"):
        harness.to_snn(m)
    with pytest.raises(ConversionError, match="no NQ/QCFS activation"):
        harness.to_snn(nn.Linear(2, 2))
