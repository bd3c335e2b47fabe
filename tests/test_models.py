import pytest
import timm
import torch

import harness
from harness.convert import activation_layers


def _conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c):
    return 2 * c


def _resnet_params(widths, blocks, classes, acts):
    n = _conv(3, widths[0], 3) + _bn(widths[0])
    c = widths[0]
    for i, (w, b) in enumerate(zip(widths, blocks)):
        for j in range(b):
            n += _conv(c, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
            if c != w or (i > 0 and j == 0):
                n += _conv(c, w, 1) + _bn(w)
            c = w
    return n + c * classes + classes + acts  # + one lambda per activation


def _vgg16_params(classes, acts):
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    n, c = 0, 3
    for w in cfg:
        n += _conv(c, w, 3, bias=True) + _bn(w)
        c = w
    n += 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * classes + classes
    return n + acts


# Independent closed-form counts of the QCFS authors' models (ReLU -> QCFS adds one lambda each).
@pytest.mark.parametrize("arch,classes,acts,params", [
    ("resnet20", 10, 19, _resnet_params([16, 32, 64], [3, 3, 3], 10, 19)),
    ("resnet20", 100, 19, _resnet_params([16, 32, 64], [3, 3, 3], 100, 19)),
    ("resnet18", 10, 17, _resnet_params([64, 128, 256, 512], [2, 2, 2, 2], 10, 17)),
    ("vgg16", 10, 15, _vgg16_params(10, 15)),
])
def test_activation_and_parameter_counts(arch, classes, acts, params):
    m = harness.create_model(arch, num_classes=classes)
    assert len(activation_layers(m)) == acts
    assert sum(p.numel() for p in m.parameters()) == params


def test_known_sizes():
    assert 33_000_000 < sum(p.numel() for p in harness.create_model("vgg16").parameters()) < 34_500_000
    assert 270_000 < sum(p.numel() for p in harness.create_model("resnet20").parameters()) < 275_000


@pytest.mark.parametrize("arch,shape", [("cnn_small", (2, 1, 8, 8)), ("resnet20", (2, 3, 32, 32)),
                                        ("resnet18", (2, 3, 32, 32)), ("vgg16", (2, 3, 32, 32))])
def test_forward_shapes_and_options(arch, shape):
    m = harness.create_model(arch, num_classes=7, L=8, lam_init=3.0, in_chans=shape[1]).eval()
    assert m(torch.randn(shape)).shape == (2, 7)
    acts = activation_layers(m)
    assert all(a.L == 8 and float(a.lam) == 3.0 for _, a in acts)


def test_timm_registry_builds_the_same_model():
    a = timm.create_model("nq_resnet20", num_classes=10)
    b = harness.create_model("resnet20")
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert "nq_vgg16" in timm.list_models("nq_*")


def test_unknown_arch_names_choices():
    with pytest.raises(ValueError, match="unknown arch 'resnet50'.*cnn_small, resnet18, resnet20, vgg16"):
        harness.create_model("resnet50")
