import math

import pytest
import torch
from torch import nn

import harness
from harness.calibration import LocalCalibrator, estimate_delta, residual_error
from harness.neurons import NQ


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), NQ(L=2, lam_init=1.0), nn.Linear(3, 2), NQ(L=2, lam_init=1.5),
                        nn.Linear(2, 2)).double().eval()
    return net


def _by_hand(net, x, tau):
    """Plain-Python ANN and SNN, element by element."""
    W1, b1 = net[0].weight.tolist(), net[0].bias.tolist()
    W2, b2 = net[2].weight.tolist(), net[2].bias.tolist()
    l1, l2 = net[1].lam.item(), net[3].lam.item()

    def q(z, lam, L=2):
        return lam * min(max(math.floor(z * L / lam + 0.5) / L, 0.0), 1.0)

    def lin(W, b, v):
        return [sum(w * a for w, a in zip(row, v)) + bb for row, bb in zip(W, b)]

    gaps = [[], []]
    for xi in x.tolist():
        a1 = [q(z, l1) for z in lin(W1, b1, xi)]
        a2 = [q(z, l2) for z in lin(W2, b2, a1)]
        v1, v2 = [l1 / 2] * 3, [l2 / 2] * 2
        s1, s2 = [0.0] * 3, [0.0] * 2
        for _ in range(tau):
            z1 = lin(W1, b1, xi)
            o1 = []
            for j in range(3):
                v1[j] += z1[j]
                o1.append(l1 if v1[j] >= l1 else 0.0)
                v1[j] -= o1[j]
                s1[j] += o1[j]
            z2 = lin(W2, b2, o1)
            for j in range(2):
                v2[j] += z2[j]
                o = l2 if v2[j] >= l2 else 0.0
                v2[j] -= o
                s2[j] += o
        gaps[0] += [s / tau - a for s, a in zip(s1, a1)]
        gaps[1] += [s / tau - a for s, a in zip(s2, a2)]
    mean = [sum(g) / len(g) for g in gaps]
    std = [math.sqrt(sum((v - m) ** 2 for v in g) / len(g)) for g, m in zip(gaps, mean)]
    return mean, std


@pytest.fixture(params=["fused", "eager"])
def kernels(request, monkeypatch):
    """Run a test with the torch.compile-fused statistics and with eager ops (HARNESS_FUSED=0)."""
    monkeypatch.setenv("HARNESS_FUSED", "1" if request.param == "fused" else "0")
    return request.param


@pytest.mark.parametrize("tau", [1, 3, 4])
def test_delta_equals_hand_computation(tau, kernels):
    net = _tiny()
    x = torch.randn(50, 2, dtype=torch.float64) * 2
    stats = residual_error(net, x, tau, batch_size=16)  # several batches: pooled statistics
    mean, std = _by_hand(net, x, tau)
    assert stats.n_images == 50 and stats.tau == tau
    assert stats.mean["end_to_end"] == pytest.approx(mean, abs=1e-9)
    assert stats.std["end_to_end"] == pytest.approx(std, abs=1e-9)
    assert estimate_delta(stats, "end_to_end", 0.5) == pytest.approx([0.5 * s for s in std], abs=1e-9)
    assert sum(std) > 0
    assert all(sum(h) == n for h, n in zip(stats.hist["end_to_end"], [150, 100]))


def test_end_to_end_and_layer_local_agree_on_first_layer_only():
    torch.manual_seed(1)
    model = harness.create_model("cnn_small", in_chans=1, lam_init=1.0).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(0.5)
    x = torch.randn(64, 1, 8, 8)
    s = residual_error(model, x, tau=3)
    e2e, loc = s.std["end_to_end"], s.std["layer_local"]
    assert e2e[0] == pytest.approx(loc[0], abs=1e-7)
    assert s.mean["end_to_end"][0] == pytest.approx(s.mean["layer_local"][0], abs=1e-7)
    assert any(abs(a - b) > 1e-3 for a, b in zip(e2e[1:], loc[1:]))


@pytest.mark.parametrize("tau,L", [(3, 4), (2, 4), (5, 8)])
def test_residual_mean_is_zero_in_expectation_with_large_std(tau, L):
    # Theorem 1 of the paper on one layer: for inputs spread over [0, lam] the residual
    # between the SNN at tau and QCFS at L has mean ~0 but a large standard deviation.
    lam = 1.7
    lin = nn.Linear(1, 1)
    lin.weight.data.fill_(1.0)
    lin.bias.data.zero_()
    net = nn.Sequential(lin, NQ(L=L, lam_init=lam), nn.Linear(1, 1)).double().eval()
    x = torch.rand(200_000, 1, dtype=torch.float64) * lam
    s = residual_error(net, x, tau, batch_size=50_000)
    assert abs(s.mean["end_to_end"][0]) < 0.003 * lam
    assert s.std["end_to_end"][0] > 0.05 * lam


def test_local_calibrator_restores_training_mode_and_is_deterministic():
    model = harness.create_model("cnn_small", in_chans=1).train()
    cal = LocalCalibrator(torch.randn(40, 1, 8, 8), batch_size=16)
    a = cal.calibrate(model, tau=4)
    b = cal.calibrate(model, tau=4)
    assert model.training
    assert a.std == b.std and len(a.layers) == 4


def _recorded_stats(model, x, tau):
    """The statistics the straightforward way: the neurons' own recording (record=True),
    phi, zbar and both residuals materialised, sums in float64."""
    from harness.convert import activation_layers, to_snn
    from harness.neurons import qcfs
    acts = activation_layers(model)
    snn = to_snn(model)
    outs = []
    hooks = [a.register_forward_hook(lambda m, i, o: outs.append(o)) for _, a in acts]
    with torch.no_grad():
        model(x)
        snn.simulate(x, tau, record=True)
    for h in hooks:
        h.remove()
    res = {"end_to_end": [], "layer_local": []}
    for (_, a), n, out in zip(acts, snn.neurons, outs):
        phi, zbar = n.sum_out / tau, n.sum_in / tau
        lam = a.lam.detach().to(phi.dtype)
        for r, g in (("end_to_end", phi - out), ("layer_local", phi - qcfs(zbar, lam, a.L))):
            g = g.double()
            res[r].append((g.mean().item(), g.std(unbiased=False).item()))
    return res


@pytest.mark.parametrize("layout,chunk", [("step", None), ("multistep", None), ("step", 7)])
def test_fused_statistics_equal_the_recorded_computation(kernels, layout, chunk):
    """Summed output accumulated inside the IF step, summed input derived from the
    membrane potential, one fused reduction: the same statistics as the neurons' own
    recording, in both simulation layouts and in chunks of 7 images (float64 network:
    differences are rounding only)."""
    torch.manual_seed(2)
    model = harness.create_model("cnn_small", in_chans=1, lam_init=1.0).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(48, 1, 8, 8, dtype=torch.float64)
    s = residual_error(model, x, tau=5, batch_size=20, layout=layout, chunk=chunk)  # uneven last batch
    ref = _recorded_stats(model, x, 5)
    for r in ("end_to_end", "layer_local"):
        assert s.mean[r] == pytest.approx([m for m, _ in ref[r]], abs=1e-12)
        assert s.std[r] == pytest.approx([d for _, d in ref[r]], abs=1e-12)
    sizes = [48 * 32 * 8 * 8, 48 * 32 * 8 * 8, 48 * 64 * 4 * 4, 48 * 128]
    assert [sum(h) for h in s.hist["layer_local"]] == [sum(h) for h in s.hist["end_to_end"]] == sizes


def test_calibration_chunks_are_cache_sized_on_cpu():
    """ResNet-20's largest activation is 16x32x32 floats (64 KiB) per image: chunks of
    CHUNK_BYTES / 64 KiB = 128 images; a batch smaller than that is one chunk; the
    chunking leaves the statistics unchanged up to float64 summation order."""
    from harness.convert import CHUNK_BYTES, activation_layers, simulation_chunk

    torch.manual_seed(0)
    model = harness.create_model("resnet20", num_classes=10, L=4, lam_init=4.0).eval()
    out = []
    hooks = [a.register_forward_hook(lambda m, i, o: out.append(o)) for _, a in activation_layers(model)]
    # with calibration's own activation hooks registered, as residual_error calls it
    assert simulation_chunk(model, torch.randn(300, 3, 32, 32)) == CHUNK_BYTES // (16 * 32 * 32 * 4) == 128
    assert simulation_chunk(model, torch.randn(50, 3, 32, 32)) == 50
    assert [o.shape[0] for o in out] == [1] * 2 * len(activation_layers(model))  # one probe image each
    for h in hooks:
        h.remove()
    assert simulation_chunk(model, torch.randn(300, 3, 32, 32)) == 128 and not model.training
    x = torch.randn(40, 3, 32, 32)
    a, b = residual_error(model, x, 2, batch_size=40, chunk=40), residual_error(model, x, 2, batch_size=40, chunk=16)
    for r in ("end_to_end", "layer_local"):
        assert b.std[r] == pytest.approx(a.std[r], rel=1e-9, abs=1e-12)
        assert b.mean[r] == pytest.approx(a.mean[r], rel=1e-9, abs=1e-12)
    assert a.hist == b.hist and a.n_images == b.n_images == 40
