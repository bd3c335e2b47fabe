import math

import pytest
import torch

from harness.neurons import GRAD_FORMULATIONS, NQ, QCFS, IFNeuron, qcfs, qcfs_reference


@pytest.fixture(params=["fused", "eager"])
def fused_mode(request, monkeypatch):
    """Run a test with the torch.compile-fused kernels and with eager ops (HARNESS_FUSED=0)."""
    monkeypatch.setenv("HARNESS_FUSED", "1" if request.param == "fused" else "0")
    return request.param


@pytest.mark.parametrize("grad", GRAD_FORMULATIONS)
@pytest.mark.parametrize("L", [1, 2, 4, 8])
def test_qcfs_matches_reference_values_and_grads(L, grad, fused_mode):
    z = (torch.randn(4096, dtype=torch.float64) * 6).requires_grad_()
    lam = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    z2 = z.detach().clone().requires_grad_()
    lam2 = lam.detach().clone().requires_grad_()
    y = qcfs(z, lam, L, grad=grad)
    r = qcfs_reference(z2, lam2, L, grad=grad)
    assert torch.equal(y, r)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (r * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(lam.grad, lam2.grad)


@pytest.mark.parametrize("grad", GRAD_FORMULATIONS)
@pytest.mark.parametrize("L", [1, 4])
def test_reference_gradients_match_closed_form(L, grad):
    """The per-element gradients of each formulation (module docstring), checked against
    autograd through the op-by-op reference, boundary points of both windows included."""
    lam_v = 2.0
    edges = torch.tensor([0.0, 1.0, -1 / (2 * L), 1 + 1 / (2 * L)], dtype=torch.float64) * lam_v
    z = torch.cat([torch.randn(2000, dtype=torch.float64) * 3, edges]).requires_grad_()
    lam = torch.tensor(lam_v, dtype=torch.float64, requires_grad=True)
    g = torch.randn(z.shape, dtype=torch.float64)
    (qcfs_reference(z, lam, L, grad=grad) * g).sum().backward()
    u = z.detach() / lam_v
    t = torch.floor(u * L + 0.5)
    q = t.clamp(0, L) / L
    inside = (u >= 0) & (u <= 1) if grad == "nq" else (t >= 0) & (t <= L)
    assert torch.equal(z.grad, torch.where(inside, g, torch.zeros_like(g)))
    torch.testing.assert_close(lam.grad, (g * (q - torch.where(inside, u, torch.zeros_like(u)))).sum())
    # the boundaries: u = 0 and u = 1 pass in both; u = -1/(2L) only in qcfs_iclr (closed),
    # u = 1 + 1/(2L) in neither (qcfs_iclr's window is open there)
    expect_edges = [True, True, grad == "qcfs_iclr", False]
    assert (z.grad[-4:] != 0).tolist() == expect_edges


def test_formulations_same_values_different_gradients(fused_mode):
    """Hand-checked example: L = 4, lam = 2, loss = sum(a). u = z/lam, t = floor(4u + 0.5).
      z       u        a   | nq: dz  dlam          | qcfs_iclr: dz  dlam
     -1     -0.5       0   |     0   0             |  0 (t=-2)   0
     -0.25  -0.125     0   |     0   0             |  1 (t=0)    0 - (-0.125) = 0.125
     -0.125 -0.0625    0   |     0   0             |  1 (t=0)    0 - (-0.0625) = 0.0625
      0      0         0   |     1   0 - 0 = 0     |  1          0
      0.75   0.375     1   |     1   0.5 - 0.375   |  1          0.5 - 0.375 = 0.125
      2      1         2   |     1   1 - 1 = 0     |  1          0
      2.125  1.0625    2   |     0   1             |  1 (t=4)    1 - 1.0625 = -0.0625
      2.25   1.125     2   |     0   1             |  0 (t=5)    1
      5      2.5       2   |     0   1             |  0          1
    dL/dlam: nq 0.125 + 3 = 3.125; qcfs_iclr 0.125 + 0.0625 + 0.125 - 0.0625 + 2 = 2.25."""
    z0 = torch.tensor([-1.0, -0.25, -0.125, 0.0, 0.75, 2.0, 2.125, 2.25, 5.0])
    expected_a = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    expected = {"nq": ([0, 0, 0, 1, 1, 1, 0, 0, 0], 3.125),
                "qcfs_iclr": ([0, 1, 1, 1, 1, 1, 1, 0, 0], 2.25)}
    for grad, (dz, dlam) in expected.items():
        for fn in (qcfs, qcfs_reference):
            z = z0.clone().requires_grad_()
            lam = torch.tensor(2.0, requires_grad=True)
            a = fn(z, lam, 4, grad=grad)
            assert torch.equal(a, expected_a), (grad, fn.__name__)
            a.sum().backward()
            assert z.grad.tolist() == dz, (grad, fn.__name__)
            assert lam.grad.item() == dlam, (grad, fn.__name__)
        act = NQ(4, 2.0, grad=grad)
        z = z0.clone().requires_grad_()
        act(z).sum().backward()
        assert z.grad.tolist() == dz and act.lam.grad.item() == dlam


@pytest.mark.parametrize("grad", GRAD_FORMULATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lambda_grad_low_precision_accumulated_in_fp32(dtype, grad, fused_mode):
    """fp16 / bf16 activations, fp32 lam (as under autocast): the lam gradient, a sum over
    10^6 elements far beyond fp16's range (65504), is finite, fp32, and equals the fp32
    computation on the same inputs within 1e-3 relative; dz stays in the input's dtype."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(10**6, generator=gen) * 4).to(dtype)
    results = {}
    for dt in (dtype, torch.float32):
        act = NQ(4, 3.0, grad=grad)  # lam = 3 is exact in fp16 and bf16
        x = z.to(dt).clone().requires_grad_()
        y = act(x)
        y.sum().backward()
        assert y.dtype == dt and x.grad.dtype == dt and act.lam.grad.dtype == torch.float32
        results[dt] = act.lam.grad
    low, ref = results[dtype], results[torch.float32]
    assert ref.item() > 65504  # overflows if summed in fp16
    assert torch.isfinite(low)
    assert abs(low.item() - ref.item()) <= 1e-3 * abs(ref.item())


def test_grad_formulation_option():
    assert GRAD_FORMULATIONS == ("nq", "qcfs_iclr")
    assert NQ().grad == "nq" and QCFS().grad == "nq"  # the NQ authors' formulation by default
    act = NQ(2, 1.5, 0.25)  # model builders pass (L, lam_init, delta) positionally
    assert (act.L, act.lam.item(), act.delta.item(), act.grad) == (2, 1.5, 0.25, "nq")
    assert "grad=nq" in repr(act)
    assert "grad=qcfs_iclr" in repr(QCFS(4, 8.0, grad="qcfs_iclr"))
    assert NQ(4, 8.0, 0.1, "qcfs_iclr").grad == "qcfs_iclr"


@pytest.mark.parametrize("make", [
    lambda: NQ(4, 8.0, 0.0, grad="qcfs"),
    lambda: QCFS(4, 8.0, grad="qcfs"),
    lambda: qcfs(torch.randn(8), torch.tensor(1.0), 4, grad="qcfs"),
    lambda: qcfs_reference(torch.randn(8), torch.tensor(1.0), 4, grad="qcfs"),
])
def test_unknown_grad_formulation_raises(make):
    with pytest.raises(ValueError) as e:
        make()
    msg = str(e.value)
    assert "\n" not in msg and "'qcfs'" in msg and "'nq'" in msg and "'qcfs_iclr'" in msg


def test_qcfs_formula_and_levels():
    act = QCFS(L=4, lam_init=2.0).eval()
    z = torch.tensor([-1.0, 0.0, 0.24, 0.26, 0.74, 0.76, 1.0, 1.9, 2.0, 5.0])
    # a = lam * clip(floor(z*L/lam + 0.5)/L, 0, 1), levels are multiples of lam/L = 0.5
    expected = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0])
    assert torch.equal(act(z), expected)
    assert act.L == 4 and act.lam.item() == 2.0 and act.delta.item() == 0.0


def test_lambda_receives_gradient_and_is_parameter():
    act = NQ(L=4)
    assert isinstance(act.lam, torch.nn.Parameter) and act.lam.item() == 8.0
    z = torch.randn(1000, requires_grad=True) * 10
    act(z).sum().backward()
    assert act.lam.grad is not None and act.lam.grad.abs() > 0


def test_noise_train_only_with_std_delta():
    act = NQ(L=4, lam_init=8.0, delta=0.3)
    z = torch.randn(200_000) * 4
    clean = qcfs(z, act.lam.detach(), 4)
    act.train()
    noise = act(z) - clean
    assert abs(noise.std().item() - 0.3) < 0.003
    assert abs(noise.mean().item()) < 0.003
    # fresh draws per forward pass, i.i.d. across elements
    noise2 = act(z) - clean
    assert abs(torch.corrcoef(torch.stack([noise, noise2]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1]) < 0.01
    kurt = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2
    assert abs(kurt.item() - 3.0) < 0.1  # Gaussian
    act.eval()
    assert torch.equal(act(z), clean)


def test_delta_is_a_buffer_in_state_dict():
    act = NQ(L=4, delta=0.25)
    sd = act.state_dict()
    assert "delta" in sd and float(sd["delta"]) == 0.25
    other = NQ(L=4)
    other.load_state_dict(sd)
    assert float(other.delta) == 0.25
    assert "delta" not in dict(act.named_parameters())


def test_noise_gradient_passes_like_qcfs():
    act = NQ(L=4, delta=0.5).train()
    z = (torch.randn(5000) * 5).requires_grad_()
    act(z).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    qcfs_reference(z2, act.lam.detach(), 4).sum().backward()
    assert torch.equal(z.grad, z2.grad)


def test_if_neuron_dynamics_by_hand():
    n = IFNeuron(theta=1.0, v0=0.5)
    xs = [0.3, 0.3, 0.0, 1.2, -0.5, 0.6]
    out, v, ref = [], 0.5, []
    for x in xs:
        u = v + x
        s = 1.0 if u >= 1.0 else 0.0
        ref.append(s)
        v = u - s
    for x in xs:
        out.append(n(torch.tensor([x])).item())
    assert out == ref
    assert math.isclose(n.v.item(), v, abs_tol=1e-6)


def test_if_neuron_fires_at_equality_and_chunks_persist():
    n = IFNeuron(theta=2.0, v0=0.5)
    assert n(torch.tensor([1.0])).item() == 2.0  # u = 1 + 1 = theta exactly fires
    x = torch.rand(8, 3, 5)
    a = IFNeuron(theta=0.7)
    full = [a(x[t]) for t in range(8)]
    b = IFNeuron(theta=0.7)
    b.steps = 5
    first = b(x[:5].reshape(15, 5)).reshape(5, 3, 5)
    b.steps = 3
    second = b(x[5:].reshape(9, 5)).reshape(3, 3, 5)
    assert torch.equal(torch.stack(full), torch.cat([first, second]))
    b.reset()
    assert b.v is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_output_sum_equals_the_recorded_sums(fused_mode, dtype):
    """record="out" (output sum inside the step's kernel, state updated in place after
    the first step, v(0) added as a scalar) gives bit for bit the outputs, membrane
    potential and output sum of the plain step and of record=True, in one call of 8
    steps, in chunks of 5 + 3 steps and step by step; the summed input then follows from
    v exactly as calibration derives it."""
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 6) * 0.6).to(dtype)

    def run(record, chunks):
        n = IFNeuron(theta=0.7)
        n.record = record
        outs, t = [], 0
        for k in chunks:
            n.steps = k
            outs.append(n(x[t:t + k].reshape(k * 4, 6)).reshape(k, 4, 6))
            t += k
        return n, torch.cat(outs)

    ref, ref_out = run(True, [1] * 8)
    assert ref.v.dtype == dtype
    for chunks in ([8], [5, 3], [1] * 8):
        for record in ("out", False):
            n, out = run(record, chunks)
            assert torch.equal(out, ref_out) and torch.equal(n.v, ref.v)
            if record == "out":
                assert n.sum_in is None and torch.equal(n.sum_out, ref.sum_out)
    v0 = float(torch.tensor(0.7, dtype=dtype)) * 0.5
    assert torch.allclose(ref.v - v0 + ref.sum_out, ref.sum_in, atol=1e-5, rtol=0)


def test_fused_output_sum_never_aliases_an_output(fused_mode):
    """The running sum is the neuron's own tensor: changing a returned output in place
    (as a model may do to its activations) leaves the sum alone."""
    n = IFNeuron(theta=1.0)
    n.record = "out"
    first = n(torch.full((3,), 1.5))
    first.mul_(100)
    n(torch.full((3,), 1.5))
    assert n.sum_out.tolist() == [2.0, 2.0, 2.0]
