"""PromptMix (Sahu et al., 2023) on WordNet definitions: the mixture of two class-conditional
generators, the teacher's relabelling rule, the endpoint path and an end-to-end run on tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(),
                                 reason="WordNet not installed (apt-get install wordnet-base)")]

CATS = ["noun.animal", "noun.plant", "noun.food"]


@pytest.fixture(scope="module")
def tiny_gen(lm_tiny):
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    return HFGenerator.from_spec(GeneratorSpec(path=str(lm_tiny["teacher"])))


def test_mixture_probs_is_the_alpha_weighted_mixture():
    from distillery.lm.promptmix import mixture_probs

    a, b = torch.tensor([[0.0, 0.0, 0.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    e2 = float(torch.tensor(2.0).exp())
    mixed = mixture_probs(a, b, 0.25)
    assert mixed[0, 0].item() == pytest.approx(0.25 * 0.25 + 0.75 * e2 / (e2 + 3))  # softmax(b)[0] = e^2 / (e^2 + 3)
    assert mixed[0, 1].item() == pytest.approx(0.25 * 0.25 + 0.75 / (e2 + 3))
    assert torch.allclose(mixture_probs(a, b, 1.0), torch.softmax(a, -1))
    assert torch.allclose(mixture_probs(a, b, 0.0, temperature=2.0), torch.softmax(b / 2, -1))
    assert torch.allclose(mixed.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="alpha"):
        mixture_probs(a, b, 1.5)


def test_top_p_keeps_the_smallest_nucleus():
    from distillery.lm.promptmix import top_p_filter

    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert torch.allclose(top_p_filter(p, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    assert torch.allclose(top_p_filter(p, 0.5), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(p, 1.0), p)


def test_alpha_one_is_class_a_generator_and_alpha_zero_class_b(tiny_gen):
    """Next-token distributions: with α = 1 the mixture is p(.|prompt A) exactly; greedy
    (a tiny temperature) mixture sampling then writes what the teacher writes greedily for A."""
    from distillery.lm import glossgen as gg
    from distillery.lm.promptmix import mix_sample, mixture_probs

    model, tok = tiny_gen.model, tiny_gen.tokenizer
    pa, pb = gg.prompt_of(CATS[0]), gg.prompt_of(CATS[1])
    la = model(input_ids=torch.tensor([tok(pa)["input_ids"]])).logits[:, -1]
    lb = model(input_ids=torch.tensor([tok(pb)["input_ids"]])).logits[:, -1]
    assert torch.allclose(mixture_probs(la, lb, 1.0), torch.softmax(la, -1), atol=1e-7)
    assert (mixture_probs(la, lb, 0.5) - torch.softmax(la, -1)).abs().max() > 1e-6  # the prompts differ
    # rows of different prompt lengths (left padding inside the sampler must not change them)
    pc = "Category: noun.substance and more words\nDefinition:"
    assert len(tok(pc)["input_ids"]) != len(tok(pa)["input_ids"])
    greedy = {p: tiny_gen.complete([p], max_new_tokens=6, temperature=0.0)[0][0].split("\n")[0] for p in (pa, pb, pc)}
    for alpha, want in ((1.0, [greedy[pa], greedy[pc]]), (0.0, [greedy[pb], greedy[pb]])):
        mixed = mix_sample(model, tok, [pa, pc], [pb, pb], alpha, max_new_tokens=6, temperature=1e-4,
                           generator=torch.Generator().manual_seed(0))
        assert mixed == want
    # α = 0.5: the first token is the argmax of the averaged distributions, not of either alone
    first = mix_sample(model, tok, [pa], [pb], 0.5, max_new_tokens=1, temperature=1e-4,
                       generator=torch.Generator().manual_seed(0))[0]
    want = int((0.5 * torch.softmax(la / 1e-4, -1) + 0.5 * torch.softmax(lb / 1e-4, -1)).argmax())
    assert first == tok.decode([want]).split("\n")[0]


def test_relabelling_is_the_generative_classifier_argmax(tiny_gen):
    from distillery.lm import glossgen as gg

    # hand-built log-likelihoods: row 1 prefers class 1; a prior of +3 nats on class 0 flips it
    loglik = torch.tensor([[-10.0, -12.0, -11.0], [-5.0, -4.0, -9.0]])
    assert gg.generative_labels(loglik).tolist() == [0, 1]
    assert gg.generative_labels(loglik, torch.tensor([3.0, 0.0, 0.0])).tolist() == [0, 0]
    assert torch.allclose(gg.posterior(loglik)[1].float(), torch.softmax(loglik[1], -1))
    # the scorer is log p(" " + text | "Category: c\nDefinition:"), computed by hand here
    model, tok = tiny_gen.model, tiny_gen.tokenizer
    clf = gg.GenerativeClassifier(model, tok, CATS)
    text = "a small dog"
    ll = clf.loglik([text])
    for k, c in enumerate(CATS):
        ctx, body = tok(gg.prompt_of(c))["input_ids"], tok(" " + text)["input_ids"]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + body])).logits[0, :-1], -1)
        want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(body))
        assert ll[0, k].item() == pytest.approx(want, abs=1e-4)
    assert clf.predict([text]).tolist() == [int(ll[0].argmax())]


def test_relabel_counts_and_training_sets():
    from distillery.lm.promptmix import relabel_stats, training_set

    rows = [{"text": "p0 x", "a": 0, "b": 0, "kind": "plain", "teacher_label": 0},
            {"text": "p1 x", "a": 1, "b": 1, "kind": "plain", "teacher_label": 2},
            {"text": "p2 x", "a": 0, "b": 0, "kind": "plain", "teacher_label": 0},
            {"text": "m0 x", "a": 0, "b": 1, "kind": "borderline", "teacher_label": 1},   # to B
            {"text": "m1 x", "a": 1, "b": 0, "kind": "borderline", "teacher_label": 2},   # to a third class
            {"text": "m2 x", "a": 1, "b": 2, "kind": "borderline", "teacher_label": 1}]   # kept
    assert relabel_stats(rows) == {"borderline": 3, "borderline_flipped": 2, "borderline_to_b": 1,
                                   "plain": 3, "plain_flipped": 1}
    real = [("r", 0)]
    assert training_set("real", real, rows, 2, 1, 3) == real
    assert training_set("generated", real, rows, 2, 1, 3) == real + [("p0 x", 0), ("p2 x", 0), ("p1 x", 1)]
    assert training_set("generated_relabelled", real, rows, 2, 1, 3)[-1] == ("p1 x", 2)
    assert training_set("borderline", real, rows, 2, 1, 3) == real + [("p0 x", 0), ("p1 x", 1), ("m0 x", 0),
                                                                     ("m1 x", 1), ("m2 x", 1)]
    assert training_set("promptmix", real, rows, 2, 1, 3) == real + [("p0 x", 0), ("p1 x", 2), ("m0 x", 1),
                                                                    ("m1 x", 2), ("m2 x", 1)]


def test_endpoint_teacher_writes_plain_and_switch_borderline_examples(tiny_gen):
    from distillery.lm import glossgen as gg
    from distillery.lm.promptmix import PromptMixConfig, borderline
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import Endpoint, GeneratorSpec, load_generator
    from distillery.errors import ConfigError

    with running_server(tiny_gen) as url:
        spec = GeneratorSpec(endpoint=Endpoint(url=url, model="teacher"))
        remote = load_generator(spec)
        kw = dict(max_new_tokens=8, temperature=0.0, max_words=30, prefixes=["a small", "a kind of"])
        made = gg.generate(remote, CATS, [0, 2], **kw)
        assert made == gg.generate(tiny_gen, CATS, [0, 2], **kw) and len(made) == 2
        assert made[0][0].startswith("a small") and made[1] == (made[1][0], 2)

        class Spy:  # records what the endpoint is asked
            def __init__(self):
                self.calls = []

            def complete(self, prompts, **kw):
                out = remote.complete(prompts, **kw)
                self.calls.append((prompts, kw["max_new_tokens"], out))
                return out

        spy = Spy()
        cfg = PromptMixConfig(task={"categories": CATS}, teacher=spec, mixing="switch", alpha=0.75,
                              max_new_tokens=8, temperature=1e-3)
        rows = borderline(spy, cfg, [(0, 1), (2, 0)], seed=0)
        (p1, n1, heads), (p2, n2, tails) = spy.calls
        # round(0.75 x 8) = 6 tokens under A's prompt, then 2 more under B's prompt after the same text
        assert p1 == [gg.prompt_of(CATS[0]), gg.prompt_of(CATS[2])] and n1 == 6
        assert p2 == [gg.prompt_of(CATS[1]) + heads[0][0], gg.prompt_of(CATS[0]) + heads[1][0]] and n2 == 2
        want = [(gg.clean(h[0] + t[0]), a, b) for h, t, (a, b) in zip(heads, tails, [(0, 1), (2, 0)])]
        assert [(r["text"], r["a"], r["b"]) for r in rows] == [w for w in want if len(w[0].split()) >= 2]
        assert all(r["kind"] == "borderline" and r["alpha"] == 0.75 for r in rows)
        with pytest.raises(ConfigError, match="mixing: switch"):
            borderline(remote, cfg.model_copy(update={"mixing": "mixture"}), [(0, 1)], seed=0)
        with pytest.raises(ConfigError, match="teacher.path"):
            gg.GenerativeClassifier.from_spec(spec, CATS)


def test_bad_config_gives_one_clear_message(tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm.promptmix import load_promptmix_config

    path = tmp_path / "pm.yaml"
    path.write_text("task: {categories: [noun.animal, noun.plants]}\n")
    with pytest.raises(ConfigError) as err:
        load_promptmix_config(path)
    assert "noun.plants" in str(err.value) and "noun.plant," in str(err.value) and "task.categories" in str(err.value)
    with pytest.raises(ConfigError, match="alpha"):
        load_promptmix_config(path, ["task.categories=[noun.animal,noun.plant]", "alpha=0.2"])


def test_end_to_end_builds_the_teacher_relabels_and_resumes(lm_tiny, tmp_path):
    from distillery.errors import ConfigError
    from distillery.lm import glossgen as gg
    from distillery.lm.promptmix import PromptMixConfig, run_promptmix
    from distillery.lm.textgen import GeneratorSpec, HFGenerator

    teacher = tmp_path / "wn-teacher"
    cfg = PromptMixConfig(name="pm", output_dir=str(tmp_path / "runs"), teacher=GeneratorSpec(path=str(teacher)),
                          task={"categories": CATS, "n_test": 12, "n_val": 4, "n_pool": 16, "max_words": 12},
                          teacher_build={"init": str(lm_tiny["teacher"]), "steps": 3, "batch_size": 4,
                                         "block_size": 48},
                          n_generated=4, seeds=[0, 1], shots=[0, 2], max_new_tokens=8, progress=False)
    s = run_promptmix(cfg)
    assert (teacher / "config.json").is_file()  # the teacher was trained and moved into place
    assert set(s["accuracy"]) == {"0-shot/generated", "0-shot/generated_relabelled", "0-shot/borderline",
                                  "0-shot/promptmix", "2-shot/real", "2-shot/generated",
                                  "2-shot/generated_relabelled", "2-shot/borderline", "2-shot/promptmix"}
    assert s["borderline_per_class"] == 2 and s["test_examples"] == 36
    run_dir = tmp_path / "runs" / "pm"
    rows = [r for seed in (0, 1) for r in gg.read_jsonl(run_dir / f"generated-seed{seed}.jsonl")]
    assert s["relabelling"]["borderline_flipped"] == sum(r["teacher_label"] != r["a"] for r in rows
                                                         if r["kind"] == "borderline")
    gen = HFGenerator.from_spec(GeneratorSpec(path=str(teacher)))
    relabel = gg.GenerativeClassifier(gen.model, gen.tokenizer, CATS).predict([r["text"] for r in rows])
    assert relabel.tolist() == [r["teacher_label"] for r in rows]
    assert all(0 <= v["mean"] <= 1 for v in s["accuracy"].values())
    assert s["accuracy"]["2-shot/real"]["train_examples"] == 6
    # resume: the generated files are reused as they are
    before = (run_dir / "generated-seed0.jsonl").stat().st_mtime_ns
    assert run_promptmix(cfg)["accuracy"] == s["accuracy"]
    assert (run_dir / "generated-seed0.jsonl").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="--overwrite"):
        run_promptmix(cfg.model_copy(update={"alpha": 0.9}))
    foreign = tmp_path / "runs" / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a run"):
        run_promptmix(cfg.model_copy(update={"name": "foreign"}), overwrite=True)
    assert (foreign / "notes.txt").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["accuracy"] == s["accuracy"]
    # the teacher remembers the categories it was trained for
    other = cfg.task.model_copy(update={"categories": ["noun.animal", "noun.person"]})
    with pytest.raises(ConfigError, match="trained for the categories"):
        run_promptmix(cfg.model_copy(update={"name": "other", "task": other}))


def test_ready_config_runs_on_the_demo_paths():
    from distillery.lm.promptmix import load_promptmix_config

    ready = Path(__file__).resolve().parents[1] / "configs/lm/data/promptmix.yaml"
    cfg = load_promptmix_config(ready, ["seeds=[4]"])
    assert cfg.teacher.path == "runs/lm/wordnet-teacher" and cfg.teacher_build.init == "runs/lm/teacher"
    assert len(cfg.task.categories) == 6 and cfg.mixing == "mixture" and cfg.seeds == [4]
