"""A teacher that writes text: a local ``transformers`` causal LM or an OpenAI-compatible endpoint.

The data-level methods (symbolic KD, PromptMix, PGKD, competitive distillation, ...) need the
teacher only as a writer of text, so they take a :class:`TextGenerator`::

    gen = load_generator(GeneratorSpec(path="runs/lm/teacher"))                       # local
    gen = load_generator(GeneratorSpec(endpoint=Endpoint(url="http://127.0.0.1:8000/v1", model="t")))
    gen.complete(["def add(a, b):"], max_new_tokens=32, temperature=0.0)              # -> [["\\n    return a + b"]]

``complete`` returns, for each prompt, ``n`` continuations (the prompt itself excluded).
Temperature 0 means greedy decoding.  The endpoint speaks the ``/v1/completions`` protocol of
OpenAI (served also by vLLM, llama.cpp, TGI); ``distillery lm serve`` serves a local model that
way (``distillery.lm.serve``).  Requests go through the standard library, with retries on
429/5xx; a refused connection or a malformed answer stops with one message naming the URL.
The API key is read from the environment variable ``api_key_env`` names, never from a config.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distillery.errors import ConfigError, DataError
from distillery.lm.config import LMModel


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Endpoint(_Strict):
    url: str = Field(description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(description="The `model` field sent with every request.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (sent as a Bearer token).")
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")
    retries: int = Field(3, ge=0, description="Retries on HTTP 429 / 5xx / timeouts, with exponential backoff.")
    batch_size: int = Field(16, gt=0, description="Prompts per request.")


class GeneratorSpec(_Strict):
    """A local causal LM (``path``, as for distillation) or an HTTP endpoint -- exactly one."""

    path: str | None = Field(None, description="A save_pretrained directory or Hub id of a causal LM.")
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    endpoint: Endpoint | None = None
    batch_size: int = Field(16, gt=0, description="Local model: prompts generated together.")

    @model_validator(mode="after")
    def _one(self) -> "GeneratorSpec":
        if (self.path is None) == (self.endpoint is None):
            raise ValueError("give exactly one of `path` (a local/Hub causal LM) or `endpoint` (an OpenAI-compatible URL)")
        return self

    def model_spec(self) -> LMModel:
        if self.path is None:
            raise ConfigError("this step needs the teacher's weights (e.g. to score or fine-tune it): give `path`, "
                              "not an `endpoint`")
        return LMModel(path=self.path, revision=self.revision, dtype=self.dtype, trust_remote_code=self.trust_remote_code)


class TextGenerator(Protocol):
    name: str

    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 n: int = 1, stop: list[str] | None = None, seed: int | None = None) -> list[list[str]]: ...


def _cut(text: str, stop: list[str] | None) -> str:
    if stop:
        hits = [text.find(s) for s in stop if s and s in text]
        if hits:
            return text[:min(hits)]
    return text


class HFGenerator:
    """Continuations from a ``transformers`` causal LM.  Prompts of one token length are
    generated together (no left padding, so positions are those the model was trained on)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, device=None, name: str = "local"):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.device = device if device is not None else next(model.parameters()).device

    @classmethod
    def from_spec(cls, spec: GeneratorSpec, device=None) -> "HFGenerator":
        from distillery.lm import models as lmmodels

        mspec = spec.model_spec()
        tok = lmmodels.load_tokenizer(mspec, pad_token=lmmodels.eos_token_of(mspec))  # pad only fills, never scored
        model = lmmodels.load_model(mspec, "teacher").eval().requires_grad_(False)
        if device is not None:
            model.to(device)
        return cls(model, tok, batch_size=spec.batch_size, device=device, name=spec.path)

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:  # an empty prompt starts from BOS (or EOS, GPT-2's document separator)
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            if start is None:
                raise DataError("an empty prompt needs a BOS or EOS token to start from; this tokenizer has neither")
            ids = [start]
        return ids

    @torch.no_grad()
    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 n: int = 1, stop: list[str] | None = None, seed: int | None = None) -> list[list[str]]:
        if temperature == 0 and n > 1:
            raise DataError("greedy decoding (temperature 0) gives one continuation per prompt: use n=1 or temperature > 0")
        if seed is not None:
            torch.manual_seed(seed)
        encoded = [self.encode(p) for p in prompts]
        limit = _context(self.model)
        if limit is not None:
            too_long = [i for i, e in enumerate(encoded) if len(e) + max_new_tokens > limit]
            if too_long:
                raise DataError(f"prompt {too_long[0]} has {len(encoded[too_long[0]])} tokens; with max_new_tokens "
                                f"{max_new_tokens} it exceeds the generator's context of {limit} tokens: shorten the "
                                "prompts or lower max_new_tokens")
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, num_return_sequences=n,
                      pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                      else self.tokenizer.eos_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        out: list[list[str]] = [[] for _ in prompts]
        groups: dict[int, list[int]] = {}
        for i, e in enumerate(encoded):
            groups.setdefault(len(e), []).append(i)
        for length, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                rows = members[start:start + self.batch_size]
                x = torch.tensor([encoded[i] for i in rows], device=self.device)
                seqs = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
                for j, seq in enumerate(seqs):
                    gen = seq[length:].tolist()
                    if self.tokenizer.eos_token_id in gen:
                        gen = gen[:gen.index(self.tokenizer.eos_token_id)]
                    out[rows[j // n]].append(_cut(self.tokenizer.decode(gen, skip_special_tokens=True), stop))
        return out


def _context(model) -> int | None:
    from distillery.lm.models import context_length

    return context_length(model)


class EndpointGenerator:
    """Continuations from an OpenAI-compatible ``/v1/completions`` endpoint (black-box teacher)."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.name = f"{endpoint.model}@{endpoint.url}"
        self.url = endpoint.url.rstrip("/") + "/completions"
        self.headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env:
            key = os.environ.get(endpoint.api_key_env)
            if not key:
                raise ConfigError(f"endpoint.api_key_env names {endpoint.api_key_env}, which is not set: export it "
                                  "or remove api_key_env for an endpoint without authentication")
            self.headers["Authorization"] = f"Bearer {key}"

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        delay = 1.0
        for attempt in range(self.endpoint.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.endpoint.timeout) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:300]
                if err.code in (429, 500, 502, 503, 504) and attempt < self.endpoint.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise DataError(f"the teacher endpoint {self.url} answered HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt < self.endpoint.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                reason = getattr(err, "reason", err)
                raise DataError(f"cannot reach the teacher endpoint {self.url}: {reason}. Is the server running "
                                "(e.g. `distillery lm serve MODEL`), and is endpoint.url its /v1 base URL?") from None
            except json.JSONDecodeError:
                raise DataError(f"the teacher endpoint {self.url} did not answer JSON: is it an OpenAI-compatible "
                                "/v1 base URL?") from None
        raise AssertionError("unreachable")

    def complete(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 n: int = 1, stop: list[str] | None = None, seed: int | None = None) -> list[list[str]]:
        out: list[list[str]] = []
        size = self.endpoint.batch_size
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            payload = {"model": self.endpoint.model, "prompt": chunk, "max_tokens": max_new_tokens,
                       "temperature": temperature, "top_p": top_p, "n": n}
            if stop:
                payload["stop"] = stop
            if seed is not None:
                payload["seed"] = seed
            answer = self._post(payload)
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != len(chunk) * n:
                raise DataError(f"the teacher endpoint {self.url} returned {len(choices) if isinstance(choices, list) else 'no'} "
                                f"choices for {len(chunk)} prompts x n={n}: it must follow the /v1/completions protocol")
            texts: list[list[str]] = [[] for _ in chunk]
            for k, choice in enumerate(choices):
                index = choice.get("index", k)
                if not isinstance(index, int) or not 0 <= index < len(chunk) * n or not isinstance(choice.get("text"), str):
                    raise DataError(f"the teacher endpoint {self.url} returned a malformed choice: {str(choice)[:200]}")
                texts[index // n].append(_cut(choice["text"], stop))
            out.extend(texts)
        return out


def load_generator(spec: GeneratorSpec, device=None) -> TextGenerator:
    if spec.endpoint is not None:
        return EndpointGenerator(spec.endpoint)
    if not Path(spec.path).exists() and spec.path.startswith((".", "/", "~", "runs")):
        raise ConfigError(f"teacher path {spec.path} does not exist: prepare it first (e.g. `distillery lm prepare`)")
    return HFGenerator.from_spec(spec, device=device)
