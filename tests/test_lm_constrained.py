"""NeuroLogic-style constrained beam search (distillery.lm.constrained) on tiny real GPT-2s."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["def loads(s):\n", "import json\n\nclass Encoder:\n    ", "    return"]


@pytest.fixture(scope="module")
def teacher(lm_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(lm_tiny["teacher"]).eval(),
            AutoTokenizer.from_pretrained(lm_tiny["teacher"]))


@pytest.mark.parametrize("num_beams", [1, 2, 4])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_without_constraints_it_is_transformers_beam_search(teacher, prompt, num_beams):
    from distillery.lm.constrained import constrained_beam_search

    model, tok = teacher
    x = tok(prompt, return_tensors="pt").input_ids
    for new in (5, 12):
        ref = model.generate(x, attention_mask=torch.ones_like(x), num_beams=num_beams, max_new_tokens=new,
                             do_sample=False, pad_token_id=tok.eos_token_id)[0, x.shape[1]:].tolist()
        ours = constrained_beam_search(model, tok, prompt, num_beams=num_beams, max_new_tokens=new)
        assert ours[0].ids == ref


def test_transformers_no_longer_ships_constrained_beam_search(teacher):
    """Why this module exists: transformers 5 moved force_words_ids to Hub code (remote code)."""
    model, tok = teacher
    x = tok("def f(a):", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(x, num_beams=2, max_new_tokens=4, force_words_ids=[tok(" return").input_ids])


def test_log_probability_is_that_of_the_model(teacher):
    """The reported log p(y | prompt) equals a fresh forward pass over prompt + y."""
    from distillery.lm.constrained import constrained_beam_search

    model, tok = teacher
    prompt = PROMPTS[0]
    hyp = constrained_beam_search(model, tok, prompt, ["return"], num_beams=4, max_new_tokens=10)[0]
    p = tok(prompt).input_ids
    ids = torch.tensor([p + hyp.ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    expected = float(lp[len(p) - 1:].gather(-1, ids[0, len(p):, None]).sum())
    assert hyp.logprob == pytest.approx(expected, abs=1e-4)
    assert hyp.score == pytest.approx(hyp.logprob / len(hyp.ids))


def test_constraints_are_met_when_possible_and_change_the_output(teacher):
    from distillery.lm.constrained import constrained_beam_search, satisfied

    model, tok = teacher
    words = ["return", "json"]
    free = constrained_beam_search(model, tok, PROMPTS[0], num_beams=4, max_new_tokens=16)[0]
    assert not all(satisfied(w, free.text) for w in words)  # a random model does not write them by itself
    hyps = constrained_beam_search(model, tok, PROMPTS[0], words, num_beams=4, max_new_tokens=16, num_return=3)
    assert len(hyps) == 3
    best = hyps[0]
    assert best.satisfied == 2 and all(satisfied(w, best.text) for w in words)
    assert best.text == tok.decode(best.ids, skip_special_tokens=True)
    ranks = [h.score + 2.0 * h.satisfied for h in hyps]  # the default bonus
    assert ranks == sorted(ranks, reverse=True)
    assert all(h.satisfied == sum(satisfied(w, h.text) for w in words) for h in hyps)


def test_banned_phrases_never_appear_and_stop_ends_a_line(teacher):
    from distillery.lm.constrained import constrained_beam_search, stop_token_ids

    model, tok = teacher
    free = constrained_beam_search(model, tok, PROMPTS[0], num_beams=4, max_new_tokens=12)[0]
    phrase = free.text[:2]  # what the model likes most cannot be written
    out = constrained_beam_search(model, tok, PROMPTS[0], banned=[phrase], num_beams=4, max_new_tokens=12)[0]
    assert phrase not in out.text and len(out.ids) == 12
    stops = stop_token_ids(tok, ["\n"])
    assert stops and all("\n" in tok.decode([i]) for i in stops)
    lines = constrained_beam_search(model, tok, PROMPTS[0], ["return"], num_beams=4, max_new_tokens=24,
                                    stop=["\n"], stop_ids=stops, num_return=3)
    for h in lines:
        assert "\n" not in h.text
        assert h.ids[-1] in stops | {tok.eos_token_id} or len(h.ids) == 24


def test_whole_word_matching():
    from distillery.lm.constrained import satisfied

    assert satisfied("return", "    return x")
    assert not satisfied("return", "    returns = 1")
    assert not satisfied("a", "    abc = b")
    assert satisfied("a", "    return a+1")
    assert satisfied("path", "os.path")  # a word after a dot is still a word (documented)


def test_bad_arguments_are_named(teacher):
    from distillery.lm.constrained import constrained_beam_search

    model, tok = teacher
    with pytest.raises(ValueError, match="num_return .* cannot exceed num_beams"):
        constrained_beam_search(model, tok, "x", num_beams=2, num_return=3)
    with pytest.raises(ValueError, match=">= 1"):
        constrained_beam_search(model, tok, "x", max_new_tokens=0)
