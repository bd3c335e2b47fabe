import math

import pytest
import torch

from harness.neurons import NQ, QCFS, IFNeuron, qcfs, qcfs_reference


@pytest.mark.parametrize("L", [1, 2, 4, 8])
def test_qcfs_matches_reference_values_and_grads(L):
    z = (torch.randn(4096, dtype=torch.float64) * 6).requires_grad_()
    lam = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    z2 = z.detach().clone().requires_grad_()
    lam2 = lam.detach().clone().requires_grad_()
    y = qcfs(z, lam, L)
    r = qcfs_reference(z2, lam2, L)
    assert torch.equal(y, r)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (r * g).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)
    torch.testing.assert_close(lam.grad, lam2.grad)


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
