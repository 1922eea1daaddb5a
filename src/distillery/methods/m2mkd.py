"""m2mKD: module-to-module distillation from a monolithic ViT into a modular (mixture-of-experts) student.

Lo, Liang, Du, Fan, Wang, Huang, Ma, Fu (2024), "m2mKD: Module-to-Module Knowledge Distillation for
Modular Transformers", arXiv 2402.16918.  The teacher's blocks and the student's blocks are each
cut into ``N`` modules of consecutive blocks.  A small *meta model* with one layer per module
serves as the common environment: the teacher hybrid ``T~_i`` is the meta model with its i-th
layer replaced by teacher module i, the student hybrid ``S~_i`` the same with student module i;
student module i learns to make ``S~_i`` answer like ``T~_i`` on the same input
(:func:`~distillery.losses.m2mkd.hybrid_loss`: KD plus the task CE).  The distilled modules then
are the modular student, trained end to end.  One run here does it all, by training progress:

1. ``[0, meta_fraction)`` -- meta model preparation (only the meta model learns, see below);
2. ``[meta_fraction, module_fraction)`` -- module-to-module distillation: the meta model is
   frozen; every pair ``i`` is trained on every step (the paper trains the pairs separately, in
   parallel: their parameters are disjoint, so summing their losses is the same);
3. ``[module_fraction, 1]`` -- end to end: ``(1 - alpha) CE + alpha KD`` on the student's logits
   (the paper's optional final KD) plus ``aux_weight`` times the MoE load-balancing loss.

Teacher and student must be ViTs with the zoo's layout (``blocks.N`` giving (B, tokens, D) with
the class token first, then ``norm`` and ``head``; ``vit_tiny`` teacher, ``vit_moe`` student).

How the pieces map onto this package, where a method never holds the teacher:

* Teacher module i is known only through its output, tapped at ``blocks.<last block of module
  i>`` (its input is the previous module's output, the same tensor as ``blocks.<first>:input``).
  So both hybrids of pair ``i > 0`` take the *teacher's* hidden state entering module i as input
  (the paper feeds the meta model's first i-1 layers' output to both), and the teacher hybrid's
  output is ``meta_tail_i(teacher module i output)`` -- exact, with no teacher call.  The meta
  model's first layer and embedding would never run, so only layers 1..N-1, its norm and head exist.
* Meta model preparation.  The paper pretrains the meta model end to end on the task, then
  freezes it.  Here it is prepared on the teacher's own module I/O: meta layer i learns to map
  the hidden state entering teacher module i to the one leaving it (MSE,
  :func:`~distillery.losses.m2mkd.imitation_loss`), and its norm + head to read the teacher's last
  hidden state into the teacher's logits (``hybrid_loss``).  The meta model is then a cheap
  surrogate of the teacher's later modules -- the environment the hybrids need.
* Stitch layers (the released code's ``stitch_dim``): when the student is narrower than the
  teacher, student module i reads the teacher's hidden state through a linear ``stitch_in`` and
  hands its output to the meta model through ``stitch_out``.  They are the method's, trained in
  phase 2 and dropped afterwards (the assembled student's modules connect directly), as in the code.
* The first student module includes the patch embedding (its hybrid runs the student's own
  forward pass, tapped at the module's last block); the last includes ``norm`` and ``head``
  (its hybrid is the student's own classifier, its teacher hybrid the teacher's logits).
"""
from __future__ import annotations

import re

import torch
from pydantic import Field, model_validator
from torch import nn

from distillery.losses import logits as L
from distillery.losses.m2mkd import hybrid_loss, imitation_loss
from distillery.methods import register
from distillery.methods.base import Method, ModelOutput, Params, Progress
from distillery.models.zoo import TransformerBlock

STAGES = ("meta", "module", "end_to_end")


class M2MKDParams(Params):
    num_modules: int = Field(2, ge=1, description="N: teacher and student blocks are each split into N modules of "
                                                  "consecutive blocks (the paper: 4).")
    teacher_depth: int | None = Field(None, ge=1, description="Number of teacher blocks; default: read from the "
                                                              "teacher's deepest stage name, blocks.<depth-1>.")
    meta_fraction: float = Field(0.1, ge=0, lt=1, description="Share of training spent preparing the meta model "
                                                              "on the teacher's module I/O (phase 1).")
    module_fraction: float = Field(0.3, gt=0, lt=1, description="Share of training, from the start, spent before "
                                                                "end-to-end training: phases 1 and 2 (module-to-module).")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of KD against label CE, in the module pairs and end to end "
                                                      "(the released code's alpha_teacher).")
    temperature: float = Field(4.0, gt=0, description="KD temperature T (KL scaled by T^2).")
    aux_weight: float = Field(0.01, ge=0, description="Weight of the MoE load-balancing loss (Switch Transformer: 0.01).")
    meta_heads: int = Field(4, ge=1, description="Attention heads of each meta-model layer (must divide the teacher width).")
    meta_mlp_ratio: float = Field(2.0, gt=0, description="MLP width of each meta-model layer, as a multiple of the teacher width.")

    @model_validator(mode="after")
    def _phases_in_order(self) -> "M2MKDParams":
        if self.meta_fraction >= self.module_fraction:
            raise ValueError(f"meta_fraction ({self.meta_fraction}) must be below module_fraction ({self.module_fraction}): "
                             "meta preparation comes first, then module-to-module distillation, then end-to-end training")
        return self


def split_blocks(depth: int, parts: int) -> list[range]:
    """Consecutive, near-equal groups of block indices: ``split_blocks(5, 2) == [range(0, 3), range(3, 5)]``."""
    if not 1 <= parts <= depth:
        raise ValueError(f"cannot split {depth} blocks into {parts} modules; set method.params.num_modules between 1 and {depth}")
    sizes = [depth // parts + (1 if i < depth % parts else 0) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def _teacher_depth(params: M2MKDParams, teacher_layers: list[str] | None) -> int:
    if params.teacher_depth is not None:
        return params.teacher_depth
    found = [int(m.group(1)) for name in teacher_layers or [] if (m := re.fullmatch(r"blocks\.(\d+)", name))]
    if not found:
        raise ValueError(f"cannot read the teacher's depth from its stages {teacher_layers}: m2mkd needs a ViT teacher "
                         "with blocks.N stages (e.g. vit_tiny); or set method.params.teacher_depth")
    return max(found) + 1


@register("m2mkd", params=M2MKDParams,
          paper="Lo et al. 2024, m2mKD: Module-to-Module Knowledge Distillation for Modular Transformers")
class M2MKD(Method):
    """m2mKD: teacher/student modules swapped into a shared meta model, then end-to-end training of the MoE student."""

    def __init__(self, params: M2MKDParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        if not all(isinstance(getattr(student, a, None), nn.Module) for a in ("blocks", "norm", "head")):
            raise ValueError(f"m2mkd needs a ViT student with blocks, norm and head (arch: vit_moe or vit_tiny); "
                             f"got {type(student).__name__}")
        n = params.num_modules
        self.student_groups = split_blocks(len(student.blocks), n)
        self.teacher_groups = split_blocks(_teacher_depth(params, teacher_layers), n)
        # The output of every teacher module; module i's input is module i-1's output.
        self.teacher_taps = [f"blocks.{g[-1]}" for g in self.teacher_groups]
        # The student's first module runs inside the engine's forward pass: its output is tapped.
        self.student_taps = [f"blocks.{self.student_groups[0][-1]}"]
        self.meta_blocks = nn.ModuleList()  # meta layers 1..N-1, built in setup (teacher width)
        self.meta_norm: nn.Module | None = None
        self.meta_head: nn.Module | None = None
        self.stitch_in = nn.ModuleList()
        self.stitch_out = nn.ModuleList()
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))

    def setup(self, student_out: ModelOutput, teacher_out: ModelOutput | None) -> None:
        if teacher_out is None:
            raise ValueError("m2mkd needs a teacher (teacher: {run: ...})")
        t_shape = teacher_out.features[self.teacher_taps[0]].shape
        s_shape = student_out.features[self.student_taps[0]].shape
        if len(t_shape) != 3 or len(s_shape) != 3:
            raise ValueError(f"m2mkd distils transformer blocks with (batch, tokens, width) outputs; got teacher "
                             f"{self.teacher_taps[0]} {tuple(t_shape)} and student {self.student_taps[0]} {tuple(s_shape)}")
        d_t, d_s, p = t_shape[-1], s_shape[-1], self.params
        if d_t % p.meta_heads:
            raise ValueError(f"meta_heads={p.meta_heads} does not divide the teacher width {d_t}; "
                             f"set method.params.meta_heads to a divisor of {d_t}")
        n = p.num_modules
        self.meta_blocks = nn.ModuleList(TransformerBlock(d_t, p.meta_heads, p.meta_mlp_ratio) for _ in range(n - 1))
        self.meta_norm = nn.LayerNorm(d_t)
        self.meta_head = nn.Linear(d_t, self.num_classes)

        def stitch(a: int, b: int, used: bool) -> nn.Module:
            return nn.Linear(a, b) if used and a != b else nn.Identity()

        self.stitch_in = nn.ModuleList(stitch(d_t, d_s, i > 0) for i in range(n))
        self.stitch_out = nn.ModuleList(stitch(d_s, d_t, i < n - 1) for i in range(n))
        for m in self.modules():  # the zoo ViT's init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ pieces of the hybrids

    def meta_tail(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """The meta model after its i-th layer: layers i+1..N-1, norm, head on the class token."""
        for block in self.meta_blocks[i:]:  # meta_blocks[k] is meta layer k+1
            hidden = block(hidden)
        return self.meta_head(self.meta_norm(hidden)[:, 0])

    def student_module(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Student module i (i > 0) on a hidden state of the teacher's width."""
        hidden = self.stitch_in[i](hidden)
        for j in self.student_groups[i]:
            hidden = self._student.blocks[j](hidden)
        return hidden

    def stage_at(self, progress: Progress) -> str:
        f = progress.fraction
        return "meta" if f < self.params.meta_fraction else "module" if f < self.params.module_fraction else "end_to_end"

    def _aux(self) -> dict[str, torch.Tensor]:
        aux = getattr(self._student, "aux_loss", None)
        return {"moe_aux": self.params.aux_weight * aux} if isinstance(aux, torch.Tensor) and self.params.aux_weight else {}

    # ------------------------------------------------------------------ the three phases

    def forward(self, student_out, teacher_out, targets, progress):
        stage = self.stage_at(progress)
        self.stage.fill_(STAGES.index(stage))
        # Frozen outside its preparation (as in the paper); set on every step, so a resumed run agrees.
        self.meta_blocks.requires_grad_(stage == "meta")
        self.meta_norm.requires_grad_(stage == "meta")
        self.meta_head.requires_grad_(stage == "meta")
        p = self.params
        outs = [teacher_out.features[t].detach() for t in self.teacher_taps]
        if stage == "meta":
            terms = {"meta_imitation": sum((imitation_loss(block(outs[k]), outs[k + 1])
                                            for k, block in enumerate(self.meta_blocks)), outs[0].new_zeros(()))}
            head_logits = self.meta_head(self.meta_norm(outs[-1])[:, 0])
            terms["meta_head"] = hybrid_loss(head_logits, teacher_out.logits, targets, alpha=p.alpha, temperature=p.temperature)
            return terms
        if stage == "module":
            terms = {}
            last = len(outs) - 1
            for i in range(last + 1):
                hidden = student_out.features[self.student_taps[0]] if i == 0 else self.student_module(i, outs[i - 1])
                if i == last:  # the student's own classifier; the teacher hybrid is the teacher itself
                    s_logits = self._student.head(self._student.norm(hidden)[:, 0])
                    t_logits = teacher_out.logits
                else:
                    s_logits = self.meta_tail(i, self.stitch_out[i](hidden))
                    with torch.no_grad():
                        t_logits = self.meta_tail(i, outs[i])
                terms[f"module{i}"] = hybrid_loss(s_logits, t_logits, targets, alpha=p.alpha, temperature=p.temperature)
            # The MoE layers of module 0 last ran in the engine's forward, the others just now on the
            # teacher's hidden states: each layer's stored loss is the one of its own hybrid.
            return {**terms, **self._aux()}
        terms = {"kd": p.alpha * L.kd(student_out.logits, teacher_out.logits, temperature=p.temperature)}
        if p.alpha < 1:
            terms["ce"] = (1 - p.alpha) * L.cross_entropy(student_out.logits, None, targets)
        return {**terms, **self._aux()}

    def log_values(self) -> dict[str, float]:
        """``stage``: 0 meta preparation, 1 module-to-module, 2 end to end (at the epoch's last step)."""
        return {"stage": float(self.stage)}
