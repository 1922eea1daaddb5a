"""Distil a causal LM into a smaller one: ``distill_lm(cfg)`` (``distillery lm distill CONFIG``).

One loop for every token-level objective, on Accelerate (``accelerate launch`` for several
processes; the teacher is moved to the device but never wrapped or given to the optimiser):

    batch ── (probability λ: replaced by the student's own continuations, GKD) ──┐
    teacher logits ── live (no grad) or sparse from the cache ─────────────────────┤
    student hidden states ── LM head fused into the chunked loss ──────────────────┴─> loss

The objective is ``loss.name`` (forward/reverse KL, JSD(β), skew KL, TV, TAID, ULD, or ce) +
``loss.ce_weight`` x LM cross-entropy + ``hidden.weight`` x hidden-state loss.  Checkpoints are
atomic and a run resumes at the step it stopped (``--resume``); the student is exported with
``save_pretrained`` (safetensors, LoRA merged) next to its tokenizer.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distillery.engine.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint
from distillery.engine.progress import ProgressBar
from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm import data as lmdata
from distillery.lm import models as lmmodels
from distillery.lm.config import LMRunConfig, dump_lm_config
from distillery.lm.generate import generate_batch, prompts_of
from distillery.lm.evaluate import evaluate_lm, plot_curves
from distillery.lm.hooks import HookContext
from distillery.lm.hooks import LMHook as LMHookBase
from distillery.losses.lm import TOKEN_LOSSES, chunked_token_loss, uld
from distillery.losses.lm_sparse import sampled_kl, topk_buckets, topk_kl


@dataclass
class LMResult:
    run_dir: Path
    summary: dict


def _prepare_run_dir(cfg: LMRunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir) / cfg.name
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise RunDirExistsError(f"run directory {run_dir} already exists; pass --overwrite to replace it, "
                                    "--resume to continue it, or choose another name with --set name=NEW")
        if not (run_dir / "config.yaml").is_file():
            raise RunDirExistsError(f"refusing to overwrite {run_dir}: it does not look like a Distillery run")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _loss_params(cfg: LMRunConfig) -> dict:
    """The loss's parameters, checked now (a typo fails here, not at step 1000)."""
    import inspect

    name, params = cfg.loss.name, dict(cfg.loss.params)
    if name == "redi":
        unknown = set(params) - {"alpha", "pos_weight"}
        if unknown:
            raise ConfigError(f"loss.params {sorted(unknown)} are not parameters of 'redi' (it takes alpha, pos_weight)")
        return params
    fn = uld if name == "uld" else TOKEN_LOSSES[name]
    accepted = set(inspect.signature(fn).parameters) - {"student_logits", "teacher_logits", "targets", "teacher_targets"}
    if name not in ("ce", "taid", "tv"):
        params.setdefault("temperature", cfg.loss.temperature)
    unknown = set(params) - accepted - ({"t"} if name == "taid" else set())
    if unknown:
        raise ConfigError(f"loss.params {sorted(unknown)} are not parameters of '{name}' (it takes {sorted(accepted)})")
    return params


class _Objective(nn.Module):
    """Student (+ hidden-state projections): what Accelerate wraps and the optimiser trains.
    ``forward`` returns the named loss terms, so that DDP sees one forward per step."""

    def __init__(self, student: nn.Module, cfg: LMRunConfig, vocab: int, layer_map: nn.Module | None, tokenizer=None):
        super().__init__()
        from distillery.lm.terms import TERMS

        self.student = student
        self.layer_map = layer_map
        self.cfg = cfg
        self.vocab = vocab
        self.params_ = _loss_params(cfg)
        try:
            self.extras = nn.ModuleDict({t.name: TERMS[t.name](tokenizer, **t.params) for t in cfg.extra_terms})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"extra_terms: {err}") from None
        # extra terms read the student's full logits; a latent-only stage (weight 0) may need them for CE
        self.fused = (cfg.loss.fused and cfg.loss.name not in ("ce", "uld", "redi") and cfg.cache is None
                      and cfg.loss.weight > 0 and not cfg.extra_terms)

    def _student(self, batch: dict, hidden: bool):
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.fused or hidden:
            kwargs["output_hidden_states"] = True
        if self.fused:
            kwargs["logits_to_keep"] = 1  # the loss computes the logits chunk by chunk from the last hidden state
        return self.student(**kwargs)

    def forward(self, batch: dict, teacher: dict, extra: dict) -> dict[str, torch.Tensor]:
        cfg, targets, V = self.cfg, batch["targets"], self.vocab
        out = self._student(batch, hidden=self.layer_map is not None)
        terms: dict[str, torch.Tensor] = {}
        params = {**self.params_, **extra}
        if cfg.loss.weight == 0:  # latent-only stage (hidden states), optionally with the LM loss
            if cfg.loss.ce_weight:
                terms["ce"] = cfg.loss.ce_weight * F.cross_entropy(out.logits[..., :V].flatten(0, -2).float(),
                                                                   targets.flatten(), ignore_index=lmdata.IGNORE)
        elif cfg.loss.name == "redi":  # rows: B chosen, then B rejected (lm.data.collate of pairs)
            from distillery.losses.redi import redi_loss, sequence_logprobs

            lp, n = sequence_logprobs(out.logits[..., :V], targets)
            b = int(batch["pairs"])
            terms["redi"] = cfg.loss.weight * redi_loss(lp[:b], n[:b], lp[b:], n[b:], **params)
        elif cfg.loss.name == "ce":
            logits = out.logits[..., :V]
            terms["ce"] = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=lmdata.IGNORE)
        elif "sparse" in teacher:

            s = teacher["sparse"]
            logits = out.logits[..., :V]
            valid = targets.masked_fill(~s["present"], lmdata.IGNORE)
            if cfg.cache.scheme == "sample":
                terms["kd"] = cfg.loss.weight * sampled_kl(logits, s["ids"], s["values"], valid,
                                                           temperature=cfg.loss.temperature)
            elif not cfg.cache.tail:
                terms["kd"] = cfg.loss.weight * topk_kl(logits, s["ids"], s["values"], valid, tail=False,
                                                        temperature=cfg.loss.temperature)
            else:
                # any token loss between the (k+1)-bucket coarsenings of student and teacher
                T = cfg.loss.temperature
                student_b, teacher_b = topk_buckets(logits, s["ids"], s["values"], temperature=T)
                p = {k: v for k, v in params.items() if k != "temperature"}
                scale = T * T if "temperature" in params else 1.0  # the dense losses' T^2
                terms[cfg.loss.name] = cfg.loss.weight * scale * TOKEN_LOSSES[cfg.loss.name](student_b, teacher_b, valid, **p)
            if cfg.loss.ce_weight:
                terms["ce"] = cfg.loss.ce_weight * F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                                                   ignore_index=lmdata.IGNORE)
        elif cfg.loss.name == "uld":
            terms["uld"] = cfg.loss.weight * uld(out.logits, teacher["logits"], targets, teacher["targets"], **params)
            if cfg.loss.ce_weight:
                terms["ce"] = cfg.loss.ce_weight * F.cross_entropy(
                    out.logits.flatten(0, -2).float(), targets.flatten(), ignore_index=lmdata.IGNORE)
        else:
            t_logits = teacher["logits"][..., :V]
            if self.fused:
                head = self.student.get_output_embeddings()
                bias = None if head.bias is None else head.bias[:V]
                student_in, kw = out.hidden_states[-1], dict(lm_head=head.weight[:V], lm_head_bias=bias)
            else:
                student_in, kw = out.logits[..., :V], {}
            # ce_weight rides in the same chunked pass (no full logits exist to compute it apart)
            w = cfg.loss.weight  # w * (loss + ce_weight / w * ce) = w * loss + ce_weight * ce
            terms[cfg.loss.name] = w * chunked_token_loss(cfg.loss.name, student_in, t_logits, targets,
                                                          chunk_size=cfg.loss.chunk_size,
                                                          ce_weight=cfg.loss.ce_weight / w, **kw, **params)
        for spec in cfg.extra_terms:
            values = self.extras[spec.name](out.logits[..., :V], teacher["logits"][..., :V], targets)
            terms.update({k: spec.weight * v for k, v in values.items()})
        if self.layer_map is not None:
            mask = batch["attention_mask"]
            terms["hidden"] = cfg.hidden.weight * self.layer_map(out.hidden_states, teacher["hidden_states"], mask)
        return terms


def _lr_lambda(cfg: LMRunConfig):
    tc = cfg.train

    def factor(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        if tc.scheduler == "constant":
            return 1.0
        frac = (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac))) if tc.scheduler == "cosine" else max(0.0, 1 - frac)

    return factor


@torch.no_grad()
def _teacher_outputs(teacher, batch: dict, cfg: LMRunConfig, teacher_tok=None, student_tok=None) -> dict:
    # no_grad rather than inference_mode: these tensors enter the student's autograd graph
    # (as constants), which inference tensors may not.
    if cfg.loss.name == "uld":
        return _uld_teacher_batch(teacher, batch, teacher_tok, student_tok)
    out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  output_hidden_states=cfg.hidden is not None)
    return {"logits": out.logits, "hidden_states": out.hidden_states if cfg.hidden is not None else None}


def _uld_teacher_batch(teacher, batch: dict, teacher_tok, student_tok) -> dict:
    """Different tokenizers: the teacher reads the same text in its own tokens; its scored
    positions are those of the student's scored text (ULD aligns them in order)."""
    rows, masks = [], []
    for ids, targets, attn in zip(batch["input_ids"], batch["targets"], batch["attention_mask"]):
        n = int(attn.sum())
        first = int((targets[:n] != lmdata.IGNORE).nonzero()[0]) + 1 if (targets[:n] != lmdata.IGNORE).any() else n
        prompt = teacher_tok(student_tok.decode(ids[:first]), add_special_tokens=False)["input_ids"]
        answer = teacher_tok(student_tok.decode(ids[first:n]), add_special_tokens=False)["input_ids"]
        seq = (prompt + answer) or [teacher_tok.eos_token_id]
        tgt = [lmdata.IGNORE] * max(0, len(prompt) - 1) + answer + [lmdata.IGNORE]
        rows.append(seq)
        masks.append(tgt[: len(seq)])
    batch_t = lmdata.collate([{"input_ids": r, "targets": m, "prompt_len": 0} for r, m in zip(rows, masks)],
                             teacher_tok.pad_token_id)
    device = batch["input_ids"].device
    out = teacher(input_ids=batch_t["input_ids"].to(device), attention_mask=batch_t["attention_mask"].to(device))
    return {"logits": out.logits, "targets": batch_t["targets"].to(device)}


def _cache_for(cfg: LMRunConfig, teacher, teacher_tok, train, run_dir: Path, rebuild: bool, progress: bool):
    from distillery.lm.cache import TokenCache, build_token_cache, data_fingerprint, teacher_fingerprint

    cc = cfg.cache
    root = Path(cc.dir) if cc.dir else Path(cfg.output_dir) / "lm-cache" / f"{cfg.name}-{cc.scheme}{cc.k}"
    expected = {"teacher": teacher_fingerprint(teacher, teacher_tok),
                "data": data_fingerprint(row["input_ids"].tolist() for row in train),
                "scheme": cc.scheme, "k": str(cc.k), "temperature": str(cfg.loss.temperature)}
    if rebuild and root.exists():
        shutil.rmtree(root)
    if not (root / "manifest.json").is_file():
        build_token_cache(teacher, train, root, scheme=cc.scheme, k=cc.k, temperature=cfg.loss.temperature,
                          fingerprint=expected, seed=cfg.train.seed, progress=progress, vocab_size=len(teacher_tok))
    return TokenCache.open(root, expected)


def distill_lm(cfg: LMRunConfig, *, resume: bool = False, overwrite: bool = False,
               rebuild_cache: bool = False, hooks: list | tuple = (), splits=None) -> LMResult:
    """``hooks``: :class:`~distillery.lm.hooks.LMHook` objects (data mixture, monitors);
    ``splits``: an ``LMSplits`` to train on instead of reading ``cfg.data`` (e.g. DDK's
    per-domain corpus); ``cfg.data`` still names the tokenisation settings."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc = cfg.train
    # cpu=True without a GPU: under torchrun that is what selects multi-CPU (gloo) data parallel
    accelerator = Accelerator(cpu=tc.cpu or not torch.cuda.is_available(), mixed_precision=tc.mixed_precision)
    run_dir = Path(cfg.output_dir) / cfg.name
    if accelerator.is_main_process:  # one process decides about (and clears) the run directory
        _prepare_run_dir(cfg, resume, overwrite)
    accelerator.wait_for_everyone()
    set_seed(tc.seed)
    device = accelerator.device

    # ---- models, tokenizers, data: every check before the first step
    student_tok = lmmodels.load_tokenizer(cfg.student, cfg.data.pad_token)
    teacher_tok = lmmodels.load_tokenizer(cfg.teacher, cfg.data.pad_token) if cfg.teacher else None
    student = lmmodels.load_model(cfg.student, "student")
    teacher = lmmodels.load_model(cfg.teacher, "teacher") if cfg.teacher else None
    vocab, same_vocab = len(student_tok), False
    if teacher is not None:
        pair = lmmodels.check_pair(teacher, teacher_tok, student, student_tok, cfg.loss.name)
        vocab, same_vocab = pair.size, pair.same
        teacher.eval().requires_grad_(False).to(device)
    # agreement and KL with the teacher need one vocabulary (not so under ULD)
    eval_teacher = teacher if same_vocab else None
    extra_tokens = max(cfg.onpolicy.max_new_tokens if cfg.onpolicy.lmbda else 0,
                       cfg.seqkd.max_new_tokens if cfg.seqkd.enabled else 0)
    lmmodels.check_context({"student": student, **({"teacher": teacher} if teacher is not None else {})},
                           cfg.data.block_size, extra_tokens)
    splits = splits if splits is not None else lmdata.load_splits(cfg.data, student_tok)
    train = splits.train
    if cfg.seqkd.enabled:
        from distillery.lm.seqkd import teacher_corpus

        train = teacher_corpus(teacher, train, student_tok, cfg, run_dir, device=device)
    atomic_write_text(run_dir / "config.yaml", dump_lm_config(cfg))
    store = _cache_for(cfg, teacher, teacher_tok, train, run_dir, rebuild_cache, tc.progress) if cfg.cache else None

    layer_map = None
    if cfg.hidden is not None:
        from distillery.lm.hidden import LayerMap

        try:
            layer_map = LayerMap(teacher.config.num_hidden_layers, student.config.num_hidden_layers,
                                 teacher.config.hidden_size, student.config.hidden_size,
                                 mapping=cfg.hidden.mapping, loss=cfg.hidden.loss)
        except ValueError as err:
            raise ConfigError(f"hidden.mapping: {err}") from None
    objective = _Objective(student, cfg, vocab, layer_map, student_tok)
    own = {id(p) for t in cfg.extra_terms if t.lr is not None for p in objective.extras[t.name].parameters()}
    groups = [{"params": [p for p in objective.parameters() if p.requires_grad and id(p) not in own]}]
    groups += [{"params": list(objective.extras[t.name].parameters()), "lr": t.lr}
               for t in cfg.extra_terms if t.lr is not None]
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    taid = None
    if cfg.loss.name == "taid":
        from distillery.losses.taid import TAIDSchedule

        taid = TAIDSchedule(**cfg.loss.taid)

    pad = student_tok.pad_token_id
    indexed = lmdata.Indexed(train)
    steps_per_epoch = max(1, len(indexed) // (tc.batch_size * tc.grad_accum * accelerator.num_processes))
    step, state = 0, {}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, objective, optimizer)
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        if taid is not None:
            taid.load_state_dict(state["taid"])
    hooks = list(hooks)
    if cfg.monitor is not None:
        from distillery.lm.oracle import OracleMonitor

        hooks.append(OracleMonitor(cfg.monitor, cfg.data.pad_token))
    for hook in hooks:
        hook.load_state_dict(state.get("hooks", {}).get(hook.name, {}))
    objective, optimizer = accelerator.prepare(objective, optimizer)
    eval_loader = (torch.utils.data.DataLoader(splits.eval, batch_size=tc.batch_size,
                                               collate_fn=lambda rows: lmdata.collate(rows, pad))
                   if splits.eval is not None else None)
    metrics_path = run_dir / "metrics.jsonl"
    history: list[dict] = [json.loads(line) for line in metrics_path.read_text().splitlines()] if resume and metrics_path.is_file() else []
    raw_student = lambda: accelerator.unwrap_model(objective).student  # noqa: E731
    t0, c0, running = time.perf_counter(), time.process_time(), []
    ctx = HookContext(raw_student(), teacher, student_tok, train, eval_loader, vocab, device, run_dir, tc.max_steps)
    for hook in hooks:
        hook.setup(ctx)
    samplers = [h for h in hooks if type(h).batch_indices is not LMHookBase.batch_indices]
    if len(samplers) > 1:
        raise ConfigError(f"hooks {[h.name for h in samplers]} each choose the training rows; only one may")
    sampler = samplers[0] if samplers else None
    rank, world = accelerator.process_index, accelerator.num_processes

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, accelerator.unwrap_model(objective), optimizer,
                            {"step": step, "scheduler": scheduler.state_dict(),
                             "taid": taid.state_dict() if taid is not None else None,
                             "hooks": {h.name: h.state_dict() for h in hooks}})
        accelerator.wait_for_everyone()

    objective.train()
    with ProgressBar(tc.max_steps, enabled=tc.progress and accelerator.is_main_process, initial=step,
                     title=cfg.name) as bar:
        def micro_batches():
            """(micro, batch) pairs: the hook's choice of rows, or shuffled epochs (resumable)."""
            while True:
                if sampler is not None:
                    for micro in range(tc.grad_accum):
                        rows = sampler.batch_indices(step, micro, tc.batch_size * world)[rank::world]
                        yield micro, lmdata.collate([indexed[i] for i in rows], pad)
                    continue
                epoch, skip = divmod(step, steps_per_epoch)
                order = torch.randperm(len(indexed), generator=torch.Generator().manual_seed(tc.seed * 1000 + epoch))
                loader = torch.utils.data.DataLoader(torch.utils.data.Subset(indexed, order.tolist()),
                                                     batch_size=tc.batch_size, drop_last=True,
                                                     collate_fn=lambda rows: lmdata.collate(rows, pad))
                yielded = False
                for pair in enumerate(accelerator.skip_first_batches(accelerator.prepare_data_loader(loader),
                                                                     skip * tc.grad_accum)):
                    yielded = True
                    yield pair
                if not yielded and skip == 0:
                    raise DataError(f"{len(indexed)} training sequences do not fill one batch of "
                                    f"{tc.batch_size * world}: lower train.batch_size or add data")

        if step < tc.max_steps:
            for micro, batch in micro_batches():
                # Randomness (dropout, the GKD coin, sampling) is a function of (seed, step): a
                # resumed run repeats exactly what the uninterrupted one would have done.
                torch.manual_seed(tc.seed * 1_000_003 + step * 101 + micro % tc.grad_accum)
                batch = {k: v.to(device) for k, v in batch.items()}
                if cfg.onpolicy.lmbda and float(torch.rand(())) < cfg.onpolicy.lmbda:
                    op = cfg.onpolicy
                    batch = generate_batch(raw_student(), prompts_of(batch, op.prompt_length),
                                           max_new_tokens=op.max_new_tokens, pad_id=pad,
                                           eos_id=student_tok.eos_token_id, do_sample=True,
                                           temperature=op.temperature, top_k=op.top_k, device=device)
                    batch = {k: v.to(device) for k, v in batch.items()}
                for hook in hooks:  # e.g. MGSR's revision of the student's own generations
                    changed = hook.transform_batch(step, batch, ctx)
                    if changed is not batch:
                        batch = {k: v.to(device) for k, v in changed.items()}
                if store is not None:
                    teacher_out = {"sparse": {k: v.to(device) for k, v in
                                              store.batch(batch["index"].tolist(), batch["input_ids"].shape[1]).items()}}
                elif teacher is not None:
                    teacher_out = _teacher_outputs(teacher, batch, cfg, teacher_tok, student_tok)
                else:
                    teacher_out = {}
                extra = {"t": taid.t} if taid is not None else {}
                terms = objective(batch, teacher_out, extra)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise ConfigError(f"the loss became {float(loss)} at step {step}: lower train.lr or enable "
                                      "train.grad_clip")
                accelerator.backward(loss / tc.grad_accum)
                running.append(float(loss.detach()))
                if (micro + 1) % tc.grad_accum:
                    continue
                if tc.grad_clip:
                    accelerator.clip_grad_norm_(objective.parameters(), tc.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if taid is not None:
                    taid.update(float(terms["taid"].detach()), step / tc.max_steps)
                bar.step(loss=sum(running[-tc.grad_accum:]) / tc.grad_accum, samples=tc.batch_size * tc.grad_accum)
                row = {"step": step, "loss": sum(running) / len(running), **{k: float(v.detach()) for k, v in terms.items()}}
                if taid is not None:
                    row["taid_t"] = taid.t
                if tc.eval_every and step % tc.eval_every == 0 and eval_loader is not None and step < tc.max_steps:
                    row.update(evaluate_lm(raw_student(), eval_teacher, eval_loader, device, vocab))
                hooked = {k: v for h in hooks for k, v in h.after_step(step, ctx).items()}
                row.update(hooked)
                if accelerator.is_main_process and (step % 10 == 0 or "eval_ppl" in row or hooked or step == tc.max_steps):
                    history.append(row)
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                running = []
                if step % 50 == 0 or "eval_ppl" in row:
                    bar.set(loss=row["loss"])  # a plain log line when not on a terminal
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    checkpoint()
                if step >= tc.max_steps:
                    break
    checkpoint()
    final = evaluate_lm(raw_student(), eval_teacher, eval_loader, device, vocab) if eval_loader is not None else {}
    summary = {"name": cfg.name, "loss": cfg.loss.name, "steps": step, "train_sequences": len(indexed),
               "student_params": lmmodels.count_parameters(raw_student()),
               "teacher_params": lmmodels.count_parameters(teacher) if teacher is not None else None,
               "cache": None if store is None else {"scheme": cfg.cache.scheme, "k": cfg.cache.k,
                                                    "bytes_per_token": store.bytes_per_token},
               "onpolicy_lambda": cfg.onpolicy.lmbda, "seqkd": cfg.seqkd.enabled,
               "wall_seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, **final,
               **{h.name: h.summary() for h in hooks if h.summary()}}
    if accelerator.is_main_process:
        if final:
            history.append({"step": step, "loss": history[-1]["loss"] if history else float("nan"), **final})
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(history[-1]) + "\n")
        _export(raw_student(), student_tok, run_dir)
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
        plot_curves(history, run_dir)
    accelerator.wait_for_everyone()
    return LMResult(run_dir, summary)


def _export(student, tokenizer, run_dir: Path) -> None:
    """``run_dir/student``: loadable with ``AutoModelForCausalLM.from_pretrained``; written to a
    temporary directory and renamed, so a crash never leaves half a model."""
    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    tmp, final = run_dir / "student.tmp", run_dir / "student"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def build_cache(cfg: LMRunConfig, *, rebuild: bool = False):
    """``distillery lm cache build``: run the teacher once over the config's training data and
    store its sparse outputs where ``distill_lm`` will look for them."""
    if cfg.cache is None:
        raise ConfigError("the config has no `cache:` section: add e.g. cache: {scheme: topk, k: 32}")
    teacher_tok = lmmodels.load_tokenizer(cfg.teacher, cfg.data.pad_token)
    student_tok = lmmodels.load_tokenizer(cfg.student, cfg.data.pad_token)
    teacher = lmmodels.load_model(cfg.teacher, "teacher").eval().requires_grad_(False)
    diff = lmmodels.vocab_difference(teacher_tok, student_tok)
    if diff:
        raise ConfigError(f"a token cache needs one vocabulary for teacher and student ({diff})")
    lmmodels.check_context({"teacher": teacher}, cfg.data.block_size)
    train = lmdata.load_splits(cfg.data, student_tok).train
    return _cache_for(cfg, teacher, teacher_tok, train, Path(cfg.output_dir), rebuild, cfg.train.progress)
