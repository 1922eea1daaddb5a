import pytest
import torch
from torch import nn

from distillery.errors import ModelError
from distillery.taps import Taps


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))


def test_taps_capture_outputs_and_inputs_and_remove_hooks():
    net, x = _net(), torch.randn(2, 4)
    with Taps(net, ["0", "2.0:input", "2.0"]) as taps:
        y = net(x)
        feats = taps.collect()
    torch.testing.assert_close(feats["0"], net[0](x))
    torch.testing.assert_close(feats["2.0:input"], torch.relu(net[0](x)))
    torch.testing.assert_close(feats["2.0"], y)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_taps_keep_graph_for_student_side():
    net, x = _net(), torch.randn(2, 4)
    with Taps(net, ["0"]) as taps:
        net(x)
        taps["0"].sum().backward()
    assert net[0].weight.grad is not None


def test_bad_path_lists_modules():
    with pytest.raises(ModelError, match="no module 'layer9'.*tap one of"):
        Taps(_net(), ["layer9"])
