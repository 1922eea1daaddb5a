"""Sparse teacher-logit store for causal-LM distillation: run the teacher once, distil many times.

Per token the store keeps k entries of the teacher's next-token distribution (see
``distillery.losses.lm_sparse``):

* ``scheme="topk"``: the k largest log-probabilities and their ids (``values`` = log-probs);
* ``scheme="sample"``: k ids drawn from the teacher, as unique ids with importance weights
  (``values`` = weights; padding slots id 0, weight 0) -- Random Sampling KD (Anshumann et al.,
  2025).

Row t of an example holds the distribution the teacher's logits at position t give, i.e. the
prediction of token t+1; all T positions are stored and the trainer masks (labels are not read).

Format: ``datasets`` Arrow files, memory-mapped when read, so a store larger than RAM trains in
bounded memory and a batch reads only its rows. Layout::

    shard-00000/            a Dataset.save_to_disk of ``shard_size`` examples; columns
                            ids: list<int32> (T*k), values: list<float16> (T*k), length: int32
    ...
    progress.json           during a build: its parameters and the shards already complete
    manifest.json           written last (atomically): fingerprint, scheme, k, temperature,
                            per-example lengths, bytes, format version

Precision: ids are int32 (every tokenizer vocabulary is far below 2^31). Values are float16:
relative rounding error <= 2^-11 (4.9e-4). For a log-prob l that is an absolute error of at most
|l| * 2^-11 (e.g. 0.005 at l = -10, i.e. a 0.5% error in that token's probability); the sampled
weights n/k are exact for k a power of two and within 2^-11 relative otherwise.

Shards are written to a temporary directory and renamed into place (atomic), then listed in
``progress.json``; an interrupted build resumes from the shards listed there. The sampled scheme
seeds one generator per example (from ``seed`` and the example's index), so a store does not
depend on batch size, shard size or where a build was interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from distillery.errors import DistilleryError
from distillery.losses.lm_sparse import sparsify_sample, sparsify_topk

__all__ = [
    "FORMAT_VERSION", "LMCacheError", "TokenCache", "build_token_cache", "data_fingerprint", "example_seed",
    "teacher_fingerprint", "tokenizer_fingerprint",
]

FORMAT_VERSION = 1
_FP16_MIN = float(np.finfo(np.float16).min)  # a -inf log-prob is stored as this (probability 0 either way)
_REBUILD = "rebuild it: `distillery lm cache build CONFIG --rebuild` or `distillery lm distill CONFIG --rebuild-cache`"
# Names used in error messages for the fingerprint entries the trainer records.
_WHAT = {"teacher": "teacher (weights or tokenizer)", "tokenizer": "tokenizer", "data": "training data (input_ids)",
         "scheme": "scheme", "k": "k", "temperature": "temperature"}


class LMCacheError(DistilleryError):
    """A teacher-logit store is missing, incomplete, corrupt or built for something else."""


# --------------------------------------------------------------------------- fingerprints


def _hash_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy())  # raw bytes, no copy through tobytes()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's vocabulary (``get_vocab()``, sorted; added tokens included)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def teacher_fingerprint(model: torch.nn.Module, tokenizer: Any = None) -> str:
    """SHA-256 of every parameter and buffer (name, shape, dtype, bytes), plus the tokenizer's vocab.

    Buffers are included because some change the outputs (e.g. rotary caches, BN statistics).
    Measured: 0.65 s for 100M float32 parameters on a busy 2-core CPU (hashing the raw bytes).
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        _hash_tensor(h, "param:" + name, p)
    for name, b in model.named_buffers():
        _hash_tensor(h, "buffer:" + name, b)
    if tokenizer is not None:
        h.update(b"tokenizer:" + tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()


def data_fingerprint(input_ids: Iterable[Sequence[int]]) -> str:
    """SHA-256 of the token sequences, in order (each as its length and int64 ids)."""
    h = hashlib.sha256()
    for seq in input_ids:
        arr = seq.detach().cpu().numpy() if isinstance(seq, torch.Tensor) else seq
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        h.update(np.int64(arr.size).tobytes())
        h.update(arr.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- building


def _check_build_args(examples, scheme, k, temperature, fingerprint, batch_size, shard_size, seed) -> None:
    if scheme not in ("topk", "sample"):
        raise ValueError(f"scheme must be 'topk' or 'sample', got {scheme!r}")
    for name, value in (("k", k), ("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(fingerprint, dict) or not all(isinstance(v, str) for v in fingerprint.values()):
        raise ValueError("fingerprint must be a dict of str -> str, e.g. {'teacher': teacher_fingerprint(model, tok), "
                         "'data': data_fingerprint(ids)}")
    # The trainer records scheme / k / temperature in the fingerprint too: they must describe this build.
    actual = {"scheme": scheme, "k": k, "temperature": temperature}
    for key, value in actual.items():
        if key in fingerprint and not _same(key, fingerprint[key], value):
            raise ValueError(f"fingerprint[{key!r}] = {fingerprint[key]!r} but the build uses {key}={value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    if len(examples) == 0:
        raise ValueError("examples is empty: nothing to cache")


def _input_ids(example: dict) -> list[int]:
    ids = example["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not ids:
        raise ValueError("an example has no input_ids (length 0): drop empty examples before caching")
    return ids


def _teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = teacher(input_ids=input_ids, attention_mask=mask)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_shard(teacher, examples, rows: range, *, scheme, k, temperature, seed, batch_size, vocab_size,
               advance=lambda n: None) -> dict:
    """Teacher outputs for ``rows``, sparsified: the columns of one shard (``advance(n)`` per batch)."""
    device = next(teacher.parameters()).device
    cols: dict[str, list] = {"ids": [], "values": [], "length": []}
    for start in range(rows.start, rows.stop, batch_size):
        batch = [examples[i] for i in range(start, min(start + batch_size, rows.stop))]
        seqs = [_input_ids(ex) for ex in batch]
        width = max(len(s) for s in seqs)
        # Right padding with id 0: a causal model's outputs at the real positions do not see it.
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, (seq, ex) in enumerate(zip(seqs, batch)):
            ids[b, : len(seq)] = torch.as_tensor(seq)
            given = ex.get("attention_mask")
            mask[b, : len(seq)] = 1 if given is None else torch.as_tensor(given, dtype=torch.long)[: len(seq)]
        logits = _teacher_logits(teacher, ids.to(device), mask.to(device))
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        for b, seq in enumerate(seqs):
            row_logits = logits[b, : len(seq)]
            if scheme == "topk":
                top_ids, values = sparsify_topk(row_logits, k, temperature)
            else:
                gen = torch.Generator(device=row_logits.device).manual_seed(example_seed(seed, start + b))
                top_ids, values = sparsify_sample(row_logits, k, gen, temperature)
            cols["ids"].append(top_ids.to(torch.int32).cpu().numpy().reshape(-1))
            cols["values"].append(values.clamp(min=_FP16_MIN).cpu().numpy().astype(np.float16).reshape(-1))
            cols["length"].append(len(seq))
        advance(len(batch))
    return cols


def example_seed(seed: int, index: int) -> int:
    """The sampled scheme's generator seed for example ``index``: one generator per example, so
    the draw depends on (seed, index) only. Hashed, because torch's CPU generator keeps only the
    low 32 bits of a seed (``seed * 2**32 + index`` would give every seed the same draws)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@contextlib.contextmanager
def _quiet_datasets():
    """datasets prints a bar per save_to_disk; ours is the only one the build shows."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _write_shard(cols: dict, final: Path) -> None:
    """Save one shard atomically: into a temporary directory, then rename into place."""
    from datasets import Dataset, Features, Sequence as HFSequence, Value

    features = Features({"ids": HFSequence(Value("int32")), "values": HFSequence(Value("float16")),
                         "length": Value("int32")})
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_datasets():
        Dataset.from_dict(cols, features=features).save_to_disk(str(tmp))
    shutil.rmtree(final, ignore_errors=True)  # a leftover not listed as done
    os.replace(tmp, final)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_token_cache(
    teacher: torch.nn.Module,
    examples: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    scheme: Literal["topk", "sample"],
    k: int,
    temperature: float = 1.0,
    fingerprint: dict[str, str],
    batch_size: int = 8,
    seed: int = 0,
    shard_size: int = 1024,
    progress: bool = True,
    vocab_size: int | None = None,
    rebuild: bool = False,
) -> Path:
    """Run ``teacher`` over ``examples`` once and store its sparse next-token distributions.

    ``examples[i]`` has ``input_ids`` (list or 1-D tensor) and optionally ``attention_mask``.
    The teacher runs in eval mode under ``torch.inference_mode()`` (its mode is restored after).
    ``vocab_size`` keeps only the first columns of the teacher's logits (a model whose embedding
    is padded beyond the tokenizer's vocabulary). A complete store with the same parameters is
    kept as it is; one with other parameters, or ``rebuild=True``, is rebuilt from scratch; an
    interrupted build of the same parameters resumes. Returns the store directory.
    """
    _check_build_args(examples, scheme, k, temperature, fingerprint, batch_size, shard_size, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {"version": FORMAT_VERSION, "scheme": scheme, "k": k, "temperature": float(temperature),
              "seed": seed, "shard_size": shard_size, "n_examples": len(examples), "vocab_size": vocab_size,
              "fingerprint": dict(fingerprint)}
    manifest_path, progress_path = out / "manifest.json", out / "progress.json"
    if manifest_path.is_file() and not rebuild:
        with contextlib.suppress(ValueError, OSError):
            if {key: json.loads(manifest_path.read_text()).get(key) for key in params} == params:
                return out
    manifest_path.unlink(missing_ok=True)  # from here on the store does not read as complete
    done: list[str] = []
    if progress_path.is_file() and not rebuild:
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(progress_path.read_text())
            done = state["done"] if state.get("params") == params else []
    if not done:  # nothing to resume: clear shards of an earlier build of something else
        for old in [*out.glob("shard-*"), *out.glob(".shard-*.tmp")]:
            shutil.rmtree(old)
    n_shards = -(-len(examples) // shard_size)
    from rich.progress import Progress

    was_training = teacher.training
    teacher.eval()
    try:
        with Progress(disable=not progress, transient=True) as bar, torch.inference_mode():
            task = bar.add_task(f"teacher cache ({scheme}, k={k})", total=len(examples))
            for shard in range(n_shards):
                name, rows = f"shard-{shard:05d}", range(shard * shard_size, min(len(examples), (shard + 1) * shard_size))
                if name not in done or not (out / name).is_dir():
                    cols = _run_shard(teacher, examples, rows, scheme=scheme, k=k, temperature=temperature,
                                      seed=seed, batch_size=batch_size, vocab_size=vocab_size,
                                      advance=lambda n: bar.advance(task, n))
                    _write_shard(cols, out / name)
                    done = [d for d in done if d != name] + [name]
                    _write_json(progress_path, {"params": params, "done": done})
                else:
                    bar.advance(task, len(rows))  # done by an earlier, interrupted build
    finally:
        teacher.train(was_training)
    lengths, shards = [], []
    from datasets import load_from_disk

    for shard in range(n_shards):
        name = f"shard-{shard:05d}"
        lengths += [int(n) for n in load_from_disk(str(out / name))["length"]]
        shards.append({"name": name, "n_examples": min(shard_size, len(examples) - shard * shard_size),
                       "bytes": _dir_bytes(out / name)})
    manifest = {**params, "n_tokens": sum(lengths), "lengths": lengths, "shards": shards,
                "bytes": sum(s["bytes"] for s in shards), "dtypes": {"ids": "int32", "values": "float16"}}
    _write_json(manifest_path, manifest)  # last: only now does the store read as complete
    progress_path.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- reading


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "temperature":
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 else text


class TokenCache:
    """A built store, opened read-only; rows are read from memory-mapped Arrow files."""

    def __init__(self, path: Path, manifest: dict, shards: list):
        self.path, self.manifest, self._shards = path, manifest, shards
        self.scheme: str = manifest["scheme"]
        self.k: int = int(manifest["k"])
        self.temperature: float = float(manifest["temperature"])
        self.lengths = np.asarray(manifest["lengths"], dtype=np.int64)
        self._shard_size = int(manifest["shard_size"])
        self.bytes_per_token: float = manifest["bytes"] / max(int(manifest["n_tokens"]), 1)
        # Rows are read from the memory-mapped Arrow columns directly: a row's list is a
        # zero-copy numpy view of the mapped file (~100x faster than datasets' row formatting).
        self._columns = [(ds.data.table.column("ids"), ds.data.table.column("values")) for ds in shards]

    @classmethod
    def open(cls, path: str | os.PathLike, expected: dict[str, str] | None = None) -> "TokenCache":
        """Open a complete store; with ``expected``, refuse one built for another teacher/data/k/...

        Raises LMCacheError naming what is missing or what differs, and how to fix it.
        """
        from datasets import load_from_disk

        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            partial = " (an interrupted build: run it again to resume)" if (path / "progress.json").is_file() else ""
            raise LMCacheError(f"no teacher cache at {path}: manifest.json is missing{partial}; {_REBUILD}")
        try:
            manifest = json.loads(manifest_path.read_text())
            keys = ("version", "scheme", "k", "temperature", "lengths", "shards", "shard_size", "bytes", "n_tokens")
            missing = [key for key in keys if key not in manifest]
        except (ValueError, OSError, TypeError) as err:
            raise LMCacheError(f"teacher cache {manifest_path} is unreadable ({err}); {_REBUILD}") from err
        if missing:
            raise LMCacheError(f"teacher cache {manifest_path} is corrupt (missing {', '.join(missing)}); {_REBUILD}")
        if manifest["version"] != FORMAT_VERSION:
            raise LMCacheError(f"teacher cache {path} has format version {manifest['version']}, this Distillery "
                               f"reads version {FORMAT_VERSION}; {_REBUILD}")
        if expected:
            stored = {**manifest.get("fingerprint", {}),
                      **{key: manifest[key] for key in ("scheme", "k", "temperature")}}
            diffs = [f"{_WHAT.get(key, key)} (cache: {_short(stored.get(key, 'not recorded'))}, "
                     f"expected: {_short(value)})" for key, value in expected.items() if not _same(key, stored.get(key), value)]
            if diffs:
                raise LMCacheError(f"teacher cache {path} was built for something else -- {'; '.join(diffs)}; {_REBUILD}")
        shards = []
        for info in manifest["shards"]:
            shard_dir = path / info["name"]
            try:
                ds = load_from_disk(str(shard_dir))
            except (FileNotFoundError, OSError, ValueError) as err:
                raise LMCacheError(f"teacher cache {path}: shard {info['name']} is missing or unreadable "
                                   f"({type(err).__name__}); {_REBUILD}") from err
            if len(ds) != info["n_examples"]:
                raise LMCacheError(f"teacher cache {path}: shard {info['name']} holds {len(ds)} examples, the "
                                   f"manifest lists {info['n_examples']}; {_REBUILD}")
            shards.append(ds)
        return cls(path, manifest, shards)

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Example ``index``: ids (T, k) int32 and values (T, k) float16, read-only views of the file."""
        if not 0 <= index < len(self):
            raise IndexError(f"example index {index} out of range for a cache of {len(self)} examples")
        ids, values = self._columns[index // self._shard_size]
        local = index % self._shard_size
        return (ids[local].values.to_numpy().reshape(-1, self.k),
                values[local].values.to_numpy().reshape(-1, self.k))

    def batch(self, indices: Sequence[int], length: int) -> dict[str, torch.Tensor]:
        """Rows ``indices`` padded to ``length`` positions: ids (B, L, k) int64, values (B, L, k)
        float32, present (B, L) bool (False on padding, where ids are 0 and values 0)."""
        indices = [int(i) for i in indices]
        ids = torch.zeros(len(indices), length, self.k, dtype=torch.int64)
        values = torch.zeros(len(indices), length, self.k, dtype=torch.float32)
        present = torch.zeros(len(indices), length, dtype=torch.bool)
        for b, index in enumerate(indices):
            row_ids, row_values = self.row(index)
            n = row_ids.shape[0]
            if n > length:
                raise ValueError(f"cached example {index} has {n} positions, more than the batch length {length}: "
                                 "the batch must be at least as long as the sequences the cache was built from "
                                 "(same data, same truncation)")
            ids[b, :n] = torch.from_numpy(row_ids.astype(np.int64))
            values[b, :n] = torch.from_numpy(row_values.astype(np.float32))
            present[b, :n] = True
        return {"ids": ids, "values": values, "present": present}
