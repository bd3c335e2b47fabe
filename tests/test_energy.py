"""Section 2: spikes, synaptic operations and energy. The SOP count is checked against
a hand count (one-hot probing of each neuron) and against spikingjelly's SynOpCounter."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness.convert import observe_conversions
from harness.energy import EnergyConstants, EnergyRecorder, layer_macs, synaptic_fanout
from harness.neurons import NQ
from harness.train import count_macs, evaluate_snn


def _randomise(model, seed=0, lam=(0.3, 1.5)):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if isinstance(m, NQ):
                m.lam.fill_(float(torch.empty(()).uniform_(*lam, generator=g)))
    return model.eval()


class PoolFree(nn.Module):
    """Strided, padded and grouped convs and linear layers; spikes feed synaptic layers
    directly (no pooling), so every synaptic input is a binary spike map."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(2, c, 3, 1, 1), nn.BatchNorm2d(c), NQ(4, 1.0)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, 2 * c, 3, 2, 1, groups=2), nn.BatchNorm2d(2 * c), NQ(4, 1.0)
        self.conv3, self.act3 = nn.Conv2d(2 * c, c, (2, 3), (1, 2), (0, 1)), NQ(4, 1.0)
        self.flat = nn.Flatten()
        self.fc1, self.act4 = nn.Linear(c * 2 * 2, 6), NQ(4, 1.0)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.fc2(self.act4(self.fc1(self.flat(self.act3(self.conv3(x))))))


class PoolNet(nn.Module):
    """Average pooling (non-overlapping and adaptive) and a residual add with an identity path."""

    def __init__(self, c=3):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, c, 3, 1, 1), NQ(4, 1.0)
        self.pool = nn.AvgPool2d(2)
        self.conv2, self.act2 = nn.Conv2d(c, c, 3, 1, 1), NQ(4, 1.0)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        a = self.pool(self.act1(self.conv1(x)))
        b = self.act2(self.conv2(a) + a)  # identity path a -> act2
        return self.fc(torch.flatten(self.gap(b), 1))


# ---------------------------------------------------------------------------- fan-out

def _ones(layer):
    new = copy.deepcopy(layer).double()
    with torch.no_grad():
        new.weight.fill_(1)
    new.bias = None
    return new


def _hand_fanout(downstream, shape):
    """For each neuron p: send one spike (a one-hot map) through `downstream`, a function
    that returns the outputs of the synaptic layers it reaches (all-ones weights) and the
    direct paths; count their nonzero entries."""
    n = int(torch.tensor(shape).prod())
    out = torch.zeros(n, dtype=torch.float64)
    for p in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[p] = 1
        out[p] = sum(int(torch.count_nonzero(t)) for t in downstream(e.view(1, *shape)))
    return out


def test_fanout_equals_a_hand_count_with_borders_strides_groups_and_pooling():
    m = _randomise(PoolFree())
    fan = synaptic_fanout(harness.to_snn(m), (2, 6, 6))
    c1, c2, c3, f1, f2 = (_ones(getattr(m, k)) for k in ("conv1", "conv2", "conv3", "fc1", "fc2"))
    hand = [_hand_fanout(lambda s: [c2(s)], (4, 6, 6)),
            _hand_fanout(lambda s: [c3(s)], (8, 3, 3)),
            _hand_fanout(lambda s: [f1(s.flatten(1))], (4, 2, 2)),
            _hand_fanout(lambda s: [f2(s)], (6,))]
    for got, ref in zip(fan.fanout, hand):
        assert torch.equal(got, ref)
    # interior neuron of layer 1: out_channels * k^2 / groups-share ... = 8 channels of
    # one group (4) x 9 positions / stride^2 -> varies by parity; corners see fewer
    assert fan.fanout[0].view(4, 6, 6)[0, 0, 0] < fan.fanout[0].view(4, 6, 6)[0, 3, 3]
    assert fan.analog_macs == {"conv1": layer_macs(m, (2, 6, 6))["conv1"]}

    p = _randomise(PoolNet())
    fan = synaptic_fanout(harness.to_snn(p), (1, 8, 8))
    pool, conv2, fc = nn.AvgPool2d(2, divisor_override=1), _ones(p.conv2), _ones(p.fc)
    hand1 = _hand_fanout(lambda s: [conv2(pool(s)), pool(s)], (3, 8, 8))  # conv2 + the identity path
    hand2 = _hand_fanout(lambda s: [fc(s.sum((2, 3)))], (3, 4, 4))
    assert torch.equal(fan.fanout[0], hand1) and torch.equal(fan.fanout[1], hand2)
    assert set(fan.fanout[1].tolist()) == {4.0}  # each spike reaches every class once


# ---------------------------------------------------------------------------- recording

def _spike_counts(snn, x, T, layout):
    per_layer = [[] for _ in snn.neurons]
    hooks = [n.register_forward_hook(lambda m, i, o, k=k: per_layer[k].append(o.detach().clone()))
             for k, n in enumerate(snn.neurons)]
    snn.simulate(x, T, layout=layout)
    for h in hooks:
        h.remove()
    return per_layer


@pytest.mark.parametrize("layout", ["step", "multistep"])
def test_recorder_counts_every_spike_and_sop_of_the_simulation(layout):
    torch.manual_seed(0)
    m = _randomise(harness.create_model("cnn_small", in_chans=1, width=8))
    snn = harness.to_snn(m)
    x = torch.randn(5, 1, 8, 8)
    rec = EnergyRecorder((1, 8, 8), 6)
    rec.attach(snn)
    outs = _spike_counts(snn, x, 6, layout)
    rec.detach()
    fan = rec.fan.fanout
    steps = rec.per_step()
    for k, chunks in enumerate(outs):
        s = (torch.cat(chunks).reshape(6, 5, -1) != 0).double()    # [T, B, N]
        assert torch.equal(steps["spikes"][k], s.sum((1, 2)))
        assert torch.equal(steps["sops"][k], (s @ fan[k]).sum(1))
    assert rec.n_images == 5
    macs = count_macs(m, (1, 8, 8))
    e = rec.summary([1, 2, 4, 6], ann_macs=macs)
    c = EnergyConstants()
    for T in (1, 2, 4, 6):
        b = e["by_T"][str(T)]
        assert b["sops"] == pytest.approx(sum(float(s[:T].sum()) for s in steps["sops"]) / 5)
        assert b["macs"] == T * e["first_layer_macs"] == T * layer_macs(m, (1, 8, 8))["features.0"]
        assert b["uJ"] == pytest.approx((c.e_mac_pJ * b["macs"] + c.e_ac_pJ * b["sops"]) * 1e-6)
        assert b["ratio_to_ann"] == pytest.approx(b["uJ"] / (c.e_mac_pJ * macs * 1e-6))
        assert 0 <= b["firing_rate"] <= 1
        assert sum(e["per_layer"][str(T)]["spikes"]) == pytest.approx(b["spikes"])
    assert e["ann_macs"] == macs == sum(layer_macs(m, (1, 8, 8)).values())
    assert e["by_T"]["6"]["sops"] > 0
    assert json.loads(json.dumps(e)) == e


def test_recording_does_not_change_the_simulation():
    m = _randomise(harness.create_model("cnn_small", in_chans=3, width=8), seed=2)
    x = torch.randn(2, 3, 8, 8)
    plain = evaluate_snn(m, [(x, torch.tensor([0, 1]))], 5)
    rec = EnergyRecorder((3, 8, 8), 5)
    with observe_conversions(rec.attach):
        recorded = evaluate_snn(m, [(x, torch.tensor([0, 1]))], 5)
    rec.detach()
    assert plain == recorded and rec.n_images == 2


# ---------------------------------------------------------------------------- spikingjelly

def _sj_synops(snn, x, T):
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    counter = SynOpCounter()
    with DispatchCounterMode([counter]):
        snn.simulate(x, T, layout="step")
    return counter.get_total()


def test_sop_count_equals_spikingjelly_synop_counter(monkeypatch):
    """With thresholds of 1 the IF neurons emit 0/1, the form spikingjelly counts:
    on a network whose spikes feed synaptic layers directly the counts agree exactly."""
    pytest.importorskip("spikingjelly")
    monkeypatch.setenv("HARNESS_FUSED", "0")
    m = _randomise(PoolFree(), seed=4, lam=(1.0, 1.0))
    snn = harness.to_snn(m)
    x = torch.randn(3, 2, 6, 6) * 2
    T = 5
    sj = _sj_synops(snn, x, T)  # without our hooks (spikingjelly would count their bookkeeping)
    rec = EnergyRecorder((2, 6, 6), T)
    rec.attach(snn)
    snn.simulate(x, T, layout="step")
    rec.detach()
    ours = sum(float(s.sum()) for s in rec.per_step()["sops"])
    assert ours > 0 and ours == sj


def test_sop_count_against_spikingjelly_on_resnet20_differs_by_identity_paths_and_pooled_inputs(monkeypatch):
    """ResNet-20: spikingjelly counts only synaptic layers fed by binary tensors. Ours
    also counts (a) one accumulate per spike on an identity shortcut and (b) the
    classifier's synapses, reached through global average pooling (its input is not
    binary). The difference is exactly (a) + (b)."""
    pytest.importorskip("spikingjelly")
    monkeypatch.setenv("HARNESS_FUSED", "0")
    m = _randomise(harness.create_model("resnet20"), seed=1, lam=(1.0, 1.0))
    snn = harness.to_snn(m)
    x = torch.randn(2, 3, 32, 32)
    T = 3
    sj = _sj_synops(snn, x, T)
    rec = EnergyRecorder((3, 32, 32), T)
    rec.attach(snn)
    snn.simulate(x, T, layout="step")
    rec.detach()
    steps = rec.per_step()
    spikes = {name: float(s.sum()) for name, s in zip(snn.layer_names, steps["spikes"])}
    ours = sum(float(s.sum()) for s in steps["sops"])
    # identity shortcuts: a block whose shortcut is empty receives its input layer's spikes once each
    identity = 0.0
    prev = "stem.2"
    for si, stage in enumerate(m.stages):
        for bi, block in enumerate(stage):
            if len(block.shortcut) == 0:
                identity += spikes[prev]
            prev = f"stages.{si}.{bi}.act2"
    pooled = spikes[prev] * 10  # last layer -> global average pool -> fc (10 classes)
    assert sj > 0 and identity > 0 and pooled > 0
    assert ours == sj + identity + pooled


# ---------------------------------------------------------------------------- tracking

def test_energy_metric_names_for_mlflow():
    from harness.tracking import energy_metrics
    m = _randomise(harness.create_model("cnn_small", in_chans=1, width=4))
    rec = EnergyRecorder((1, 8, 8), 4)
    with observe_conversions(rec.attach):
        evaluate_snn(m, [(torch.randn(3, 1, 8, 8), torch.zeros(3, dtype=torch.long))], 4)
    rec.detach()
    result = {"energy": rec.summary([1, 2, 4], ann_macs=count_macs(m, (1, 8, 8)))}
    metrics = energy_metrics(result)
    names = {(k, step) for k, _, step in metrics}
    for key in ("energy/sops_T04", "energy/uJ_T04", "energy/spikes_T01", "energy/ratio_to_ann_T02",
                "energy/ann_uJ", "energy/ann_macs", "energy/first_layer_macs"):
        assert (key, 0) in names, key
    for T in (1, 2, 4):
        assert ("energy/uJ_by_T", T) in names and ("energy/sops_by_T", T) in names
        assert ("energy/firing_rate/l00_features.2", T) in names
        assert ("energy/firing_rate/l03_classifier.2", T) in names
    value = dict(((k, s), v) for k, v, s in metrics)
    assert value[("energy/uJ_T04", 0)] == value[("energy/uJ_by_T", 4)] == result["energy"]["by_T"]["4"]["uJ"]
    assert energy_metrics({"snn_test_acc": {}}) == []


def test_finish_writes_the_energy_block(tmp_path):
    from harness.config import load_config
    from harness.train import run
    cfg = load_config(overrides=["data.name=synthetic", "data.synthetic.num_train=64", "data.synthetic.num_test=16",
                                 "data.synthetic.channels=1", "data.synthetic.size=8", "data.batch_size=32",
                                 "train.epochs=1", "eval.T=[1,2,4]", "eval.select_T=2"])
    result = run(cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    e = saved["energy"]
    assert set(e) == {"constants", "n_images", "ann_macs", "ann_uJ", "analog_layers", "first_layer_macs", "layers",
                      "neurons", "synapses", "T", "by_T", "per_layer", "method"}
    assert e["T"] == [1, 2, 4] and set(e["by_T"]) == {"1", "2", "4"} and e["layers"] == saved["layers"]
    assert e["ann_macs"] == saved["macs"] and e["analog_layers"] == {"features.0": e["first_layer_macs"]}
    assert e["n_images"] > 0 and e["constants"]["e_ac_pJ"] == 0.9 and e["constants"]["e_mac_pJ"] == 4.6
    assert set(e["by_T"]["4"]) == {"spikes", "sops", "macs", "uJ", "ratio_to_ann", "firing_rate"}
    assert saved["input_shape"] == [1, 8, 8] and saved["model_adaptations"] == []
    assert result["energy"] == e


def test_constant_scaling_keeps_the_fanout_and_an_uncountable_net_does_not_stop_the_evaluation():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.act1 = nn.Conv2d(1, 2, 3, padding=1), NQ(4, 1.0)
            self.gamma = nn.Parameter(torch.full((1, 2, 1, 1), 0.5))
            self.conv2, self.act2, self.fc = nn.Conv2d(2, 2, 3, padding=1), NQ(4, 1.0), nn.Linear(2, 3)

        def forward(self, x):
            a = self.act1(self.conv1(x)) * self.gamma * 0.5
            return self.fc(self.act2(self.conv2(a)).mean((2, 3)))

    m = _randomise(Scaled())
    fan = synaptic_fanout(harness.to_snn(m), (1, 5, 5))
    plain = synaptic_fanout(harness.to_snn(_randomise(harness.create_model("cnn_small", in_chans=1, width=2))),
                            (1, 8, 8))
    assert fan.fanout[0].view(2, 5, 5)[0, 2, 2] == 2 * 9 and fan.fanout[1].tolist() == [3.0] * 50
    assert plain.fanout[0].numel() == 2 * 8 * 8

    class Odd(nn.Module):  # an op the counter does not know scales the spikes (avg_pool1d)
        def __init__(self):
            super().__init__()
            self.lin, self.act, self.fc = nn.Linear(4, 4), NQ(4, 1.0), nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(F.avg_pool1d(self.act(self.lin(x)).unsqueeze(1), 3, 1).squeeze(1))

    m = _randomise(Odd())
    rec = EnergyRecorder((4,), 3)
    with observe_conversions(rec.attach):
        accs = evaluate_snn(m, [(torch.randn(2, 4), torch.tensor([0, 1]))], 3)
    assert len(accs) == 3 and "non-integer fan-out" in rec.summary([1, 3], ann_macs=24)["error"]
