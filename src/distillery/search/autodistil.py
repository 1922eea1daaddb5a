"""AutoDistil: few-shot task-agnostic architecture search for distilling a transformer encoder.

Xu, Mukherjee, Liu, Dey, Wang, Zhang, Awadallah, Gao, "AutoDistil: Few-shot Task-agnostic Neural
Architecture Search for Distilling Large Language Models", 2022 (NeurIPS 2022).  Three steps:

1. The space of smaller BERT encoders (layers, hidden, heads, ffn) is cut into K sub-spaces
   (``cfg.subspaces``; the paper's K=3 are "base", "small" and "tiny" by layers and hidden size),
   so that networks of very different sizes do not share -- and fight over -- one set of weights.
2. One weight-sharing super-network (SuperLM, :mod:`~distillery.search.supernet`) per sub-space,
   initialised from the teacher's weights (leading slices, evenly spaced blocks), is trained with
   a task-agnostic objective on unlabeled text: MiniLM's deep self-attention distillation of the
   teacher's last block into each sampled sub-network's last block -- attention distributions
   (Q-K) and value relation (V-V), KL(teacher || student) (Wang et al. 2020, MiniLM, eqs. 3-5).
   Sub-networks differ in width and head count, so Q, K, V are compared through A_r relation heads
   (MiniLMv2, Wang et al. 2021, eqs. 6-8): ``distillery.losses.minilm.qkv_relation_kl``.  Each step
   draws the largest, the smallest and ``n_random`` random sub-networks (the sandwich rule, Yu &
   Huang 2019, "Universally Slimmable Networks"; BigNAS), sums their losses, and takes one step.
3. Search without retraining: every candidate of every sub-space is scored by the same
   distillation loss on validation text with its inherited weights; within each budget (parameters,
   MACs) the lowest loss wins and is exported as a Hugging Face ``BertModel`` + tokenizer.

Differences from the paper, and why: a BERT-base teacher and Wikipedia/BookCorpus become the
packaged all-MiniLM-L6-v2 and WordNet glosses (offline, CPU); the super-networks are initialised
from the teacher's weight slices (the paper starts them from a pretrained checkpoint); the search
evaluates the whole (small) space exhaustively rather than by a search algorithm, optionally
capped by ``max_candidates``.

Outputs in ``output_dir``: ``supernets/<sub-space>.safetensors`` (written atomically when a
sub-space finishes: a rerun resumes at the next one), ``candidates.csv``, ``search.md`` (best per
sub-space and per budget), ``loss_vs_params.png``, ``students/<budget>/`` and ``summary.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery.errors import ConfigError
from distillery.losses.minilm import qkv_relation_kl
from distillery.search.autodistil_config import AutoDistilConfig, Budget, SubSpace, check_against_teacher
from distillery.search.supernet import (Arch, SuperBert, count_macs, count_params, export_bert, init_from_teacher,
                                        supernet_for)
from distillery.taps import Taps

BERT_QKV = ("encoder.layer.{layer}.attention.self.query", "encoder.layer.{layer}.attention.self.key",
            "encoder.layer.{layer}.attention.self.value")


def qkv_names(n_layers: int) -> list[str]:
    """Tap paths of the last block's Q, K, V -- the same names in the teacher, the super-network
    and an exported student."""
    return [p.format(layer=n_layers - 1) for p in BERT_QKV]


def sandwich(space: SubSpace, n_random: int, rng: random.Random) -> list[Arch]:
    """The sub-networks trained in one step: largest, smallest (once if the sub-space has a single
    member), then ``n_random`` uniform draws."""
    ends = [space.largest] if space.largest == space.smallest else [space.largest, space.smallest]
    return ends + [space.sample(rng) for _ in range(n_random)]


def subnet_loss(net, arch: Arch, batch: dict, teacher_qkv, *, relation_heads: int, weights: dict[str, float]):
    """AutoDistil's objective for one sub-network: self-attention relations of its last block
    against the teacher's last block (``teacher_qkv``: three (B, L, D_t) tensors)."""
    names = qkv_names(arch.layers)
    with Taps(net, names) as taps:
        net(**batch, arch=arch)
        feats = taps.collect()
    return qkv_relation_kl([feats[n] for n in names], teacher_qkv, n_relation_heads=relation_heads,
                           mask=batch["attention_mask"], weights=weights)


# -------------------------------------------------------------------------------------- data
def split_texts(cfg: AutoDistilConfig) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, held-out) glosses.  Shuffled with ``split_seed``, the first ``n_heldout``
    are held out -- the same set ``lm/encoder.py`` evaluates on -- then validation, then training."""
    from distillery.lm.wordnet import load_glosses

    texts = [g for g, _ in load_glosses(cfg.wordnet_dir)]
    need = cfg.n_heldout + cfg.n_val + cfg.n_train
    if len(texts) < need:
        raise ConfigError(f"n_heldout + n_val + n_train = {need} but WordNet has {len(texts)} distinct glosses; lower them")
    random.Random(cfg.split_seed).shuffle(texts)
    a, b = cfg.n_heldout, cfg.n_heldout + cfg.n_val
    return texts[b:need], texts[a:b], texts[:a]


def fixed_batches(tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> list[dict]:
    """Validation batches of similar length (little padding), the same for every candidate."""
    order = sorted(texts, key=len)
    return [dict(tokenizer(order[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def teacher_qkv(teacher, batches: list[dict]) -> list[list[torch.Tensor]]:
    """The teacher's last-block Q, K, V for every batch, computed once."""
    names = qkv_names(teacher.config.num_hidden_layers)
    out = []
    with Taps(teacher, names) as taps:
        for batch in batches:
            teacher(**batch)
            feats = taps.collect()
            out.append([feats[n] for n in names])
    return out


# --------------------------------------------------------------------------------- training
def train_supernet(net: SuperBert, teacher, tokenizer, texts: list[str], space: SubSpace, cfg: AutoDistilConfig,
                   relation_heads: int, bar=None) -> dict:
    """Sandwich-rule training of one super-network; returns the step count, time and mean losses."""
    from transformers import get_linear_schedule_with_warmup

    from distillery.lm.encoder import LengthGroupedBatches

    steps = cfg.steps_per_subspace
    if cfg.freeze_word_embeddings:
        net.embeddings["word_embeddings"].weight.requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), max(steps, 1))
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=cfg.max_length)["input_ids"]]
    sampler = LengthGroupedBatches(lengths, cfg.batch_size, cfg.seed)
    rng = random.Random(f"{cfg.seed}-{space.name}")
    t_names = qkv_names(teacher.config.num_hidden_layers)
    losses, started, epoch, step = [], time.perf_counter(), 0, 0
    net.train()
    with Taps(teacher, t_names) as t_taps:
        while step < steps:
            sampler.set_epoch(epoch)
            for idx in sampler:
                if step >= steps:
                    break
                batch = dict(tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                       max_length=cfg.max_length, return_tensors="pt"))
                with torch.inference_mode():
                    teacher(**batch)
                    feats = t_taps.collect()
                t_qkv = [feats[n].clone() for n in t_names]  # out of inference mode: usable in autograd
                optimizer.zero_grad(set_to_none=True)
                total, archs = 0.0, sandwich(space, cfg.n_random, rng)
                for arch in archs:
                    loss = subnet_loss(net, arch, batch, t_qkv, relation_heads=relation_heads,
                                       weights=cfg.relation_weights)
                    loss.backward()  # one graph alive at a time; gradients add up over the sandwich
                    total += loss.item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(total / len(archs))
                step += 1
                if bar is not None:
                    bar.step(loss=losses[-1], samples=len(idx))
            epoch += 1
    net.eval()
    tenth = max(len(losses) // 10, 1)
    return {"steps": step, "time_s": time.perf_counter() - started,
            "mean_loss_first_10pct": sum(losses[:tenth]) / tenth if losses else None,
            "mean_loss_last_10pct": sum(losses[-tenth:]) / tenth if losses else None}


# ----------------------------------------------------------------------------------- search
@dataclass
class Row:
    subspace: str
    arch: Arch
    params: int
    macs: int
    val_loss: float

    def as_dict(self) -> dict:
        return {"subspace": self.subspace, "arch": self.arch.key, **self.arch.as_dict(), "params": self.params,
                "macs": self.macs, "val_loss": self.val_loss}


@torch.inference_mode()
def heldout_loss(net: SuperBert, arch: Arch, batches: list[dict], t_qkv: list, *, relation_heads: int,
                 weights: dict[str, float]) -> float:
    """The distillation loss of ``arch`` with inherited weights, averaged over texts (eval mode)."""
    net.eval()
    total, n = 0.0, 0
    for batch, tq in zip(batches, t_qkv):
        b = len(batch["input_ids"])
        total += b * subnet_loss(net, arch, batch, tq, relation_heads=relation_heads, weights=weights).item()
        n += b
    return total / n


def candidates_to_score(space: SubSpace, limit: int | None, seed: int) -> list[Arch]:
    """All candidates, or a seeded sample of ``limit`` that keeps the largest and smallest."""
    every = space.candidates()
    if limit is None or len(every) <= limit:
        return every
    rest = [a for a in every if a not in (space.largest, space.smallest)]
    return sorted([space.largest, space.smallest] + random.Random(f"{seed}-{space.name}").sample(rest, limit - 2))


def best_within(rows: list[Row], budget: Budget) -> Row | None:
    """The lowest validation loss among the candidates the budget admits (None if none fits)."""
    fits = [r for r in rows if budget.admits(r.params, r.macs)]
    return min(fits, key=lambda r: (r.val_loss, r.params)) if fits else None


# -------------------------------------------------------------------------------- run
def fingerprint(cfg: AutoDistilConfig, space: SubSpace) -> str:
    """What a saved super-network depends on: a resumed run reuses it only if this matches."""
    keys = ("teacher", "relation_weights", "relation_heads", "steps_per_subspace", "n_random", "batch_size",
            "max_length", "lr", "weight_decay", "warmup_ratio", "freeze_word_embeddings", "seed", "wordnet_dir",
            "n_train", "n_val", "n_heldout", "split_seed")
    raw = {k: getattr(cfg, k) for k in keys} | {"subspace": space.model_dump()}
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_supernet(net: SuperBert, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def _load_supernet(net: SuperBert, path: Path, expected: str) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    if meta.get("fingerprint") != expected:
        raise ConfigError(f"{path} was trained with other settings (teacher, sub-space, steps, data ...); "
                          "use another output_dir, or set overwrite: true to retrain it")
    net.load_state_dict(load_file(str(path)), strict=True)
    return meta


def run_autodistil(cfg: AutoDistilConfig, progress: bool = True) -> dict:
    """Train one super-network per sub-space (or resume), search, export, write the outputs."""
    from transformers import AutoModel, AutoTokenizer

    from distillery.engine.progress import ProgressBar
    from distillery.lm.encoder import _save_student, _write_json, evaluate_encoder, sentence_embeddings

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher = AutoModel.from_pretrained(cfg.teacher).eval().requires_grad_(False)
    relation_heads = check_against_teacher(cfg, teacher.config)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.teacher)
    train_texts, val_texts, heldout = split_texts(cfg)
    val_batches = fixed_batches(tokenizer, val_texts, cfg.max_length)
    val_qkv = teacher_qkv(teacher, val_batches)
    t_state = teacher.state_dict()

    out = Path(cfg.output_dir)
    (out / "supernets").mkdir(parents=True, exist_ok=True)
    paths = {s.name: out / "supernets" / f"{s.name}.safetensors" for s in cfg.subspaces}
    if cfg.overwrite:
        for p in paths.values():
            p.unlink(missing_ok=True)
    done = sum(cfg.steps_per_subspace for p in paths.values() if p.is_file())
    total = cfg.steps_per_subspace * len(cfg.subspaces)

    nets, rows, spaces = {}, [], []
    with ProgressBar(total, enabled=progress, initial=done, title="autodistil") as bar:
        for space in cfg.subspaces:
            net = supernet_for(teacher.config, space.largest)
            fp, path = fingerprint(cfg, space), paths[space.name]
            if path.is_file():
                meta, resumed = _load_supernet(net, path, fp), True
            else:
                torch.manual_seed(cfg.seed)
                init_layers = init_from_teacher(net, t_state, teacher.config.num_hidden_layers)
                stats = train_supernet(net, teacher, tokenizer, train_texts, space, cfg, relation_heads, bar)
                meta, resumed = {"fingerprint": fp, "init_teacher_layers": init_layers, "train": stats}, False
                _save_supernet(net, path, meta)
            bar.set()
            net.eval()
            for arch in candidates_to_score(space, cfg.max_candidates, cfg.seed):
                loss = heldout_loss(net, arch, val_batches, val_qkv, relation_heads=relation_heads,
                                    weights=cfg.relation_weights)
                rows.append(Row(space.name, arch, count_params(teacher.config, arch), count_macs(arch, cfg.max_length), loss))
            nets[space.name] = net
            mine = [r for r in rows if r.subspace == space.name]
            spaces.append({"name": space.name, "largest": space.largest.key, "smallest": space.smallest.key,
                           "n_candidates": len(space.candidates()), "n_scored": len(mine), "supernet": str(path),
                           "resumed": resumed, "init_teacher_layers": meta.get("init_teacher_layers"),
                           "train": meta.get("train"), "best": min(mine, key=lambda r: r.val_loss).as_dict()})

    teacher_emb = None
    if cfg.evaluate_students:
        teacher_emb = sentence_embeddings(teacher, tokenizer, heldout, max_length=cfg.max_length)
    budgets = []
    (out / "students").mkdir(exist_ok=True)
    for budget in cfg.budgets:
        best = best_within(rows, budget)
        entry = {**budget.model_dump(), "best": best.as_dict() if best else None, "student_dir": None, "heldout": None}
        if best is not None:
            student = export_bert(nets[best.subspace], best.arch)
            entry["student_dir"] = str(out / "students" / budget.name)
            _save_student(student, tokenizer, cfg.teacher, out / "students" / budget.name)
            _fix_pooling_width(out / "students" / budget.name, best.arch.hidden)
            if cfg.evaluate_students:
                entry["heldout"] = evaluate_encoder(teacher, student, tokenizer, heldout, k=cfg.eval_k,
                                                    max_length=cfg.max_length, teacher_embeddings=teacher_emb)
        budgets.append(entry)

    summary = {
        "teacher": {"path": cfg.teacher, "layers": teacher.config.num_hidden_layers, "hidden": teacher.config.hidden_size,
                    "heads": teacher.config.num_attention_heads, "ffn": teacher.config.intermediate_size,
                    "params": sum(p.numel() for p in teacher.parameters())},
        "relation_heads": relation_heads,
        "data": {"train": len(train_texts), "val": len(val_texts), "heldout": len(heldout)},
        "subspaces": spaces, "budgets": budgets, "candidates": [r.as_dict() for r in rows],
        "files": {"csv": str(write_candidates_csv(rows, out / "candidates.csv")),
                  "plot": str(write_plot(rows, cfg.budgets, budgets, out / "loss_vs_params.png"))},
        "wall_time_s": time.perf_counter() - started,
        "config": cfg.model_dump(mode="json"),
    }
    summary["files"]["markdown"] = str(write_markdown(summary, out / "search.md"))
    _write_json(summary, out / "summary.json")
    return summary


# ---------------------------------------------------------------------------------- outputs
def _atomic(path: Path, write) -> Path:
    """``write(tmp)`` then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    return path


def _fix_pooling_width(student_dir: Path, width: int) -> None:
    """sentence-transformers' pooling config (copied from the teacher) states the embedding width;
    a narrower student needs its own, or SentenceTransformer(student_dir) would not load."""
    path = student_dir / "1_Pooling" / "config.json"
    if path.is_file():
        data = json.loads(path.read_text()) | {"word_embedding_dimension": width}
        _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def write_candidates_csv(rows: list[Row], path: Path) -> Path:
    import csv

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()))
            w.writeheader()
            w.writerows(r.as_dict() for r in sorted(rows, key=lambda r: (r.subspace, r.val_loss)))

    return _atomic(path, write)


def write_plot(rows: list[Row], budgets: list[Budget], chosen: list[dict], path: Path) -> Path:
    """Validation distillation loss vs parameters of every candidate, one colour per sub-space;
    parameter budgets as vertical lines, each budget's pick starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for name in dict.fromkeys(r.subspace for r in rows):
        mine = [r for r in rows if r.subspace == name]
        ax.scatter([r.params for r in mine], [r.val_loss for r in mine], s=18, alpha=0.75, label=f"sub-space {name}")
    for budget, entry in zip(budgets, chosen):
        if budget.max_params is not None:
            ax.axvline(budget.max_params, color="grey", ls=":", lw=1)
        if entry["best"] is not None:
            b = entry["best"]
            ax.scatter([b["params"]], [b["val_loss"]], marker="*", s=160, c="red", zorder=3)
            ax.annotate(budget.name, (b["params"], b["val_loss"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("parameters (embeddings included)")
    ax.set_ylabel("validation self-attention distillation loss")
    ax.set_title("AutoDistil: inherited-weight loss of every candidate (star: best within a budget)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _row_md(label: str, r: dict | None, extra: str = "") -> str:
    if r is None:
        return f"| {label} | no candidate fits | | | | {extra}"
    return f"| {label} | `{r['arch']}` | {r['params']:,} | {r['macs']:,} | {r['val_loss']:.4f} | {extra}"


def write_markdown(summary: dict, path: Path) -> Path:
    cfg, t = summary["config"], summary["teacher"]
    lines = [
        "# AutoDistil search", "",
        f"- Teacher: `{t['path']}` ({t['layers']} layers, hidden {t['hidden']}, {t['heads']} heads, ffn {t['ffn']}, "
        f"{t['params']:,} parameters).",
        f"- Objective: self-attention relations {cfg['relation_weights']} of the last blocks, "
        f"{summary['relation_heads']} relation heads; {cfg['steps_per_subspace']} steps per sub-space, sandwich of "
        f"largest + smallest + {cfg['n_random']} random, batch {cfg['batch_size']}, lr {cfg['lr']:g}.",
        f"- Data: {summary['data']['train']:,} training, {summary['data']['val']:,} validation (search), "
        f"{summary['data']['heldout']:,} held-out glosses; MACs per sequence of {cfg['max_length']} tokens.",
        f"- Wall time {summary['wall_time_s']:.0f} s.", "",
        "## Best candidate per sub-space (validation loss, inherited weights)", "",
        "| sub-space | architecture | params | MACs | val loss | candidates scored | training (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary["subspaces"]:
        train = s["train"] or {}
        secs = f"{train['time_s']:.0f}" if train.get("time_s") is not None else "—"
        lines.append(_row_md(s["name"], s["best"], f"{s['n_scored']} of {s['n_candidates']} | {secs}"
                             + (" (resumed)" if s["resumed"] else "") + " |"))
    lines += ["", "## Best candidate per budget", "",
              "| budget | architecture | params | MACs | val loss | held-out cosine | top-k agreement | student |",
              "|---|---|---|---|---|---|---|---|"]
    for b in summary["budgets"]:
        limits = ", ".join(f"{k} {b[k]:,}" for k in ("max_params", "max_macs") if b[k] is not None) or "no limit"
        h = b["heldout"] or {}
        agree = next((v for k, v in h.items() if k.endswith("_agreement")), None)
        cells = (f"{h['cosine']:.4f} | {agree:.4f}" if h.get("cosine") is not None and agree is not None else "— | —")
        lines.append(_row_md(f"{b['name']} ({limits})", b["best"], f"{cells} | `{b['student_dir'] or '—'}` |"))
    lines += ["", "Every candidate: `candidates.csv`; loss vs parameters: `loss_vs_params.png`.", ""]
    return _atomic(path, lambda tmp: tmp.write_text("\n".join(lines)))
