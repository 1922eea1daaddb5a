"""The causal-LM teacher-logit store: contents, reproducibility, resume, refusal of stale stores.

The teacher is a tiny random GPT-2 (vocab 300, 2 layers); the reference for what the store must
hold is ``sparsify_topk`` / ``sparsify_sample`` applied to that teacher's logits computed one
example at a time (the builder batches with right padding).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import distillery.lm.cache as cache_mod
from distillery.errors import DistilleryError
from distillery.lm.cache import (
    LMCacheError,
    TokenCache,
    build_token_cache,
    data_fingerprint,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from distillery.losses.lm_sparse import sparsify_sample, sparsify_topk

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, K, N = 300, 8, 10
FP16_REL = 2.0**-11  # float16 rounding, relative


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    # A larger init than GPT-2's 0.02 spreads the logits, so top-k has no near-ties whose order
    # could flip between a batched and a single forward pass (they agree to ~1e-7).
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=V, n_positions=32,
                                  initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(1)
    lengths = [32, 7, 20, 32, 3, 15, 28, 1, 32, 11]
    return [{"input_ids": torch.randint(0, V, (n,), generator=g).tolist()} for n in lengths]


@pytest.fixture(scope="module")
def fp(teacher, examples):
    return {"teacher": teacher_fingerprint(teacher), "data": data_fingerprint(e["input_ids"] for e in examples)}


def _build(teacher, examples, path, fp, **kw):
    args = dict(scheme="topk", k=K, fingerprint=fp, batch_size=3, shard_size=4, progress=False)
    return build_token_cache(teacher, examples, path, **{**args, **kw})


@pytest.fixture(scope="module")
def topk_store(teacher, examples, fp, tmp_path_factory):
    return _build(teacher, examples, tmp_path_factory.mktemp("topk"), fp)


def _single_logits(teacher, ids):
    with torch.inference_mode():
        return teacher(input_ids=torch.tensor([ids])).logits[0]


def _rows(store: TokenCache):
    return [store.row(i) for i in range(len(store))]


# ---------------------------------------------------------------- contents


def test_topk_store_equals_sparsify_topk_of_teacher(topk_store, teacher, examples):
    store = TokenCache.open(topk_store)
    assert (store.scheme, store.k, store.temperature, len(store)) == ("topk", K, 1.0, N)
    assert store.lengths.tolist() == [len(e["input_ids"]) for e in examples]
    for i, ex in enumerate(examples):
        ids, logprobs = sparsify_topk(_single_logits(teacher, ex["input_ids"]), K)
        got_ids, got_values = store.row(i)
        assert got_ids.shape == (len(ex["input_ids"]), K)
        np.testing.assert_array_equal(got_ids, ids.numpy())
        # float16 on disk: within half an ulp, |l| * 2^-11, of the float32 log-prob
        err = np.abs(got_values - logprobs.numpy())
        assert (err <= np.abs(logprobs.numpy()) * FP16_REL + 1e-7).all()
        assert err.max() > 0  # it really was rounded (the test would notice float32 storage)


def test_store_is_memory_mapped_arrow(topk_store):
    store = TokenCache.open(topk_store)
    shard = store._shards[0]
    assert isinstance(shard.data, datasets.table.MemoryMappedTable)
    assert str(shard.features["ids"].feature.dtype) == "int32" and str(shard.features["values"].feature.dtype) == "float16"
    files = [f["filename"] for f in shard.cache_files]
    assert files and all(str(topk_store) in f for f in files)
    manifest = json.loads((topk_store / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
    n_tokens = int(store.lengths.sum())
    # 4 bytes (int32 id) + 2 bytes (float16 value) per entry, plus Arrow / JSON metadata
    assert 6 * K <= store.bytes_per_token == manifest["bytes"] / n_tokens < 6 * K + 40


def test_sampled_store_reproducible_and_matches_definition(teacher, examples, fp, tmp_path):
    a = TokenCache.open(_build(teacher, examples, tmp_path / "a", fp, scheme="sample", seed=5))
    b = TokenCache.open(_build(teacher, examples, tmp_path / "b", fp, scheme="sample", seed=5, batch_size=4,
                               shard_size=3))
    c = TokenCache.open(_build(teacher, examples, tmp_path / "c", fp, scheme="sample", seed=6))
    for (ia, va), (ib, vb) in zip(_rows(a), _rows(b)):  # same seed, other batching / sharding
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(va, vb)
    assert any(not np.array_equal(ra[0], rc[0]) for ra, rc in zip(_rows(a), _rows(c)))
    # example i is drawn with its own generator, seeded from (seed, i)
    i = 6
    ids, w = sparsify_sample(_single_logits(teacher, examples[i]["input_ids"]), K,
                             torch.Generator().manual_seed(cache_mod.example_seed(5, i)))
    got_ids, got_w = a.row(i)
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_allclose(got_w, w.numpy(), rtol=FP16_REL)
    assert np.allclose(got_w.sum(-1), 1.0) and np.allclose(got_w * K, np.round(got_w * K))


def test_build_restores_teacher_mode_and_reuses_complete_store(teacher, examples, fp, tmp_path, monkeypatch):
    teacher.train()
    try:
        path = _build(teacher, examples[:3], tmp_path, fp)
        assert teacher.training
    finally:
        teacher.eval()
    calls = []
    monkeypatch.setattr(cache_mod, "_run_shard", lambda *a, **kw: calls.append(1))
    assert _build(teacher, examples[:3], path, fp) == path and calls == []  # complete: kept as is


# ---------------------------------------------------------------- resume


def test_interrupted_build_resumes_to_the_same_store(teacher, examples, fp, tmp_path, monkeypatch, topk_store):
    real_write, real_run = cache_mod._write_shard, cache_mod._run_shard
    written = []

    def write_then_fail(cols, final):
        if written:
            raise KeyboardInterrupt  # the second shard: the process dies mid-build
        real_write(cols, final)
        written.append(final.name)

    monkeypatch.setattr(cache_mod, "_write_shard", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, examples, tmp_path, fp)
    assert written == ["shard-00000"] and not (tmp_path / "manifest.json").exists()
    with pytest.raises(LMCacheError, match="interrupted build"):
        TokenCache.open(tmp_path)
    mtime = (tmp_path / "shard-00000" / "state.json").stat().st_mtime_ns

    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    ran = []
    monkeypatch.setattr(cache_mod, "_run_shard", lambda *a, **kw: ran.append(kw) or real_run(*a, **kw))
    _build(teacher, examples, tmp_path, fp)
    assert len(ran) == 2  # shards 1 and 2 only
    assert (tmp_path / "shard-00000" / "state.json").stat().st_mtime_ns == mtime
    resumed, whole = TokenCache.open(tmp_path), TokenCache.open(topk_store)
    for (ia, va), (ib, vb) in zip(_rows(resumed), _rows(whole)):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(va, vb)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (tmp_path, topk_store))
    assert ma == mb and not (tmp_path / "progress.json").exists()


# ---------------------------------------------------------------- refusing stale or broken stores


def test_data_fingerprint_sees_order_and_boundaries_not_container_type():
    assert data_fingerprint([[1, 2], [3]]) == data_fingerprint([torch.tensor([1, 2]), np.array([3], dtype=np.int32)])
    assert data_fingerprint([[1, 2], [3]]) != data_fingerprint([[1], [2, 3]])
    assert data_fingerprint([[1, 2], [3]]) != data_fingerprint([[3], [1, 2]])


def _word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def test_fingerprint_mismatches_name_what_differs(topk_store, teacher, examples, fp):
    TokenCache.open(topk_store, {**fp, "scheme": "topk", "k": str(K), "temperature": "1.0"})  # matches
    changed = transformers.GPT2LMHeadModel(teacher.config).eval()
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.transformer.h[1].mlp.c_fc.bias[3] += 1e-3
    assert teacher_fingerprint(changed) != fp["teacher"] and teacher_fingerprint(changed) == teacher_fingerprint(changed)
    cases = [
        ({"teacher": teacher_fingerprint(changed)}, "teacher"),
        ({"data": data_fingerprint([e["input_ids"] for e in examples][::-1])}, "training data"),
        ({"k": "16"}, r"k \(cache: 8, expected: 16\)"),
        ({"scheme": "sample"}, r"scheme \(cache: topk, expected: sample\)"),
    ]
    for expected, pattern in cases:
        with pytest.raises(LMCacheError, match=pattern) as err:
            TokenCache.open(topk_store, {**fp, **expected})
        assert "rebuild" in str(err.value) and isinstance(err.value, DistilleryError)
        assert str(err.value).count("(cache:") == 1  # only what differs is named


def test_other_tokenizer_is_refused(teacher, examples, tmp_path):
    tok_a = _word_tokenizer(["<unk>", "a", "b", "c"])
    tok_b = _word_tokenizer(["<unk>", "a", "b", "d"])
    assert tokenizer_fingerprint(tok_a) != tokenizer_fingerprint(tok_b)
    assert teacher_fingerprint(teacher, tok_a) != teacher_fingerprint(teacher, tok_b) != teacher_fingerprint(teacher)
    built = {"teacher": teacher_fingerprint(teacher, tok_a), "tokenizer": tokenizer_fingerprint(tok_a)}
    path = _build(teacher, examples[:2], tmp_path, built)
    with pytest.raises(LMCacheError, match=r"tokenizer \(cache:") as err:
        TokenCache.open(path, {"tokenizer": tokenizer_fingerprint(tok_b)})
    assert "teacher" not in str(err.value).split("--")[1]
    with pytest.raises(LMCacheError, match=r"teacher \(weights or tokenizer\)"):
        TokenCache.open(path, {"teacher": teacher_fingerprint(teacher, tok_b)})


def test_missing_shard_corrupt_or_missing_manifest(topk_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(topk_store, store)
    shutil.rmtree(store / "shard-00001")
    with pytest.raises(LMCacheError, match="shard shard-00001 is missing"):
        TokenCache.open(store)
    (store / "manifest.json").write_text('{"version": 1, "scheme": ')
    with pytest.raises(LMCacheError, match="unreadable.*rebuild"):
        TokenCache.open(store)
    (store / "manifest.json").write_text('{"version": 1}')
    with pytest.raises(LMCacheError, match="corrupt"):
        TokenCache.open(store)
    manifest = json.loads((topk_store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(LMCacheError, match="format version 99"):
        TokenCache.open(store)
    (store / "manifest.json").unlink()
    with pytest.raises(LMCacheError, match="manifest.json is missing"):
        TokenCache.open(store)
    with pytest.raises(LMCacheError, match="no teacher cache"):
        TokenCache.open(tmp_path / "nowhere")


def test_bad_build_arguments(teacher, examples, fp, tmp_path):
    with pytest.raises(ValueError, match="scheme"):
        _build(teacher, examples, tmp_path, fp, scheme="dense")
    with pytest.raises(ValueError, match="k must be"):
        _build(teacher, examples, tmp_path, fp, k=0)
    with pytest.raises(ValueError, match=r"fingerprint\['k'\]"):
        _build(teacher, examples, tmp_path, {**fp, "k": "16"})
    with pytest.raises(ValueError, match="empty"):
        _build(teacher, [], tmp_path, fp)


# ---------------------------------------------------------------- batches


def test_batch_padding_semantics(topk_store):
    store = TokenCache.open(topk_store)
    out = store.batch([1, 0, 7], length=32)
    assert out["ids"].shape == (3, 32, K) and out["ids"].dtype == torch.int64
    assert out["values"].dtype == torch.float32 and out["present"].dtype == torch.bool
    assert out["present"].sum(1).tolist() == [7, 32, 1]
    ids1, values1 = store.row(1)
    assert torch.equal(out["ids"][0, :7], torch.tensor(ids1.astype(np.int64)))
    assert torch.equal(out["values"][0, :7], torch.tensor(values1.astype(np.float32)))
    assert (out["ids"][0, 7:] == 0).all() and (out["values"][0, 7:] == 0).all()
    assert (out["values"][2, 1:] == 0).all() and (out["values"][2, 0] < 0).all()
    with pytest.raises(ValueError, match="more than the batch length 20"):
        store.batch([0], length=20)
    with pytest.raises(IndexError, match="out of range"):
        store.batch([N], length=32)
