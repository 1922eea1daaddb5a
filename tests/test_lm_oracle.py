"""The teacher-hacking monitor (Tiapkin et al., 2025): golden KL(oracle || student) and proxy
KL(teacher || student) on held-out data, the hacking signal, its state across a resume, and the
messages for a run it cannot measure."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distillery.errors import ConfigError
from distillery.lm.config import Monitor
from distillery.lm.oracle import OracleMonitor, token_kl
from test_lm_trainer import cfg_of, raw_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_token_kl_is_the_summed_kl_over_valid_positions_by_hand():
    p = torch.tensor([[[0.0, math.log(3.0)], [5.0, -1.0], [1.0, 1.0]]])  # p = (1/4, 3/4) at position 0
    q = torch.tensor([[[0.0, 0.0], [2.0, 2.0], [math.log(4.0), 0.0]]])   # q = (1/2, 1/2); position 2: (4/5, 1/5)
    valid = torch.tensor([[True, False, True]])                           # position 1 is padding: ignored
    value, n = token_kl(p, q, valid)
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert n == 2
    assert value == pytest.approx(kl0 + kl2, abs=1e-6)
    assert token_kl(p, p, valid)[0] == pytest.approx(0.0, abs=1e-7)
    # KL is not symmetric: the monitor's argument order (oracle/teacher first) matters
    assert token_kl(q, p, valid)[0] != pytest.approx(value, abs=1e-3)


def _monitor(history: list[tuple[float, float]]) -> OracleMonitor:
    m = OracleMonitor(Monitor(oracle="unused"))
    m.history = [{"step": 10 * (i + 1), "oracle_kl": g, "teacher_kl": p} for i, (g, p) in enumerate(history)]
    m.floor = 0.3
    return m


def test_signal_is_the_golden_rise_after_its_minimum_while_the_proxy_keeps_falling():
    hacked = _monitor([(1.0, 0.50), (0.8, 0.40), (0.9, 0.30)])
    assert hacked.signal() == pytest.approx(0.1)
    s = hacked.summary()
    assert s["oracle_kl_min"] == 0.8 and s["oracle_kl_min_step"] == 20 and s["oracle_kl_final"] == 0.9
    assert s["teacher_kl_final"] == 0.30 and s["oracle_teacher_kl"] == 0.3 and s["teacher_hacking"] is True


@pytest.mark.parametrize("history", [
    [(1.0, 0.50), (0.8, 0.40), (0.9, 0.45)],   # the proxy rose too: over-fitting, not hacking
    [(1.0, 0.50), (0.9, 0.40), (0.8, 0.30)],   # the golden metric is still falling
    [(0.8, 0.40)],                              # one measurement: nothing to compare
])
def test_no_signal_when_the_proxy_rises_or_the_golden_metric_falls(history):
    m = _monitor(history)
    assert m.signal() == 0.0 and m.summary()["teacher_hacking"] is False


def test_a_rise_within_the_tolerance_is_not_reported():
    m = _monitor([(0.8, 0.40), (0.804, 0.30)])      # +0.5 % of the minimum, tolerance 1 %
    assert m.signal() == pytest.approx(0.004)
    assert m.summary()["teacher_hacking"] is False
    assert _monitor([(0.8, 0.40), (0.81, 0.30)]).summary()["teacher_hacking"] is True  # +1.25 %
    assert OracleMonitor(Monitor(oracle="x")).signal() == 0.0 and OracleMonitor(Monitor(oracle="x")).summary() == {}


def test_state_round_trips_through_json():
    m = _monitor([(1.0, 0.50), (0.8, 0.40), (0.9, 0.30)])
    restored = OracleMonitor(Monitor(oracle="unused"))
    restored.load_state_dict(json.loads(json.dumps(m.state_dict())))   # as stored in state.json
    assert restored.history == m.history and restored.floor == m.floor
    assert restored.summary() == m.summary()


def _monitored(lm_tiny, tmp_path, oracle, **over):
    return cfg_of(lm_tiny, tmp_path, monitor={"oracle": str(oracle), "every": 2, "max_batches": 8},
                  train={"scheduler": "constant", "max_steps": 4, "batch_size": 4, "progress": False,
                         "checkpoint_every": 2}, **over)


@pytest.fixture(scope="module")
def other_oracle(lm_tiny, tmp_path_factory):
    """A third model with the shared vocabulary (another random GPT-2): KL(oracle || teacher) > 0."""
    from lm_helpers import make_model

    return make_model(tmp_path_factory.mktemp("oracle") / "oracle", lm_tiny["tok"], n_layer=1, n_embd=32,
                      n_positions=64, seed=7)


def test_end_to_end_the_logged_values_are_the_kls_of_the_exported_student(lm_tiny, tmp_path, other_oracle):
    """The final row's golden/proxy metrics equal an independent evaluation of the exported student
    against the oracle and the teacher on the same held-out blocks (evaluate_lm's KL)."""
    from transformers import AutoModelForCausalLM

    from distillery.lm import data as lmdata
    from distillery.lm import models as lmmodels
    from distillery.lm.evaluate import evaluate_lm
    from distillery.lm.trainer import distill_lm

    cfg = _monitored(lm_tiny, tmp_path, other_oracle)
    result = distill_lm(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "oracle_kl" in r]
    assert [r["step"] for r in measured] == [2, 4]
    assert all({"teacher_kl", "hacking"} <= set(r) for r in measured)
    o = result.summary["oracle"]
    assert o["oracle_kl_final"] == measured[-1]["oracle_kl"] and o["teacher_kl_final"] == measured[-1]["teacher_kl"]

    tok = lmmodels.load_tokenizer(cfg.student)
    student = AutoModelForCausalLM.from_pretrained(result.run_dir / "student").eval()
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).eval()  # noqa: E731
    loader = torch.utils.data.DataLoader(lmdata.load_splits(cfg.data, tok).eval, batch_size=4,
                                         collate_fn=lambda r: lmdata.collate(r, tok.pad_token_id))
    assert len(loader) <= 8  # max_batches covers the whole held-out set
    V, cpu = len(tok), torch.device("cpu")
    golden = evaluate_lm(student, load(other_oracle), loader, cpu, V)["eval_kl"]
    proxy = evaluate_lm(student, load(lm_tiny["teacher"]), loader, cpu, V)["eval_kl"]
    floor = evaluate_lm(load(lm_tiny["teacher"]), load(other_oracle), loader, cpu, V)["eval_kl"]
    assert o["oracle_kl_final"] == pytest.approx(golden, rel=1e-4)
    assert o["teacher_kl_final"] == pytest.approx(proxy, rel=1e-4)
    assert o["teacher_kl_final"] == pytest.approx(result.summary["eval_kl"], rel=1e-4)  # the trainer's own KL
    assert o["oracle_teacher_kl"] == pytest.approx(floor, rel=1e-4) and floor > 0.01


def test_resume_keeps_the_history(lm_tiny, tmp_path, other_oracle):
    """Stopped after 2 steps and resumed to 4, the monitor has the measurements of both parts (its
    history and floor come back from the checkpoint) and agrees with the uninterrupted run."""
    from distillery.lm.trainer import distill_lm

    straight = distill_lm(_monitored(lm_tiny, tmp_path / "a", other_oracle)).summary["oracle"]
    first = _monitored(lm_tiny, tmp_path / "b", other_oracle)
    first.train.max_steps = 2
    distill_lm(first)
    resumed = distill_lm(_monitored(lm_tiny, tmp_path / "b", other_oracle), resume=True)
    state = json.loads((resumed.run_dir / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert [r["step"] for r in state["hooks"]["oracle"]["history"]] == [2, 4]
    o = resumed.summary["oracle"]
    for key in ("oracle_teacher_kl", "oracle_kl_min", "oracle_kl_final", "teacher_kl_final", "hacking_signal"):
        assert o[key] == pytest.approx(straight[key], rel=1e-4, abs=1e-6), key
    assert o["oracle_kl_min_step"] == straight["oracle_kl_min_step"]


def test_oracle_with_another_vocabulary_is_refused(lm_tiny, tmp_path):
    from lm_helpers import make_model, make_tokenizer

    from distillery.lm.trainer import distill_lm

    tok = make_tokenizer(tmp_path / "tok", vocab_size=280)
    oracle = make_model(tmp_path / "oracle", tok, n_layer=1, n_embd=16, n_positions=64)
    with pytest.raises(ConfigError, match=r"oracle's vocabulary differs.*one tokenizer"):
        distill_lm(_monitored(lm_tiny, tmp_path, oracle))


def test_no_held_out_data_is_refused(lm_tiny, tmp_path, other_oracle):
    from distillery.lm.trainer import distill_lm

    cfg = _monitored(lm_tiny, tmp_path, other_oracle, data={"eval_fraction": 0.0})
    with pytest.raises(ConfigError, match=r"held-out data.*eval_fraction > 0 or data.eval_source"):
        distill_lm(cfg)


def test_an_episode_of_hacking_that_ends_before_the_run_is_kept_as_the_max():
    m = _monitor([(1.0, 0.50), (0.8, 0.40), (0.9, 0.30), (0.7, 0.20)])  # rose, then fell below the old minimum
    s = m.summary()
    assert s["hacking_signal"] == 0.0 and s["hacking_signal_max"] == pytest.approx(0.1)


def test_a_monitor_with_a_uld_teacher_is_refused_at_load(lm_tiny, tmp_path):
    from distillery.lm.config import lm_config_from_dict

    with pytest.raises(ConfigError, match="uld teacher has another tokenizer"):
        lm_config_from_dict(raw_cfg(lm_tiny, tmp_path, loss={"name": "uld"}, monitor={"oracle": "x"}))


def test_a_monitor_without_teacher_is_refused_at_load(lm_tiny, tmp_path):
    from distillery.lm.config import lm_config_from_dict

    raw = raw_cfg(lm_tiny, tmp_path, loss={"name": "ce"}, monitor={"oracle": "x"})
    del raw["teacher"]
    with pytest.raises(ConfigError, match="add a `teacher:`"):
        lm_config_from_dict(raw)


def test_the_ready_config_is_a_monitored_offline_run():
    from pathlib import Path

    from distillery.lm.config import load_lm_config

    cfg = load_lm_config(Path(__file__).resolve().parents[1] / "configs/lm/data/teacher_hacking.yaml")
    assert cfg.monitor.oracle == "runs/lm/teacher" and cfg.teacher.path != cfg.monitor.oracle
    assert cfg.seqkd.enabled and cfg.onpolicy.lmbda == 0 and cfg.data.eval_source
    online = load_lm_config(Path(__file__).resolve().parents[1] / "configs/lm/data/teacher_hacking.yaml",
                            ["seqkd.enabled=false", "onpolicy.lmbda=1.0"])
    assert online.onpolicy.lmbda == 1.0 and not online.seqkd.enabled
