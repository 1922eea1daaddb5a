"""TAID method: the loss wiring, the schedule state held in buffers (so it is checkpointed), a
resumed run reaching the uninterrupted run's t and weights, and t rising by the adaptive rule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import same_weights, tiny_cfg
from distillery import methods
from distillery.engine import Interrupted, fit
from distillery.losses.logits import cross_entropy
from distillery.losses.taid import TAIDSchedule, taid_loss
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.taid import TAID

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _method(**params):
    spec = methods.get_spec("taid")
    return TAID(spec.validate_params(params), student=torch.nn.Identity(), teacher_layers=None, num_classes=5)


def _progress(step, total=100):
    return Progress(epoch=step / 10, step=step, total_steps=total)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taid_teacher")
    return fit(tiny_cfg(tmp, name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}},
                        train={"epochs": 2, "progress": False, "report": False}))


# --------------------------------------------------------------------------- the method, by hand


def test_terms_are_weighted_taid_and_ce_at_the_current_t():
    m = _method(t_start=0.3, weight=0.75)
    s, t, y = _logits(6, 5, seed=1), _logits(6, 5, seed=2, scale=3.0), torch.tensor([0, 1, 2, 3, 4, 0])
    m.eval()  # no schedule update: the value must be the loss at t_start
    terms = m(ModelOutput(s), ModelOutput(t), y, _progress(0))
    assert set(terms) == {"taid", "ce"}
    assert terms["taid"].item() == pytest.approx(0.75 * taid_loss(s, t, t=0.3).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.25 * cross_entropy(s, None, y).item(), rel=1e-6)
    assert float(m.t) == 0.3 and math.isnan(float(m.prev_loss))  # eval mode left the state alone
    assert set(_method(weight=1.0)(ModelOutput(s), ModelOutput(t), y, _progress(0))) == {"taid"}


def test_buffers_follow_the_papers_schedule_step_by_step():
    """The buffers after each call equal a TAIDSchedule fed the same loss values and progress."""
    m = _method(t_start=0.4, alpha=0.05, beta=0.9)
    ref = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.05, beta=0.9)
    t_logits = _logits(8, 5, seed=3, scale=2.0)
    for step in range(6):
        s = t_logits * (step / 6) + _logits(8, 5, seed=10 + step) * (1 - step / 6)  # student approaches teacher
        y = torch.zeros(8, dtype=torch.long)
        value = taid_loss(s, t_logits, t=ref.t).item()
        m(ModelOutput(s), ModelOutput(t_logits), y, _progress(step))
        ref.update(value, step / 100)
        assert float(m.t) == pytest.approx(ref.t, rel=1e-12)
        assert float(m.momentum) == pytest.approx(ref.momentum, rel=1e-12, abs=1e-15)
        assert float(m.prev_loss) == pytest.approx(ref.prev_loss, rel=1e-6)
    # first call only records the loss (t unchanged), later ones raise t above the linear bound
    assert float(m.t) > ref.lower_bound(5 / 100) > 0.4


def test_schedule_state_is_in_the_state_dict_and_round_trips():
    a = _method(alpha=0.1)
    t = _logits(4, 5, seed=4)
    for step in range(4):
        a(ModelOutput(_logits(4, 5, seed=20 + step)), ModelOutput(t), torch.zeros(4, dtype=torch.long), _progress(step))
    state = a.state_dict()
    assert {"t", "momentum", "prev_loss"} <= set(state) and state["t"].dtype == torch.float64
    b = _method(alpha=0.1)
    assert float(b.t) == 0.4
    b.load_state_dict(state)
    s = _logits(4, 5, seed=99)
    ta = a(ModelOutput(s), ModelOutput(t), torch.zeros(4, dtype=torch.long), _progress(4))["taid"]
    tb = b(ModelOutput(s), ModelOutput(t), torch.zeros(4, dtype=torch.long), _progress(4))["taid"]
    assert ta.item() == tb.item() and float(a.t) == float(b.t) and float(a.momentum) == float(b.momentum)


def test_params_validation():
    spec = methods.get_spec("taid")
    with pytest.raises(ValueError, match="t_start"):
        spec.validate_params({"t_start": 0.9, "t_end": 0.5})
    with pytest.raises(ValueError, match="unknown parameter"):
        spec.validate_params({"temperature": 2.0})


# --------------------------------------------------------------------------- end to end


def _recording(monkeypatch):
    """Keep every TAID instance the engine builds and the t it used at each training step."""
    made, real_init, real_forward = [], TAID.__init__, TAID.forward

    def init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)
        self.t_history = []

    def forward(self, s, t, y, progress):
        self.t_history.append(float(self.t))
        return real_forward(self, s, t, y, progress)

    monkeypatch.setattr(TAID, "__init__", init)
    monkeypatch.setattr(TAID, "forward", forward)
    return made


def test_t_rises_with_the_adaptive_rule_during_training(tmp_path, teacher_run, monkeypatch):
    made = _recording(monkeypatch)
    cfg = tiny_cfg(tmp_path, teacher={"run": str(teacher_run.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                   method={"name": "taid", "params": {"alpha": 0.05, "t_start": 0.2}},
                   train={"epochs": 2, "progress": False, "report": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train_taid" in r and "train_ce" in r for r in rows)
    m = made[-1]
    hist, total = m.t_history, len(m.t_history)
    assert hist[0] == 0.2 and all(b >= a for a, b in zip(hist, hist[1:]))
    sched = TAIDSchedule(t_start=0.2, t_end=1.0)
    # hist[k] is t after k updates, the last of which saw progress (k - 1) / total: half-way through,
    # the adaptive increments have carried t well above the linear schedule it would otherwise follow
    half = total // 2
    assert hist[half] > sched.lower_bound((half - 1) / total) + 0.05
    assert hist[-1] <= float(m.t) <= 1.0
    # the engine logs t each epoch (Method.log_values), outside the loss
    assert [r["method_t"] for r in rows][-1] == pytest.approx(float(m.t))
    assert rows[0]["method_t"] < rows[-1]["method_t"] and "train_method_t" not in rows[0]


def test_resumed_run_ends_with_the_same_t_and_weights(tmp_path, teacher_run, monkeypatch):
    made = _recording(monkeypatch)
    common = dict(teacher={"run": str(teacher_run.run_dir)}, student={"arch": "cnn", "kwargs": {"width": 4}},
                  method={"name": "taid", "params": {"alpha": 0.05}},
                  train={"epochs": 2, "progress": False, "report": False, "checkpoint_every": 7})
    full = fit(tiny_cfg(tmp_path / "a", **common))
    full_t = (float(made[-1].t), float(made[-1].momentum), float(made[-1].prev_loss))

    calls, real_step = {"n": 0}, torch.optim.Adam.step

    def flaky_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 30:  # in the first epoch, between the periodic checkpoints of steps 28 and 35
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    cfg_b = tiny_cfg(tmp_path / "b", **common)
    monkeypatch.setattr(torch.optim.Adam, "step", flaky_step)
    with pytest.raises(Interrupted):
        fit(cfg_b)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert (cfg_b.run_dir / "checkpoints" / "latest").read_text() == "step-00000028"
    interrupted_t = float(made[-1].t)  # advanced past the checkpoint before the crash
    resumed = fit(cfg_b, resume=True)
    m = made[-1]
    assert m.t_history[0] < interrupted_t  # the resumed run restarted from the checkpointed t
    assert (float(m.t), float(m.momentum), float(m.prev_loss)) == full_t
    assert same_weights(full, resumed)
