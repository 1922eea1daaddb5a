"""distill_lm's extension points: a hook that chooses the training rows, logs values and keeps
state across an interruption; training on given splits."""
from __future__ import annotations

import json

import pytest
import torch

from distillery.lm.hooks import LMHook
from test_lm_trainer import cfg_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OnlyRows(LMHook):
    """Reads only rows of `allowed`, in an order fixed by (step, micro); counts its steps."""

    name = "only_rows"

    def __init__(self, allowed: list[int]):
        self.allowed, self.seen, self.steps_seen = allowed, [], 0

    def setup(self, ctx):
        self.n_train = len(ctx.train)

    def batch_indices(self, step, micro, size):
        g = torch.Generator().manual_seed(step * 7 + micro)
        picks = torch.randint(len(self.allowed), (size,), generator=g).tolist()
        rows = [self.allowed[i] for i in picks]
        self.seen.extend(rows)
        return rows

    def after_step(self, step, ctx):
        self.steps_seen += 1
        return {"hook_value": float(step) * 10}

    def summary(self):
        return {"steps_seen": self.steps_seen}

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state.get("steps_seen", 0)


def test_a_hook_chooses_the_rows_and_logs(lm_tiny, tmp_path, monkeypatch):
    from distillery.lm import data as lmdata
    from distillery.lm.trainer import distill_lm

    read = []
    real_collate = lmdata.collate

    def spy(rows, pad):
        out = real_collate(rows, pad)
        if "index" in rows[0]:
            read.extend(int(r["index"]) for r in rows)
        return out

    monkeypatch.setattr(lmdata, "collate", spy)
    hook = OnlyRows([1, 3])
    result = distill_lm(cfg_of(lm_tiny, tmp_path, train={"max_steps": 3, "grad_accum": 2}), hooks=[hook])
    assert set(read) == {1, 3} and len(read) == 3 * 2 * 4  # steps x micro-batches x batch size
    assert read == hook.seen
    assert result.summary["only_rows"] == {"steps_seen": 3}
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["hook_value"] for r in rows if "hook_value" in r] == [10.0, 20.0, 30.0]  # logged every step it speaks


def test_hook_state_survives_an_interruption(lm_tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distillery.lm.trainer import distill_lm

    whole = distill_lm(cfg_of(lm_tiny, tmp_path, name="whole", train={"max_steps": 4, "checkpoint_every": 2}),
                       hooks=[OnlyRows([0, 2, 5])])
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    cfg = cfg_of(lm_tiny, tmp_path, name="broken", train={"max_steps": 4, "checkpoint_every": 2})
    monkeypatch.setattr(torch.optim.AdamW, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        distill_lm(cfg, hooks=[OnlyRows([0, 2, 5])])
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    hook = OnlyRows([0, 2, 5])
    resumed = distill_lm(cfg, resume=True, hooks=[hook])
    assert resumed.summary["only_rows"] == {"steps_seen": 4}  # 2 before the checkpoint + 2 after
    a = load_file(str(whole.run_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "student" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_given_splits_replace_the_config_data(lm_tiny, tmp_path):
    from transformers import AutoTokenizer

    from distillery.errors import DataError
    from distillery.lm import data as lmdata
    from distillery.lm.trainer import distill_lm

    cfg = cfg_of(lm_tiny, tmp_path, train={"max_steps": 2})
    tok = AutoTokenizer.from_pretrained(lm_tiny["student"])
    splits = lmdata.load_splits(cfg.data, tok)
    few = lmdata.LMSplits(splits.train.select(range(5)), splits.eval, 1)
    assert distill_lm(cfg, splits=few).summary["train_sequences"] == 5
    cfg.name = "too-few"
    with pytest.raises(DataError, match="do not fill one batch"):
        distill_lm(cfg, splits=lmdata.LMSplits(splits.train.select(range(3)), splits.eval, 1))


def test_cli_monitor_oracle_reports_the_hacking_verdict(lm_tiny, tmp_path):
    """With the teacher itself as the oracle, golden and proxy metrics coincide and the
    teacher is at distance 0 from the oracle."""
    import yaml
    from typer.testing import CliRunner

    from distillery.cli import app
    from test_lm_trainer import raw_cfg

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_cfg(lm_tiny, tmp_path, train={"max_steps": 4})))
    res = CliRunner().invoke(app, ["lm", "distill", str(path), "--monitor-oracle", str(lm_tiny["teacher"]),
                                   "--set", "monitor.every=2"])
    assert res.exit_code == 0, res.output
    assert "oracle KL: min" in res.output and "no teacher hacking detected" in res.output
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())["oracle"]
    assert summary["oracle_teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    assert summary["oracle_kl_final"] == pytest.approx(summary["teacher_kl_final"])
    rows = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "oracle_kl" in r] == [2, 4]


def test_two_hooks_that_choose_rows_are_refused(lm_tiny, tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.trainer import distill_lm

    first, second = OnlyRows([1]), OnlyRows([2])
    second.name = "other_rows"
    with pytest.raises(ConfigError, match="each choose the training rows"):
        distill_lm(cfg_of(lm_tiny, tmp_path, train={"max_steps": 1}), hooks=[first, second])
