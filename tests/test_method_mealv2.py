"""Teacher ensembles (a list of teachers wherever a teacher is accepted) and MEAL V2
(Shen & Savvides 2020): averaged soft labels, KL without labels, output discriminator."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from distillery import methods
from distillery.config import config_from_dict
from distillery.engine import fit
from distillery.errors import ConfigError
from distillery.engine.trainer import Ensemble
from distillery.methods.base import ModelOutput, Progress
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROGRESS = Progress(epoch=0.0, step=0, total_steps=1)


def _members():
    torch.manual_seed(0)
    return [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)) for _ in range(3)]


def test_ensemble_mean_probs_is_the_average_softmax():
    ms = _members()
    x = torch.randn(5, 4)
    out = Ensemble(ms, "mean_probs")(x)
    mean = torch.stack([F.softmax(m(x), -1) for m in ms]).mean(0)
    torch.testing.assert_close(F.softmax(out, -1), mean)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(5))  # log-probabilities already
    torch.testing.assert_close(Ensemble(ms, "mean_logits")(x), torch.stack([m(x) for m in ms]).mean(0))


def test_member_outputs_and_layers_can_be_tapped():
    ms = _members()
    ens = Ensemble(ms)
    x = torch.randn(2, 4)
    with Taps(ens, ["members.1", "members.2.1"]) as taps:
        ens(x)
        got = taps.collect()
    torch.testing.assert_close(got["members.1"], ms[1](x))
    torch.testing.assert_close(got["members.2.1"], ms[2](x))


def _cfg(teacher):
    return config_from_dict({"student": {"arch": "mlp"}, "teacher": teacher, "method": {"name": "kd"}})


def test_config_list_shorthand_and_validation():
    cfg = _cfg([{"run": "a"}, {"run": "b"}])
    assert [s.run for s in cfg.teacher.sources] == ["a", "b"] and cfg.teacher.combine == "mean_probs"
    assert _cfg({"run": "a"}).teacher.sources[0].run == "a"
    with pytest.raises(ConfigError, match="exactly one"):
        _cfg({"run": "a", "ensemble": [{"run": "b"}]})
    with pytest.raises(ConfigError, match="exactly one of `run`"):
        _cfg([{"run": "a", "model": {"arch": "mlp"}}])


def _method(**params):
    spec = methods.get_spec("mealv2")
    return spec.cls(spec.validate_params(params), student=torch.nn.Linear(4, 3), teacher_layers=None, num_classes=3)


def test_mealv2_kl_term_uses_the_averaged_softmax_and_no_labels():
    torch.manual_seed(0)
    m = _method(adversarial_weight=0.0, disc_weight=0.0)
    s = torch.randn(6, 3)
    p_bar = torch.softmax(torch.randn(2, 6, 3), -1).mean(0)
    terms = m(ModelOutput(s), ModelOutput(p_bar.log()), torch.zeros(6, dtype=torch.long), PROGRESS)
    expected = (p_bar * (p_bar.log() - F.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(terms["kl"], expected)
    other = m(ModelOutput(s), ModelOutput(p_bar.log()), torch.tensor([2, 1, 0, 2, 1, 0]), PROGRESS)
    assert set(terms) == {"kl"} and torch.equal(terms["kl"], other["kl"])  # hard labels are not used


def test_each_adversarial_term_moves_only_its_own_player():
    torch.manual_seed(0)
    m = _method()
    s = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 3)
    terms = m(ModelOutput(s), ModelOutput(t), torch.zeros(6, dtype=torch.long), PROGRESS)
    terms["adv"].backward(retain_graph=True)
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.discriminator.parameters())  # D frozen in the student's term
    s.grad = None
    terms["disc"].backward()
    assert s.grad is None  # the student's outputs are detached in D's loss
    assert all(p.grad is not None for p in m.discriminator.parameters())


def test_discriminator_loss_at_chance_is_log2():
    from distillery.losses.adversarial import discriminator_loss, generator_loss

    z = torch.zeros(4)
    assert discriminator_loss(z, z).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert generator_loss(z).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert discriminator_loss(torch.full((4,), 20.0), torch.full((4,), -20.0)).item() < 1e-6


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teachers")
    runs = []
    for seed in (0, 1):
        cfg = tiny_cfg(tmp, name=f"t{seed}", student={"arch": "cnn", "kwargs": {"width": 8}},
                       train={"epochs": 2, "progress": False, "seed": seed})
        runs.append(fit(cfg))
    return runs


def test_mealv2_distils_an_ensemble_online_and_from_a_cache(tmp_path, two_teachers):
    teacher = [{"run": str(r.run_dir)} for r in two_teachers]
    cfg = tiny_cfg(tmp_path, teacher=teacher, method={"name": "mealv2"}, train={"epochs": 1, "progress": False})
    res = fit(cfg)
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kl", "train_disc", "train_adv"} <= set(row) and "train_ce" not in row
    assert 0.5 < res.summary["teacher_test_accuracy"] <= 1.0  # the ensemble's accuracy
    cached = fit(tiny_cfg(tmp_path, name="cached", teacher={"ensemble": teacher, "cache": True},
                          method={"name": "mealv2"}, train={"epochs": 1, "progress": False}))
    assert cached.summary["teacher_source"] == "cache"
    assert cached.summary["teacher_test_accuracy"] == pytest.approx(res.summary["teacher_test_accuracy"])


def test_any_method_accepts_an_ensemble_and_members_must_agree_on_classes(tmp_path, two_teachers):
    teacher = [{"run": str(r.run_dir)} for r in two_teachers]
    res = fit(tiny_cfg(tmp_path, teacher=teacher, method={"name": "kd"}, train={"epochs": 1, "progress": False}))
    assert res.summary["test_accuracy"] > 0.3


def test_ensemble_cache_fingerprint_differs_from_each_member(two_teachers):
    from distillery.cache import fingerprint
    from distillery.config import DataConfig
    from distillery.data import load_data

    data = load_data(DataConfig(name="digits"))
    a, b = (str(r.run_dir) for r in two_teachers)
    one = _cfg({"run": a, "cache": True})
    both = _cfg({"ensemble": [{"run": a}, {"run": b}], "cache": True})
    logits = _cfg({"ensemble": [{"run": a}, {"run": b}], "combine": "mean_logits", "cache": True})
    fps = {fingerprint(c, data)["teacher"] for c in (one, both, logits)}
    assert len(fps) == 3
