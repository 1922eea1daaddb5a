"""MGSR (Liu et al., 2024): SCRG's error detection, DAC-KL and span correlation consistency
against their definitions, revision through an endpoint teacher, and a tiny end-to-end run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- sequence level: the error token --------------------------------------------------------------

def test_revision_point_is_the_first_token_outside_the_teachers_top_k():
    from distillery.losses.mgsr import revision_points

    # teacher ranks at every position: token 0 > 1 > 2 > 3
    t = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).expand(2, 5, 4)
    tokens = torch.tensor([[0, 1, 2, 0, 3], [1, 0, 1, 0, 1]])
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    assert revision_points(tokens, t, valid, top_k=2).tolist() == [2, -1]
    assert revision_points(tokens, t, valid, top_k=1).tolist() == [1, 0]
    # probability rule: 0.15 >= 0.1 is accepted, 0.05 is not
    assert revision_points(tokens, t, valid, top_k=None, min_prob=0.1).tolist() == [4, -1]
    # position 0 of row 0 is the prompt: never an error even though 0 < top_k is fine anyway
    assert revision_points(torch.tensor([[3, 0]]), t[:1, :2], torch.tensor([[False, True]]), top_k=1).tolist() == [-1]
    with pytest.raises(ValueError, match="acceptance rule"):
        revision_points(tokens, t, valid, top_k=None, min_prob=0.0)


# ---- token level: DAC-KL --------------------------------------------------------------------------

def _fkl(s, t, targets):
    valid = targets != -100
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return (kl * valid).sum() / valid.sum()


def test_dac_kl_without_clipping_is_the_forward_kl():
    from distillery.losses.mgsr import dac_kl

    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    targets = torch.randint(11, (2, 6))
    targets[1, 4:] = -100
    want = _fkl(s, t, targets)
    assert dac_kl(s, t, targets).item() == pytest.approx(want.item(), rel=1e-5)
    assert dac_kl(s, t, targets, 0.0, 1.0, sharpness=0.3).item() == pytest.approx(want.item(), rel=1e-5)


def test_dac_kl_hard_clip_renormalises_on_the_kept_set_by_hand():
    from distillery.losses.mgsr import dac_kl

    p_t = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p_s = torch.tensor([0.25, 0.25, 0.25, 0.25])
    # limits [0.1, 0.4]: keeps tokens 1 and 2; the target (token 0) is kept as well; token 3 is clipped
    kept = [0, 1, 2]
    qt = p_t[kept] / p_t[kept].sum()
    qs = p_s[kept] / p_s[kept].sum()
    by_hand = float((qt * (qt / qs).log()).sum())
    got = dac_kl(p_s.log()[None, None], p_t.log()[None, None], torch.tensor([[0]]), 0.1, 0.4)
    assert got.item() == pytest.approx(by_hand, rel=1e-5)
    # target 3 instead: kept {1, 2, 3}
    kept = [1, 2, 3]
    qt, qs = p_t[kept] / p_t[kept].sum(), p_s[kept] / p_s[kept].sum()
    got = dac_kl(p_s.log()[None, None], p_t.log()[None, None], torch.tensor([[3]]), 0.1, 0.4)
    assert got.item() == pytest.approx(float((qt * (qt / qs).log()).sum()), rel=1e-5)
    # a sharp soft clip approaches the hard one
    soft = dac_kl(p_s.log()[None, None], p_t.log()[None, None], torch.tensor([[3]]), 0.1, 0.4, sharpness=1e-3)
    assert soft.item() == pytest.approx(got.item(), rel=1e-4)


def test_dac_kl_gradients_reach_student_and_limits():
    from distillery.losses.mgsr import dac_kl

    torch.manual_seed(1)
    s = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, dtype=torch.float64)
    lower = torch.full((2, 3), 0.05, dtype=torch.float64, requires_grad=True)
    upper = torch.full((2, 3), 0.5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, 2, -100], [0, 5, 3]])
    assert torch.autograd.gradcheck(lambda a, lo, up: dac_kl(a, t, targets, lo, up, sharpness=0.4), (s, lower, upper))
    with pytest.raises(ValueError, match="sharpness"):
        dac_kl(s, t, targets, sharpness=0.0)


def test_clip_limits_network_orders_its_limits_and_coverage_is_the_kept_mass():
    from distillery.lm.terms import ClipLimits
    from distillery.losses.mgsr import clip_coverage

    torch.manual_seed(0)
    net = ClipLimits(features=8, hidden=16)
    lower, upper = net(torch.randn(2, 5, 50) * 3)
    assert lower.shape == upper.shape == (2, 5)
    assert bool(((lower > 0) & (lower < upper) & (upper < 1)).all())
    assert float(upper.detach().min()) > 0.95 and float(lower.detach().max()) < 1e-3  # starts close to no clipping
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    targets = torch.tensor([[0]])
    # a sharp clip [0.1, 0.4] keeps 0.3 + 0.15 of the teacher's mass
    assert clip_coverage(p.log()[None, None], targets, 0.1, 0.4, sharpness=1e-3).item() == pytest.approx(0.45, abs=1e-3)


# ---- span level: correlation consistency ----------------------------------------------------------

def test_span_ids_start_at_word_boundaries():
    from distillery.losses.mgsr import span_ids_from_starts

    starts = torch.tensor([[False, False, True, False, True, True]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    assert span_ids_from_starts(starts, valid).tolist() == [[0, 0, 1, 1, 2, -1]]


def test_span_correlation_matches_pearson_by_hand_and_is_zero_for_identical_outputs():
    from distillery.losses.mgsr import _span_correlations, span_correlation_loss

    torch.manual_seed(0)
    s, t = torch.randn(1, 5, 7, dtype=torch.float64), torch.randn(1, 5, 7, dtype=torch.float64)
    spans = torch.tensor([[0, 0, 1, 2, 2]])
    pooled = torch.stack([F.softmax(s[0], -1)[[0, 1]].mean(0), F.softmax(s[0], -1)[2], F.softmax(s[0], -1)[[3, 4]].mean(0)])
    c, present = _span_correlations(F.softmax(s, -1), spans, 3)
    assert torch.allclose(c[0], torch.corrcoef(pooled)) and bool(present.all())
    c_t, _ = _span_correlations(F.softmax(t, -1), spans, 3)
    assert span_correlation_loss(s, t, spans).item() == pytest.approx(float(((c[0] - c_t[0]) ** 2).mean()))
    assert span_correlation_loss(s, s.clone(), spans).item() == pytest.approx(0.0, abs=1e-12)
    # the same permutation of the vocabulary for both models changes nothing
    perm = torch.randperm(7)
    assert span_correlation_loss(s[..., perm], t[..., perm], spans).item() == pytest.approx(
        span_correlation_loss(s, t, spans).item())
    # a single span carries no correlation
    assert span_correlation_loss(s, t, torch.zeros_like(spans)).item() == 0.0


def test_span_correlation_gradient():
    from distillery.losses.mgsr import span_correlation_loss

    torch.manual_seed(2)
    s = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 5, dtype=torch.float64)
    spans = torch.tensor([[0, 1, 1, 2], [0, 0, 1, -1]])
    assert torch.autograd.gradcheck(lambda a: span_correlation_loss(a, t, spans), (s,))


# ---- SCRG with a local and an endpoint teacher; a run end to end ----------------------------------

def _cfg(lm_tiny, tmp_path, **over):
    from lm_helpers import source_glob

    from distillery.lm.mgsr import mgsr_config_from_dict

    raw = {"name": "run", "output_dir": str(tmp_path / "runs"), "teacher": {"path": str(lm_tiny["teacher"])},
           "student": {"path": str(lm_tiny["student"])},
           "data": {"source": source_glob(), "block_size": 32, "eval_fraction": 0.25, "max_eval_blocks": 4},
           "revision": {"prob": 1.0, "rows": 2, "prompt_length": 8, "max_new_tokens": 12, "top_k": 3},
           "dac": {"enabled": True, "features": 8, "hidden": 8}, "span": {"weight": 1.0},
           "train": {"max_steps": 3, "batch_size": 4, "checkpoint_every": 2, "progress": False}}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return mgsr_config_from_dict(raw)


def test_revision_keeps_the_accepted_prefix_and_an_endpoint_writer_writes_what_the_local_one_does(lm_tiny, tmp_path):
    from distillery.lm import data as lmdata
    from distillery.lm import models as lmmodels
    from distillery.lm.mgsr import revise
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import GeneratorSpec, HFGenerator, load_generator
    from distillery.losses.mgsr import revision_points

    cfg = _cfg(lm_tiny, tmp_path, revision={"rows": 3, "top_k": 2})
    tok = lmmodels.load_tokenizer(cfg.student)
    teacher = lmmodels.load_model(cfg.teacher, "teacher").eval()
    student = lmmodels.load_model(cfg.student, "student")
    rows = lmdata.load_splits(cfg.data, tok).train
    batch = lmdata.collate([rows[i] for i in range(4)], tok.pad_token_id)
    local = load_generator(GeneratorSpec(path=str(lm_tiny["teacher"])))
    torch.manual_seed(0)
    want, stats = revise(student, teacher, local, tok, batch, cfg.revision, torch.device("cpu"))
    with running_server(HFGenerator.from_spec(GeneratorSpec(path=str(lm_tiny["teacher"])))) as url:
        remote = load_generator(GeneratorSpec(endpoint={"url": url, "model": "teacher"}))
        torch.manual_seed(0)
        got, _ = revise(student, teacher, remote, tok, batch, cfg.revision, torch.device("cpu"))
    assert [r["input_ids"] for r in got] == [r["input_ids"] for r in want]
    assert stats["revised_rows"] > 0  # a random student makes errors the teacher catches
    for r in want:
        ids = torch.tensor([r["input_ids"]])
        p = r["prompt_len"]
        assert ids[0, :p].tolist() == batch["input_ids"][want.index(r), :p].tolist()  # the prompt is untouched
        assert r["targets"][: p - 1] == [-100] * (p - 1)
        with torch.no_grad():
            t = teacher(input_ids=ids).logits
        gen = torch.arange(ids.shape[1])[None] >= p
        first = int(revision_points(ids[:, 1:], t[:, :-1], gen[:, 1:], top_k=2)[0])
        # up to and including the corrected token, the teacher accepts everything
        assert first == -1 or first + 1 > p


def test_run_mgsr_all_levels_end_to_end(lm_tiny, tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.mgsr import run_mgsr

    cfg = _cfg(lm_tiny, tmp_path)
    s = run_mgsr(cfg)
    assert s["steps"] == 3 and s["revised_batches"] == 3
    assert math.isfinite(s["eval_ppl"]) and 0 <= s["agreement"] <= 1 and s["eval_kl"] >= 0
    assert 0 < s["final_kept_mass"] <= 1
    run_dir = tmp_path / "runs" / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"dac_kl", "coverage", "span", "revised_rows"} <= set(rows[0])
    assert (run_dir / "student" / "model.safetensors").is_file()
    assert run_mgsr(cfg) == s  # finished: read back
    with pytest.raises(ConfigError, match="prompt_length"):
        run_mgsr(_cfg(lm_tiny, tmp_path, name="bad", revision={"prompt_length": 40}))
    with pytest.raises(ConfigError, match="allowed keys"):
        _cfg(lm_tiny, tmp_path, dac={"sharpnes": 1})


def test_extra_terms_are_checked_at_load_and_own_their_learning_rate(lm_tiny, tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.config import lm_config_from_dict
    from distillery.lm.mgsr import lm_config
    from test_lm_trainer import raw_cfg

    with pytest.raises(ConfigError, match="unknown extra term 'dac'"):
        lm_config_from_dict(raw_cfg(lm_tiny, tmp_path, extra_terms=[{"name": "dac"}]))
    with pytest.raises(ConfigError, match="need a `teacher:`, no `cache:`"):
        lm_config_from_dict(raw_cfg(lm_tiny, tmp_path, extra_terms=[{"name": "span_correlation"}],
                                    cache={"k": 4}))
    cfg = lm_config(_cfg(lm_tiny, tmp_path))
    assert cfg.loss.weight == 0 and [t.name for t in cfg.extra_terms] == ["dac_kl", "span_correlation"]
    assert cfg.extra_terms[0].lr == 1e-3
