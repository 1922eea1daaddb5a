"""Hybrid distillation: token relations from one teacher, final features from another.

Shi, Zhang, Wang, Li, Dai, Zou, Xiong & Tian (2023), "Hybrid Distillation: Connecting Masked
Autoencoders with Contrastive Learners" (arXiv 2306.15876; ICLR 2024).  In the paper the student
imitates the *token relations* (attention maps) of the MIM (MAE) teacher at intermediate layers,
for diverse, local attention, and the *final features* of the contrastive/supervised teacher, for
discrimination; a progressive redundant-token masking, driven by the teacher's [CLS] attention,
cuts the cost of distilling and keeps the student out of poor local optima.

Two teachers, exactly (``teacher: [{run: feature_teacher}, {run: relation_teacher}]``):

- ``members.0``, the feature teacher (any family): its ``feature_layer`` (default ``head:input``,
  the final feature) is matched by the student's ``student_feature_layer`` through a learned
  linear projector (smooth L1) -- ``feature`` term;
- ``members.1``, the relation teacher, a ViT: at each block of ``relation_blocks`` its relation
  softmax(Q K^T / sqrt(d)) is computed from a tap on ``members.1.blocks.i.attn.qkv`` (the zoo's
  attention uses SDPA and exposes no weights), averaged over heads, and the student's relation at
  the paired layer is pulled to it by KL per row -- ``relation`` term.

Progressive redundant-token masking: patch tokens are ranked by the relation teacher's [CLS]
attention at its deepest relation block; before each block of ``drop_before`` a ViT student
keeps only the ``keep_ratios[s]`` most attended patch tokens (and its class token), ratios not
increasing -- so deeper blocks run on fewer tokens, and each relation is compared on the tokens
the student still has (the teacher's relation restricted to the same tokens, re-normalised).
The student's token dropping needs a second student pass (``student_forward`` with ``keep`` /
``replace``); cross-entropy on labels stays on the engine's unmasked pass (``ce`` term).

Students without attention (a CNN): its map at each of ``student_relation_layers`` becomes one
token per cell of the teacher's patch grid (pooled), learned query/key projections give its
relation ``softmax(q k^T / sqrt(d))`` over patch tokens (no class token), compared with the
teacher's patch-to-patch relation on the kept tokens of the stage in effect at the paired
teacher block.  A CNN cannot drop tokens, so it runs unmasked (no saving), and its features come
from the engine's main pass.

The engine does not run the teacher on the batch (``teacher_on_batch=False``): one teacher pass
per step, stopped once the last tap has fired -- member 0 to its feature layer, member 1 to its
deepest relation block.

Differences from the paper, and why:
- Our teachers are supervised (CE-trained), neither MAE nor contrastive: member 0 plays the
  contrastive/supervised teacher (the paper allows a supervised one), member 1 the MIM teacher only
  by role.  The paper's relation teacher is the MIM one, its feature teacher the CL one.
- Only the abstract of the paper was available here; the masking schedule (stages, ratios, the
  [CLS]-attention score), KL for relations and smooth L1 for features are our reading of it.
- Relations are averaged over heads (the paper maps student heads to teacher heads), so the
  two models may have different head counts.
- The student is trained for the task at the same time (CE), not pre-trained then fine-tuned.
"""
from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from distillery.errors import ModelError
from distillery.losses import logits as L
from distillery.losses.hybrid_kd import (feature_distance, feature_relation, kept_at, progressive_keep_counts,
                                         redundancy_order, relation_kl, token_relation, attention_from_qkv)
from distillery.losses.masked_kd import grid_tokens
from distillery.methods import register
from distillery.methods.base import Method, Params
from distillery.methods.masked_kd import _is_vit
from distillery.taps import keep_tokens

_PAPER = "Shi et al. 2023, Hybrid Distillation: Connecting Masked Autoencoders with Contrastive Learners"
_TWO = ("hybrid_kd needs exactly two teachers: teacher: [{run: feature_teacher}, {run: relation_teacher}] "
        "(members.0 gives features, members.1 -- a ViT -- gives token relations)")


class HybridParams(Params):
    relation_blocks: list[int] | None = Field(None, description="Blocks of the relation teacher (members.1) whose "
                                                                "attention is distilled, e.g. [2, 3] for a depth-4 vit_tiny.")
    teacher_heads: int = Field(4, ge=1, description="Attention heads of the relation teacher (to split its qkv).")
    student_relation_layers: list[str] | None = Field(
        None, description="Student layers paired with relation_blocks: blocks.j of a ViT student (its attention), "
                          "or spatial stages of a CNN; None: its deepest blocks / default stages.")
    feature_layer: str = Field("head:input", description="Tap inside the feature teacher (members.0).")
    student_feature_layer: str = Field("head:input", description="Student tap matched to the feature teacher's.")
    keep_ratios: list[float] = Field([0.75, 0.5], description="Fraction of patch tokens kept at each masking stage "
                                                              "(not increasing: progressive).")
    drop_before: list[int] | None = Field(None, description="Student blocks (ViT) before which each stage drops tokens; "
                                                            "None: spread evenly over the depth.")
    relation_dim: int = Field(32, ge=1, description="Width of the query/key projections of a CNN student's relation.")
    relation_weight: float = Field(1.0, ge=0, description="Weight of the token-relation KL term.")
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature term.")
    ce_weight: float = Field(1.0, ge=0, description="Weight of label cross-entropy on the unmasked batch.")


@register("hybrid_kd", params=HybridParams, paper=_PAPER, live_teacher=True, teacher_on_batch=False, num_teachers=2)
class HybridKD(Method):
    """Hybrid Distill: token relations of a ViT teacher + final features of a second teacher, progressive token masking."""

    def __init__(self, params: HybridParams, *, student, teacher_layers, num_classes):
        super().__init__(params, student=student, teacher_layers=teacher_layers, num_classes=num_classes)
        if not teacher_layers or not all(n.startswith("members.0.") for n in teacher_layers):
            raise ValueError(_TWO)
        if not params.relation_blocks:
            raise ValueError("give method.params.relation_blocks: the blocks of the relation teacher (members.1) whose "
                             "attention is distilled, e.g. [2, 3] for a depth-4 vit_tiny")
        n = len(params.relation_blocks)
        self.vit = _is_vit(student)
        if params.student_relation_layers is not None:
            s_layers = list(params.student_relation_layers)
        elif self.vit:
            s_layers = [f"blocks.{j}" for j in range(len(student.blocks))][-n:]
        else:
            s_layers = list(getattr(student, "default_feature_layers", []) or [])[-n:]
        if len(s_layers) != n:
            raise ValueError(f"{n} relation_blocks but {len(s_layers)} student relation layers ({s_layers}): "
                             "give method.params.student_relation_layers, one per relation block")
        self.pairs = list(zip(s_layers, params.relation_blocks))
        depth = len(student.blocks) if self.vit else max(params.relation_blocks) + 1
        stages = len(params.keep_ratios)
        self.drop_before = (list(params.drop_before) if params.drop_before is not None
                            else [max(1, round(k * depth / (stages + 1))) for k in range(1, stages + 1)])
        if len(self.drop_before) != stages or any(b <= a for a, b in zip(self.drop_before, self.drop_before[1:])):
            raise ValueError(f"drop_before {self.drop_before} must give one strictly increasing block per keep_ratios "
                             f"entry ({params.keep_ratios})")
        progressive_keep_counts(16, params.keep_ratios)  # validates the ratios before training starts
        self.teacher_taps = [f"members.0.{params.feature_layer}"] + [
            f"members.1.blocks.{i}.attn.qkv" for i in params.relation_blocks]
        self.score_tap = f"members.1.blocks.{max(params.relation_blocks)}.attn.qkv"
        self.s_rel_taps = [f"{s}.attn.qkv" if self.vit else s for s, _ in self.pairs]
        self.student_taps = list(dict.fromkeys(self.s_rel_taps + [params.student_feature_layer]))
        self.kept_fraction = 1.0

    # -- the teacher side -------------------------------------------------------------------

    def _teacher(self, x):
        t = self.teacher_forward(x, until_taps=True)
        qkv = t.features[self.score_tap]
        if qkv.dim() != 3 or qkv.shape[-1] % (3 * self.params.teacher_heads):
            raise ValueError(f"members.1 must be a ViT whose blocks.i.attn.qkv gives (B, N, 3D); got {tuple(qkv.shape)} "
                             f"(teacher_heads={self.params.teacher_heads})")
        cls_attention = attention_from_qkv(qkv, self.params.teacher_heads).mean(1)[:, 0, 1:]
        return t, redundancy_order(cls_attention)

    # -- the student side -------------------------------------------------------------------

    def _masked_student(self, x, order, counts):
        """A ViT student with the stages' least attended patch tokens dropped before their blocks."""
        keep, replace, prev = None, {}, None
        for block, count in zip(self.drop_before, counts):
            if block >= len(self._student.blocks):
                break
            patches = (1 + order[:, :count]) if prev is None else torch.arange(1, 1 + count, device=x.device).expand(len(x), -1)
            index = torch.cat([torch.zeros_like(patches[:, :1]), patches], 1)  # the class token stays first
            if block == 0:
                keep = ("blocks.0", index)
            else:
                replace[f"blocks.{block - 1}"] = lambda out, _i=index: keep_tokens(out, _i)
            prev = count
        return self.student_forward(x, features=True, keep=keep, replace=replace)

    def _relation_tokens(self, block, order, counts, n):
        """Tokens present at ``block``: None (all, raster order) before the first stage, else the
        class token and the ``k`` most attended patches, most attended first (the student's order)."""
        if block < self.drop_before[0]:
            return None
        k = kept_at(block, self.drop_before, counts, n)
        patches = 1 + order[:, :k]
        return torch.cat([torch.zeros_like(patches[:, :1]), patches], 1)

    def _terms(self, student_out, x):
        t, order = self._teacher(x)
        n = order.shape[1]
        grid = self._grid(x, n)
        counts = progressive_keep_counts(n, self.params.keep_ratios)
        s = self._masked_student(x, order, counts) if self.vit else student_out
        rel = []
        for (s_layer, t_block), s_tap in zip(self.pairs, self.s_rel_taps):
            t_qkv = t.features[f"members.1.blocks.{t_block}.attn.qkv"]
            if self.vit:
                s_block = int(s_layer.split(".")[-1])
                s_rel = token_relation(s.features[s_tap], self._student.blocks[s_block].attn.heads)
                t_rel = token_relation(t_qkv, self.params.teacher_heads,
                                       self._relation_tokens(s_block, order, counts, n))
            else:
                k = kept_at(t_block, self.drop_before, counts, n)
                tokens = grid_tokens(s.features[s_tap], grid).gather(
                    1, order[:, :k].unsqueeze(-1).expand(-1, -1, s.features[s_tap].shape[1]))
                q, key = self.queries[s_tap.replace(".", "_")], self.keys[s_tap.replace(".", "_")]
                s_rel = feature_relation(q(tokens), key(tokens))
                t_rel = token_relation(t_qkv, self.params.teacher_heads, 1 + order[:, :k])
            if s_rel.shape != t_rel.shape:
                raise ValueError(f"student relation {tuple(s_rel.shape)} vs teacher {tuple(t_rel.shape)} at "
                                 f"{s_layer} / members.1.blocks.{t_block}: a ViT student must have the relation "
                                 "teacher's number of patches (same patch grid)")
            rel.append(relation_kl(s_rel, t_rel))
        s_feat = self._vector(s.features[self.params.student_feature_layer])
        t_feat = self._vector(t.features[f"members.0.{self.params.feature_layer}"])
        self.kept_fraction = counts[-1] / n if self.vit else 1.0
        return torch.stack(rel).mean(), s_feat, t_feat

    @staticmethod
    def _vector(f):
        return f.mean(dim=(2, 3)) if f.dim() == 4 else f.mean(1) if f.dim() == 3 else f

    @staticmethod
    def _grid(x, n):
        h, w = x.shape[-2:]
        p = round((h * w / n) ** 0.5)
        if (h // p) * (w // p) != n:
            raise ValueError(f"the relation teacher's {n} patches do not tile the {h}x{w} image in square patches")
        return h // p, w // p

    # -- setup / forward --------------------------------------------------------------------

    def setup(self, student_out, teacher_out):
        x = student_out.inputs
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("hybrid_kd distils token relations of image patches: the data must be images (B, C, H, W)")
        # Exactly two teachers: a config is checked when read (num_teachers=2); teacher models handed
        # to fit() directly are checked here -- a third member must not exist.
        try:
            self.teacher_forward(x[:1], until_taps=True, replace={"members.2": lambda out: out})
        except ModelError:
            pass
        else:
            raise ValueError(_TWO)
        self.queries, self.keys = nn.ModuleDict(), nn.ModuleDict()
        if not self.vit:
            for s_tap in self.s_rel_taps:
                c = student_out.features[s_tap]
                if c.dim() != 4:
                    raise ValueError(f"student layer '{s_tap}' gives {tuple(c.shape)}, not a map (B, C, H, W): a relation "
                                     "needs tokens -- choose spatial stages in method.params.student_relation_layers")
                name = s_tap.replace(".", "_")
                self.queries[name] = nn.Linear(c.shape[1], self.params.relation_dim, device=c.device)
                self.keys[name] = nn.Linear(c.shape[1], self.params.relation_dim, device=c.device)
        with torch.no_grad():
            _, s_feat, t_feat = self._terms(student_out, x)
        self.projector = nn.Linear(s_feat.shape[1], t_feat.shape[1], device=s_feat.device)

    def forward(self, student_out, teacher_out, targets, progress):
        relation, s_feat, t_feat = self._terms(student_out, student_out.inputs)
        return {"ce": self.params.ce_weight * L.cross_entropy(student_out.logits, targets=targets),
                "relation": self.params.relation_weight * relation,
                "feature": self.params.feature_weight * feature_distance(self.projector(s_feat), t_feat)}

    def log_values(self) -> dict[str, float]:
        return {"kept_token_fraction": self.kept_fraction}
