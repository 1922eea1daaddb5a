"""DDK (Liu et al., 2024): the discrepancy factor, factor smooth updating, domain sampling, the hook's
resume, bad domain specs, and tiny end-to-end runs through distill_lm."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from lm_helpers import STDLIB

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_discrepancy_factor_is_eq1_on_hand_built_perplexities():
    from distillery.lm.ddk import discrepancy_factor

    r = discrepancy_factor([10.0, 20.0, 5.0], [5.0, 5.0, 5.0])       # ratios 2, 4, 1
    z = math.exp(2) + math.exp(4) + math.exp(1)
    assert np.allclose(r, [math.exp(2) / z, math.exp(4) / z, math.exp(1) / z])
    # huge ratios do not overflow (the max is subtracted before exp)
    assert np.allclose(discrepancy_factor([1e5, 1e5], [1.0, 1.0]), [0.5, 0.5])


def test_smooth_update_is_eq2_and_its_limits():
    from distillery.lm.ddk import smooth_update

    r_prev = [0.2, 0.8]
    got = smooth_update(r_prev, [30.0, 10.0], [10.0, 10.0], alpha=0.5)  # ratios 3, 1
    psi = [0.2 * math.exp(3), 0.8 * math.exp(1)]
    expect = [0.5 * p / sum(psi) + 0.25 for p in psi]
    assert np.allclose(got, expect) and math.isclose(sum(got), 1.0)
    assert np.allclose(smooth_update(r_prev, [30.0, 10.0], [10.0, 10.0], alpha=0.0), [0.5, 0.5])   # uniform
    assert np.allclose(smooth_update(r_prev, [30.0, 10.0], [10.0, 10.0], alpha=1.0),
                       [p / sum(psi) for p in psi])                                               # no floor
    # equal gaps keep the previous mixture, only pulled towards uniform
    assert np.allclose(smooth_update([0.1, 0.3, 0.6], [8.0] * 3, [2.0] * 3, 0.5),
                       [0.5 * 0.1 + 1 / 6, 0.5 * 0.3 + 1 / 6, 0.5 * 0.6 + 1 / 6])
    # the floor (1 - α)/N holds however extreme the gaps
    assert min(smooth_update([0.5, 0.5], [1e4, 1.0], [1.0, 1.0], 0.5)) >= 0.25 - 1e-12


def test_sampling_follows_the_weights_and_is_a_function_of_seed_step_micro():
    from distillery.lm.ddk import sample_rows

    ranges = [(0, 10), (10, 13), (13, 113)]
    weights = [0.5, 0.3, 0.2]
    rows = np.array([i for step in range(40) for i in sample_rows(weights, ranges, 500, seed=0, step=step, micro=0)])
    freq = [np.mean((rows >= a) & (rows < b)) for a, b in ranges]
    assert np.allclose(freq, weights, atol=0.01)                      # 20,000 draws: std of a frequency < 0.004
    small = rows[(rows >= 10) & (rows < 13)]
    assert set(small.tolist()) == {10, 11, 12}                        # uniform inside a domain, all rows reachable
    assert sample_rows(weights, ranges, 64, 0, 5, 1) == sample_rows(weights, ranges, 64, 0, 5, 1)
    assert sample_rows(weights, ranges, 64, 0, 5, 1) != sample_rows(weights, ranges, 64, 0, 6, 1)
    assert sample_rows(weights, ranges, 64, 0, 5, 1) != sample_rows(weights, ranges, 64, 1, 5, 1)
    assert all(10 <= i < 13 for i in sample_rows([0, 1, 0], ranges, 50, 0, 0, 0))


class _Ctx:
    teacher = object()
    student = object()


def test_hook_updates_by_eq2_every_k_steps_and_a_restored_hook_continues_the_mixture(monkeypatch):
    from distillery.lm.ddk import DDKMixture, discrepancy_factor, smooth_update

    teacher_ppl = [50.0, 100.0, 80.0]
    student_ppls = iter([[400.0, 500.0, 300.0], [300.0, 450.0, 200.0], [250.0, 420.0, 150.0]])
    hook = DDKMixture(["a", "b", "c"], [(0, 5), (5, 9), (9, 20)], [None] * 3, interval=3, alpha=0.5)

    def measure(model, ctx):
        return teacher_ppl if model is ctx.teacher else next(student_ppls)

    monkeypatch.setattr(hook, "_perplexities", measure)
    hook.setup(_Ctx())
    r0 = discrepancy_factor([400.0, 500.0, 300.0], teacher_ppl)
    assert np.allclose(hook.weights, r0)
    assert hook.after_step(1, _Ctx()) == {} and hook.after_step(2, _Ctx()) == {}
    logged = hook.after_step(3, _Ctx())
    r1 = smooth_update(r0, [300.0, 450.0, 200.0], teacher_ppl, 0.5)
    assert np.allclose(hook.weights, r1) and np.allclose([logged[f"ddk_w_{n}"] for n in "abc"], r1)
    assert logged["ddk_ppl_b"] == 450.0

    restored = DDKMixture(["a", "b", "c"], [(0, 5), (5, 9), (9, 20)], [None] * 3, interval=3, alpha=0.5)
    restored.load_state_dict(json.loads(json.dumps(hook.state_dict())))   # through the checkpoint's JSON
    monkeypatch.setattr(restored, "_perplexities", lambda *a: pytest.fail("a resumed hook re-measured r_0"))
    restored.setup(_Ctx())
    assert restored.weights == hook.weights and restored.history == hook.history
    assert [restored.batch_indices(4, m, 16) for m in range(2)] == [hook.batch_indices(4, m, 16) for m in range(2)]
    monkeypatch.setattr(restored, "_perplexities", measure)
    restored.after_step(6, _Ctx())
    assert np.allclose(restored.weights, smooth_update(r1, [250.0, 420.0, 150.0], teacher_ppl, 0.5))

    uniform = DDKMixture(["a", "b"], [(0, 5), (5, 9)], [None] * 2, interval=1, mixture="uniform")
    monkeypatch.setattr(uniform, "_perplexities", lambda model, ctx: [9.0, 1.0])
    uniform.setup(_Ctx())
    uniform.after_step(1, _Ctx())
    assert uniform.weights == [0.5, 0.5] and len(uniform.history) == 2


def _domain_dirs(tmp_path):
    """Two real domains of >= 4 files each: JSON's package and four small top-level modules."""
    other = tmp_path / "text_utils"
    other.mkdir(exist_ok=True)
    for f in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        shutil.copy(f"{STDLIB}/{f}", other / f)
    return [{"name": "json", "source": f"{STDLIB}/json/*.py"}, {"name": "text", "source": str(other / "*.py")}]


def _cfg(lm_tiny, tmp_path, **over):
    from distillery.lm.ddk import DDKConfig

    raw = {"name": "d", "output_dir": str(tmp_path / "runs"), "teacher": {"path": str(lm_tiny["teacher"])},
           "student": {"path": str(lm_tiny["student"])}, "domains": _domain_dirs(tmp_path), "block_size": 32,
           "ddk": {"interval": 2, "val_blocks": 4, "test_blocks": 4, "val_fraction": 0.2, "test_fraction": 0.2},
           "train": {"max_steps": 6, "batch_size": 4, "progress": False, "checkpoint_every": 2, "warmup_steps": 0,
                     "scheduler": "constant"}}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) and isinstance(value, dict) else value
    return DDKConfig.model_validate(raw)


def test_bad_domain_specs_give_one_clear_message(lm_tiny, tmp_path):
    from distillery.errors import ConfigError, DataError
    from distillery.lm.ddk import load_ddk_config, run_ddk

    path = tmp_path / "d.yaml"
    path.write_text("domains: [{name: a, source: x}, {name: a, source: y}]\n")
    with pytest.raises(ConfigError, match="domain names must be distinct"):
        load_ddk_config(path)
    path.write_text("domains: [{name: a, source: x}]\n")
    with pytest.raises(ConfigError, match="domains: List should have at least 2 items"):
        load_ddk_config(path)
    missing = _cfg(lm_tiny, tmp_path, name="m", domains=[*_domain_dirs(tmp_path)[:1],
                                                          {"name": "gone", "source": str(tmp_path / "no" / "*.py")}])
    with pytest.raises(DataError, match=r"domain 'gone': no file matches"):
        run_ddk(missing)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.py").write_text("x = 1\n" * 50)
    empty = _cfg(lm_tiny, tmp_path, name="e", domains=[*_domain_dirs(tmp_path)[:1],
                                                        {"name": "tiny", "source": str(tmp_path / "tiny" / "*.py")}])
    with pytest.raises(DataError, match=r"domain 'tiny' .* has 1 document\(s\); each domain needs at least 3"):
        run_ddk(empty)


def test_end_to_end_ddk_and_uniform_runs_and_an_interrupted_run_resumes_the_mixture(lm_tiny, tmp_path, monkeypatch):
    from distillery.lm import ddk as ddk_mod
    from distillery.lm.ddk import run_ddk

    full = run_ddk(_cfg(lm_tiny, tmp_path, name="full"))
    hist = full["history"]
    assert [h["step"] for h in hist] == [0, 2, 4, 6] and full["steps"] == 6
    for h in hist:
        assert math.isclose(sum(h["weights"]), 1.0) and min(h["weights"]) >= 0.25 - 1e-9
    for prev, nxt in zip(hist, hist[1:]):    # each update is eq. 2 on the logged perplexities
        teacher = [full["teacher_val_ppl"][n] for n in ("json", "text")]
        assert np.allclose(nxt["weights"], ddk_mod.smooth_update(prev["weights"], nxt["student_ppl"], teacher, 0.5))
    run = tmp_path / "runs" / "full"
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ddk_w_json"] for r in rows if "ddk_w_json" in r] == [h["weights"][0] for h in hist[1:]]
    assert (run / "mixture.png").stat().st_size > 1000
    assert set(full["per_domain"]) == {"json", "text"} and full["worst_ppl"] == max(
        v["student_ppl"] for v in full["per_domain"].values())

    uniform = run_ddk(_cfg(lm_tiny, tmp_path, name="uni", ddk={"mixture": "uniform"}))
    assert all(h["weights"] == [0.5, 0.5] for h in uniform["history"])

    # interrupt during step 3 (after the checkpoint of step 2), then run again: it resumes
    real = ddk_mod.DDKMixture.after_step

    def crash(self, step, ctx):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step, ctx)

    monkeypatch.setattr(ddk_mod.DDKMixture, "after_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ddk(_cfg(lm_tiny, tmp_path, name="cut"))
    monkeypatch.setattr(ddk_mod.DDKMixture, "after_step", real)
    resumed = run_ddk(_cfg(lm_tiny, tmp_path, name="cut"))
    assert [h["step"] for h in resumed["history"]] == [0, 2, 4, 6]
    for a, b in zip(resumed["history"], hist):
        assert np.allclose(a["weights"], b["weights"], atol=1e-6)
        assert np.allclose(a["student_ppl"], b["student_ppl"], rtol=1e-4)
