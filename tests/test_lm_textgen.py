"""The teacher as a text writer: local transformers LM, the OpenAI-compatible endpoint (against
our own stub server on 127.0.0.1), and log-likelihood scoring."""
from __future__ import annotations

import json
import math
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from distillery.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def gen(lm_tiny):
    from distillery.lm.textgen import GeneratorSpec, load_generator

    return load_generator(GeneratorSpec(path=str(lm_tiny["teacher"])))


def _greedy_by_hand(gen, prompt: str, steps: int) -> str:
    """Greedy decoding written out: argmax of the model's next-token logits, EOS stops."""
    ids = gen.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = gen.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == gen.tokenizer.eos_token_id:
                break
            out.append(nxt)
    return gen.tokenizer.decode(out, skip_special_tokens=True)


def test_local_greedy_is_the_argmax_continuation(gen):
    prompts = ["def f(x):", "import json", "class A:"]  # different token lengths: generated apart
    got = gen.complete(prompts, max_new_tokens=8, temperature=0.0)
    assert [len(g) for g in got] == [1, 1, 1]
    for prompt, (text,) in zip(prompts, got):
        assert text == _greedy_by_hand(gen, prompt, 8)


def test_n_samples_and_stop_strings(gen):
    got = gen.complete(["x = "], max_new_tokens=12, temperature=1.0, n=4, seed=0)
    assert len(got) == 1 and len(got[0]) == 4
    again = gen.complete(["x = "], max_new_tokens=12, temperature=1.0, n=4, seed=0)
    assert got == again  # a seed makes sampling repeatable
    full = gen.complete(["def f(x):"], max_new_tokens=12)[0][0]
    if len(full) > 2:
        stop = full[1:3]
        cut = gen.complete(["def f(x):"], max_new_tokens=12, stop=[stop])[0][0]
        assert cut == full[:full.find(stop)]


def test_prompt_longer_than_the_context_is_refused(gen):
    with pytest.raises(DataError, match="context"):
        gen.complete(["x " * 200], max_new_tokens=8)
    with pytest.raises(DataError, match="greedy decoding"):
        gen.complete(["x"], max_new_tokens=2, temperature=0.0, n=2)


def test_endpoint_teacher_matches_the_local_one(gen):
    from distillery.lm.serve import running_server
    from distillery.lm.textgen import Endpoint, GeneratorSpec, load_generator

    prompts = ["def f(x):", "import json", "class A:", "return"]
    with running_server(gen, model_name="tiny") as url:
        assert url.startswith("http://127.0.0.1:")
        remote = load_generator(GeneratorSpec(endpoint=Endpoint(url=url, model="tiny", batch_size=3)))
        assert remote.complete(prompts, max_new_tokens=6) == gen.complete(prompts, max_new_tokens=6)
        sampled = remote.complete(["x"], max_new_tokens=5, temperature=1.0, n=3, seed=1)
        assert len(sampled[0]) == 3
        with urllib.request.urlopen(url + "/models") as r:
            assert json.loads(r.read())["data"][0]["id"] == "tiny"
        wrong = load_generator(GeneratorSpec(endpoint=Endpoint(url=url, model="other", retries=0)))
        with pytest.raises(DataError, match="HTTP 404.*not served"):
            wrong.complete(["x"], max_new_tokens=2)


def test_unreachable_endpoint_names_the_url():
    import socket

    from distillery.lm.textgen import Endpoint, EndpointGenerator

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    gen = EndpointGenerator(Endpoint(url=f"http://127.0.0.1:{port}/v1", model="m", retries=0, timeout=2))
    with pytest.raises(DataError, match=f"cannot reach the teacher endpoint http://127.0.0.1:{port}/v1/completions"):
        gen.complete(["x"], max_new_tokens=2)


def test_spec_needs_exactly_one_source_and_key_env(monkeypatch):
    from pydantic import ValidationError

    from distillery.lm.textgen import Endpoint, EndpointGenerator, GeneratorSpec

    with pytest.raises(ValidationError, match="exactly one"):
        GeneratorSpec()
    with pytest.raises(ValidationError, match="exactly one"):
        GeneratorSpec(path="a", endpoint=Endpoint(url="http://x/v1", model="m"))
    with pytest.raises(ConfigError, match="needs the teacher's weights"):
        GeneratorSpec(endpoint=Endpoint(url="http://x/v1", model="m")).model_spec()
    monkeypatch.delenv("DISTILLERY_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="DISTILLERY_TEST_KEY"):
        EndpointGenerator(Endpoint(url="http://x/v1", model="m", api_key_env="DISTILLERY_TEST_KEY"))
    monkeypatch.setenv("DISTILLERY_TEST_KEY", "sk-1")
    assert EndpointGenerator(Endpoint(url="http://x/v1", model="m", api_key_env="DISTILLERY_TEST_KEY")
                             ).headers["Authorization"] == "Bearer sk-1"


def test_scores_are_the_summed_token_log_probabilities(gen):
    from distillery.lm.scoring import score_texts

    model, tok = gen.model, gen.tokenizer
    texts = ["import json\n", "def f(x):\n    return x\n"]
    contexts = ["# a module\n", None]
    got = score_texts(model, tok, texts, contexts, batch_size=2)
    for text, ctx, lp, n in zip(texts, contexts, got.logprob, got.tokens):
        c = tok(ctx, add_special_tokens=False)["input_ids"] if ctx else [tok.eos_token_id]
        b = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([c + b])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(b))
        assert int(n) == len(b)
        assert math.isclose(float(lp), expected, rel_tol=1e-4, abs_tol=1e-4)
    # padding in a batch changes nothing
    alone = score_texts(model, tok, texts[:1], contexts[:1], batch_size=1)
    assert torch.allclose(alone.logprob, got.logprob[:1], atol=1e-4)
    assert torch.allclose(got.per_token, got.logprob / got.tokens)
