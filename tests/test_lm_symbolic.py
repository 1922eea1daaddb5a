"""Symbolic KD / I2D2 (distillery.lm.symbolic): critic rules, filter, learned critic, pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillery.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FUNCS = '''
def add(a, b):
    """Add two numbers."""
    total = a + b
    return total


def _private(self, key, *rest):
    """Look a key up."""
    return self.table[key]


def long_first(x):
    """Not usable: the first statement spans lines."""
    if x:
        return 1
    return 2


def no_doc(y):
    return y
'''


# ---------------------------------------------------------------- the rule critic
def test_check_body_accepts_only_compiling_nontrivial_code_that_reads_a_parameter():
    from distillery.lm.symbolic import check_body

    p = 'def f(a, b):\n    """Doc."""\n'
    assert check_body(p, "    return a + b", ["a", "b"]) == {"compiles": True, "nontrivial": True,
                                                             "uses_params": True, "accepted": True}
    assert check_body(p, "    if b > 0:", ["a", "b"])["accepted"]          # a block header: checked with a pass suite
    assert not check_body(p, "    return 1", ["a", "b"])["nontrivial"]     # a constant
    assert not check_body(p, "    if not None:", ["a", "b"])["nontrivial"]  # constants only
    assert not check_body(p, "    a", ["a", "b"])["nontrivial"]            # a bare name does nothing
    assert check_body(p, "    print(a)", ["a", "b"])["accepted"]           # a call acts
    assert not check_body('def g():\n    """Doc."""\n', "    def __init__(self):", [])["nontrivial"]
    assert not check_body(p, '    """', ["a", "b"])["compiles"]            # the teacher's favourite failure
    assert not check_body(p, "    return c", ["a", "b"])["uses_params"]
    assert check_body('def g():\n    """Doc."""\n', "    return time.time()", [])["accepted"]  # nothing to read
    assert not check_body(p, "    return (a +", ["a", "b"])["compiles"]


def test_check_body_never_runs_the_generated_code(tmp_path):
    from distillery.lm.symbolic import check_body

    marker = tmp_path / "ran"
    # a default argument runs when a `def` is executed, a body when it is called: neither happens
    prompt = f'def f(a=__import__("pathlib").Path({str(marker)!r}).touch()):\n    """Doc."""\n'
    body = f'    return __import__("pathlib").Path({str(marker)!r}).write_text(str(a))'
    assert check_body(prompt, body, ["a"])["accepted"]
    assert not marker.exists()
    assert not check_body(prompt, "    return a\x00", ["a"])["compiles"]  # null byte: ValueError, caught


def test_function_prompts_keep_header_docstring_and_the_one_line_reference(tmp_path):
    from distillery.lm.symbolic import function_prompts

    (tmp_path / "m.py").write_text(FUNCS)
    found = {p["name"]: p for p in function_prompts(str(tmp_path / "*.py"))}
    assert set(found) == {"add", "_private"}
    assert found["add"]["prompt"] == 'def add(a, b):\n    """Add two numbers."""\n'
    assert found["add"]["reference"] == "    total = a + b"
    assert found["_private"]["params"] == ["key", "rest"]  # self is not a parameter to read


# ---------------------------------------------------------------- filter and learned critic
def test_select_keeps_exactly_the_scores_above_threshold_or_the_top_fraction():
    from distillery.lm.symbolic import select

    scores = [0.2, 0.9, 0.5, 0.49999, 0.7, 0.5]
    assert select(scores, threshold=0.5) == [1, 2, 4, 5]
    assert select(scores, top_fraction=0.5) == [1, 2, 4]                # ceil(3), tie 0.5 -> the earlier
    assert select(scores, top_fraction=0.1) == [1]
    with pytest.raises(ValueError, match="exactly one"):
        select(scores, threshold=0.5, top_fraction=0.5)


def test_precision_recall_by_hand():
    from distillery.lm.symbolic import precision_recall

    m = precision_recall([True, True, False, False, True], [True, False, True, False, True])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["positives"] == 3
    assert precision_recall([False], [True])["precision"] is None  # nothing predicted: undefined, JSON null


def test_learned_critic_separates_learnable_labels_and_round_trips_as_json():
    from distillery.lm.symbolic import LearnedCritic

    good = [f"    return a + {i}" for i in range(20)]
    bad = ['    """' + "x" * (i % 3) for i in range(20)]
    bodies, labels = good + bad, [True] * 20 + [False] * 20
    logprobs = [-1.0] * 20 + [-3.0] * 20
    critic = LearnedCritic(256).fit(bodies, logprobs, labels)
    probs = critic.probability(["    return a + 99", '    """y'], [-1.0, -3.0])
    assert probs[0] > 0.5 > probs[1]
    again = LearnedCritic.from_json(critic.to_json())
    assert again.probability(bodies, logprobs) == pytest.approx(critic.probability(bodies, logprobs))
    one_class = LearnedCritic(256).fit(bad[:5], [-3.0] * 5, [False] * 5)
    assert one_class.probability(["anything"], [0.0]) == [0.0]  # the base rate, flagged in the summary


# ---------------------------------------------------------------- config
def test_bad_configs_name_the_problem(tmp_path):
    from distillery.lm.symbolic import load_symbolic_config, symbolic_config_from_dict

    with pytest.raises(ConfigError, match=r"critic.thresold: unknown key; allowed keys here: .*threshold"):
        symbolic_config_from_dict({"critic": {"thresold": 0.3}})
    with pytest.raises(ConfigError, match="greedy decoding .* writes one line per prompt"):
        symbolic_config_from_dict({"generation": {"temperature": 0, "samples": 4}})
    with pytest.raises(ConfigError, match="constrained decoding reads the generator's logits"):
        symbolic_config_from_dict({"teacher": {"endpoint": {"url": "http://127.0.0.1:1/v1", "model": "t"}},
                                   "generation": {"constraints": True}})
    with pytest.raises(ConfigError, match="raise generation.num_beams to at least 6"):
        symbolic_config_from_dict({"generation": {"constraints": True, "samples": 6, "num_beams": 4}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_symbolic_config(tmp_path / "missing.yaml")
    root = Path(__file__).resolve().parents[1] / "configs" / "lm" / "data"
    i2d2 = load_symbolic_config(root / "i2d2.yaml", ["self_imitation.rounds=3"])
    assert i2d2.generation.constraints and i2d2.self_imitation.rounds == 3
    assert not load_symbolic_config(root / "symbolic_kd.yaml").generation.constraints


def test_refuses_a_foreign_directory(tmp_path):
    from distillery.errors import RunDirExistsError
    from distillery.lm.symbolic import run_symbolic, symbolic_config_from_dict

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirExistsError, match="not a symbolic-KD run"):
        run_symbolic(symbolic_config_from_dict({"name": "x", "output_dir": str(tmp_path)}), overwrite=True)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- end to end on tiny models
@pytest.fixture(scope="module")
def long_models(lm_tiny, tmp_path_factory):
    """Tiny random GPT-2s with a context long enough for a few-shot prompt."""
    from lm_helpers import make_model

    root = tmp_path_factory.mktemp("sym")
    return {"gen": make_model(root / "gen", lm_tiny["tok"], n_layer=1, n_embd=32, n_positions=512, seed=0),
            "student": make_model(root / "student", lm_tiny["tok"], n_layer=1, n_embd=16, n_positions=512, seed=1)}


def tiny_raw(tmp_path, models, **over) -> dict:
    raw = {"name": "run", "output_dir": str(tmp_path / "runs"), "teacher": {"path": str(models["gen"])},
           "prompts": {"source": "stdlib:operator.py", "max_prompts": 8, "heldout": 2, "shots": 1, "max_chars": 300},
           "generation": {"samples": 1, "max_new_tokens": 6, "temperature": 0.0},
           "critic": {"labelled": 4, "heldout": 4, "top_fraction": 0.5, "scorer": str(models["gen"]),
                      "hash_features": 64},
           "self_imitation": {"steps": 2, "batch_size": 2},
           "student": {"path": str(models["student"]), "steps": 2, "batch_size": 2, "unfiltered_ablation": False},
           "progress": False}
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key != "teacher" else value
    return raw


def test_endpoint_teacher_writes_the_corpus_the_critic_filters(tmp_path, long_models):
    """The teacher behind an OpenAI-compatible stub (127.0.0.1) writes what the local model would;
    the corpus is exactly the critic's top half."""
    from distillery.lm.serve import running_server
    from distillery.lm.symbolic import LearnedCritic, run_symbolic, select, symbolic_config_from_dict
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    local = HFGenerator.from_spec(GeneratorSpec(path=str(long_models["gen"])))
    with running_server(local) as url:
        raw = tiny_raw(tmp_path, long_models, teacher={"endpoint": {"url": url, "model": "teacher"}})
        summary = run_symbolic(symbolic_config_from_dict(raw))
    run = tmp_path / "runs" / "run"
    rows = [json.loads(x) for x in (run / "round0" / "generations.jsonl").read_text().splitlines()]
    split = json.loads((run / "prompts.json").read_text())
    expected = local.complete([split["context"] + p["prompt"] for p in split["train"]], max_new_tokens=6,
                              temperature=0.0, n=1, stop=["\n"])
    assert [r["body"] for r in rows] == [e[0] for e in expected]
    critic = LearnedCritic.from_json((run / "critic.json").read_text())
    probs = critic.probability([r["body"] for r in rows], [r["logprob"] for r in rows])
    corpus = [json.loads(x) for x in (run / "round0" / "corpus.jsonl").read_text().splitlines()]
    assert [c["response"] for c in corpus] == [rows[i]["body"] for i in select(probs, top_fraction=0.5)]
    assert summary["rounds"][0]["kept"] == len(corpus) == 4 and summary["rounds"][0]["generations"] == 8
    assert summary["critic"]["labelled"] == 4 and "no human labels" in summary["critic"]["labels"]
    s = summary["students"]["filtered"]["0"]
    assert s["train_examples"] == 4 and s["eval_ppl"] > 1 and 0 <= s["acceptance"] <= 1
    assert "teacher_heldout_acceptance" not in summary  # an endpoint teacher is measured by its rounds only


def test_i2d2_rounds_self_imitate_and_an_interrupted_run_reuses_its_stages(tmp_path, long_models, monkeypatch):
    from distillery.lm import symbolic
    from distillery.lm.symbolic import run_symbolic, symbolic_config_from_dict

    cfg = symbolic_config_from_dict(tiny_raw(tmp_path, long_models, generation={"constraints": True, "num_beams": 2, "samples": 2},
                                             self_imitation={"rounds": 2}, critic={"kind": "rule"}))
    first = run_symbolic(cfg)
    run = tmp_path / "runs" / "run"
    assert [r["generator"] for r in first["rounds"]] == [str(long_models["gen"]),
                                                         str(run / "generator-r1" / "student")]
    imitation = [json.loads(x) for x in (run / "round0" / "imitation.jsonl").read_text().splitlines()]
    corpus0 = [json.loads(x) for x in (run / "round0" / "corpus.jsonl").read_text().splitlines()]
    context = json.loads((run / "prompts.json").read_text())["context"]
    assert [i["prompt"] for i in imitation] == [context + c["prompt"] for c in corpus0]  # the generator's own lines
    rows = [json.loads(x) for x in (run / "round0" / "generations.jsonl").read_text().splitlines()]
    from distillery.lm.constrained import satisfied

    train = json.loads((run / "prompts.json").read_text())["train"]
    # a random model writes the constraint words only because NeuroLogic makes it
    assert all(any(satisfied(w, r["body"]) for w in train[r["prompt_id"]]["params"] + ["return"]) for r in rows)
    # interrupted after round 0's generator was trained: only round 1 is generated again, no training reruns
    (run / "summary.json").unlink()
    for name in ("round1",):
        for f in (run / name).iterdir():
            f.unlink()
    calls = []
    real_write = symbolic._write
    monkeypatch.setattr(symbolic, "_write", lambda spec, *a, **k: calls.append(spec.path) or real_write(spec, *a, **k))
    monkeypatch.setattr("distillery.lm.trainer.distill_lm", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = run_symbolic(cfg)
    assert calls == [str(run / "generator-r1" / "student")]
    assert again["rounds"] == first["rounds"] and again["critic"] == first["critic"]
