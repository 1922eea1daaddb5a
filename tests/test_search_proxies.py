"""Zero-cost proxies against their definitions: hand-computed small cases and the invariances
the papers state."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillery.config import ModelSpec
from distillery.models import build_model
from distillery.search import proxies as P

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zoo(arch, seed=0, size=(16, 16), **kwargs):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=size)


def _batch(n=16, size=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, *size, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---- DisWOT: the tensor functions


def test_gram_distance_by_hand():
    a = torch.eye(2)
    b = torch.ones(2, 2)
    # rows of b normalise to (1/sqrt2, 1/sqrt2); each row differs by (1 - 1/sqrt2, -1/sqrt2)
    per_row = (1 - 1 / math.sqrt(2)) ** 2 + 0.5
    assert P.gram_distance(a, b).item() == pytest.approx(2 * per_row / 4)
    assert P.gram_distance(a, b).item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert P.gram_distance(b, a).item() == pytest.approx(P.gram_distance(a, b).item())  # symmetric
    assert P.gram_distance(a, 5 * a).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    with pytest.raises(ValueError, match="shape"):
        P.gram_distance(a, torch.ones(3, 3))


def test_class_activation_maps_by_hand():
    feats = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]])  # (B=1, D=2, L=3)
    w = torch.tensor([[1.0, 1.0], [2.0, -1.0]])  # (C=2, D=2)
    # class 0: 1*f0 + 1*f1 = (1, 1, 1); class 1: 2*f0 - f1 = (2, -1, 5) -> ReLU (2, 0, 5)
    expected = torch.tensor([[[1.0, 1.0, 1.0], [2.0, 0.0, 5.0]]])
    assert torch.equal(P.class_activation_maps(feats, w), expected)
    with pytest.raises(ValueError, match="channels"):
        P.class_activation_maps(feats, torch.ones(2, 3))


def test_semantic_distance_invariances():
    g = torch.Generator().manual_seed(1)
    f_t, w_t = torch.randn(4, 8, 9, generator=g), torch.randn(10, 8, generator=g)
    f_s, w_s = torch.randn(4, 3, 25, generator=g), torch.randn(10, 3, generator=g)  # other width and map size
    cam_t, cam_s = P.class_activation_maps(f_t, w_t), P.class_activation_maps(f_s, w_s)
    d = P.semantic_distance(cam_t, cam_s)
    assert d.item() > 0
    assert P.semantic_distance(cam_s, cam_t).item() == pytest.approx(d.item())  # symmetric
    perm = torch.randperm(8, generator=g)  # channel order does not matter
    cam_perm = P.class_activation_maps(f_t[:, perm], w_t[:, perm])
    assert P.semantic_distance(cam_t, cam_perm).item() == pytest.approx(0.0, abs=1e-6)
    assert P.semantic_distance(cam_t, 7.0 * cam_t).item() == pytest.approx(0.0, abs=1e-6)  # nor the scale
    loc = torch.randperm(9, generator=g)  # nor the order of the positions (C x C correlation)
    assert P.semantic_distance(cam_t, cam_t[:, :, loc]).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_distance_by_hand_and_invariances():
    f_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal samples: G = I
    f_s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical samples: G = all ones
    assert P.relation_distance(f_t, f_s).item() == pytest.approx(1 - 1 / math.sqrt(2))
    g = torch.Generator().manual_seed(2)
    f = torch.randn(6, 4, 3, 3, generator=g)
    q, _ = torch.linalg.qr(torch.randn(36, 36, generator=g, dtype=torch.float64))
    rotated = (f.flatten(1).double() @ q).float()  # a rotation of the feature space keeps the Gram matrix
    assert P.relation_distance(f, rotated).item() == pytest.approx(0.0, abs=1e-6)
    assert P.relation_distance(f, torch.randn(6, 50, generator=g)).item() > 0  # any widths compare


def test_last_features_of_every_zoo_family():
    x, _ = _batch(4)
    cases = [("cnn", {"width": 8, "depth": 3}, 16), ("resnet8", {}, 16), ("wrn", {"depth": 10, "widen_factor": 1}, 16),
             ("mobilenetv2", {"width_mult": 0.1}, 4), ("mlp", {"hidden": [32]}, 1),
             ("vit_tiny", {"dim": 16, "depth": 1, "heads": 2, "patch_size": 4}, 17)]
    for arch, kwargs, positions in cases:
        model = _zoo(arch, **kwargs)
        f = P.last_features(model, x)
        assert f.shape == (4, model.head.in_features, positions), arch


# ---- DisWOT: the proxies on models


def test_diswot_is_zero_for_the_teacher_itself_and_symmetric():
    t, s = _zoo("cnn", width=16, depth=3), _zoo("cnn", seed=1, width=8, depth=2)
    batch = _batch()
    assert P.diswot(t, t, batch) == pytest.approx(0.0, abs=1e-6)
    score = P.diswot(t, s, batch)
    assert score < 0
    assert P.diswot(s, t, batch) == pytest.approx(score, rel=1e-5)
    assert score == pytest.approx(P.diswot_semantic(t, s, batch) + P.diswot_relation(t, s, batch), rel=1e-5)


def test_diswot_ignores_the_scale_of_the_student_classifier():
    t, s = _zoo("cnn", width=16, depth=3), _zoo("resnet8", seed=1)
    batch = _batch()
    before = P.diswot(t, s, batch)
    with torch.no_grad():
        s.head.weight.mul_(3.0)
    assert P.diswot(t, s, batch) == pytest.approx(before, rel=1e-5)


def test_proxies_need_a_teacher_only_when_they_compare():
    s, batch = _zoo("cnn", width=8, depth=2), _batch()
    with pytest.raises(Exception, match="teacher"):
        P.diswot(None, s, batch)
    assert P.naswot(None, s, batch) > 0


def test_proxies_leave_the_models_unchanged():
    t, s = _zoo("cnn", width=16, depth=3), _zoo("resnet8", seed=1)
    t.eval()
    before_t = {k: v.clone() for k, v in t.state_dict().items()}
    before_s = {k: v.clone() for k, v in s.state_dict().items()}
    for name, fn in P.PROXIES.items():
        fn(t, s, _batch())
        assert not t.training and s.training, name
        assert all(torch.equal(before_s[k], v) for k, v in s.state_dict().items()), name
        assert all(torch.equal(before_t[k], v) for k, v in t.state_dict().items()), name
        assert all(p.grad is None for p in s.parameters()), name


# ---- baselines


def test_params_and_macs_of_a_linear_layer():
    net = nn.Linear(4, 3)
    batch = (torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert P.params(None, net, batch) == 15
    assert P.macs(None, net, batch) == 12  # one sample: 4 x 3 multiply-accumulates


def test_naswot_kernel_on_hand_built_codes():
    codes = torch.tensor([[1, 0, 1], [1, 1, 0]])
    # N_A = 3 units, Hamming distance 2 -> K = [[3, 1], [1, 3]], det 8
    assert torch.equal(P.naswot_kernel(codes), torch.tensor([[3.0, 1.0], [1.0, 3.0]], dtype=torch.float64))
    assert P.naswot_logdet(codes) == pytest.approx(math.log(8))
    assert P.naswot_logdet(torch.tensor([[1, 0], [1, 0]])) == float("-inf")  # shared code: singular
    three = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]])
    assert P.naswot_logdet(three) == pytest.approx(P.naswot_logdet(three[[2, 0, 1]]))  # sample order


class _FunctionalNet(nn.Module):
    """The same net as _module_net(), with the ReLU called as a function (as the zoo's ResNets do)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(F.relu(self.first(x)))


def _module_net(act=nn.ReLU):
    first, second = nn.Linear(2, 3), nn.Linear(3, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        first.bias.zero_()
    return nn.Sequential(first, act(), second)


def test_naswot_captures_rectifier_codes_by_hand():
    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [2.0, -1.0]])
    # pre-activations: (1, 2, -1), (-1, 3, -4), (2, -1, 3) -> codes (1,1,0), (0,1,0), (1,0,1)
    codes = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    expected = P.naswot_logdet(codes)
    batch = (x, torch.zeros(3, dtype=torch.long))
    net = _module_net()
    assert P.naswot(None, net, batch) == pytest.approx(expected)
    assert P.naswot(None, _FunctionalNet(net[0], net[2]), batch) == pytest.approx(expected)
    assert P.naswot(None, _module_net(nn.ReLU6), batch) == pytest.approx(expected)
    assert P.naswot(None, _module_net(nn.GELU), batch) == pytest.approx(expected)
    with pytest.raises(Exception, match="rectifier"):
        P.naswot(None, nn.Linear(2, 2), batch)


def test_synflow_of_a_two_layer_linear_net_by_hand():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
        net[2].weight.copy_(torch.tensor([[-1.0, 2.0]]))
    # R = 1^T |W2| |W1| 1 = |W2| (3, 3.5) = 3 + 7 = 10; each layer's saliencies sum to R
    batch = (torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    assert P.synflow(None, net, batch) == pytest.approx(20.0)
    assert torch.equal(net[0].weight, torch.tensor([[1.0, -2.0], [3.0, 0.5]]))  # the model is not touched
    assert net[0].weight.dtype == torch.float32


def test_synflow_is_data_free():
    s = _zoo("cnn", width=8, depth=2)
    assert P.synflow(None, s, _batch(seed=0)) == P.synflow(None, s, _batch(seed=1))


def test_grad_norm_of_a_linear_layer_by_hand():
    torch.manual_seed(0)
    net = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    probs = torch.softmax(x @ net.weight.detach().T + net.bias.detach(), dim=1)
    # d(mean CE)/dW = (softmax - onehot)^T x / B
    grad = (probs - F.one_hot(y, 4).float()).T @ x / 5
    assert P.grad_norm(None, net, (x, y)) == pytest.approx(grad.norm().item(), rel=1e-5)
    assert net.weight.grad is None
