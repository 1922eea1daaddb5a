"""Hidden-state distillation between any two Hugging Face transformers: teacher layer -> student layer.

TinyBERT -- Jiao, Yin, Shang, Jiang, Chen, Li, Wang, Liu, "TinyBERT: Distilling BERT for Natural
Language Understanding", Findings of EMNLP 2020.  Student layer m learns from teacher layer
n = g(m); the uniform strategy is g(m) = m * N / M (section 3.1) for an M-layer student and an
N-layer teacher, and the hidden-state loss is eq. (7), L_hidn = MSE(H^S W_h, H^T), with W_h a
learned linear map from the student's width to the teacher's.

Works on the ``hidden_states`` tuple that every Hugging Face model returns with
``output_hidden_states=True`` -- encoders and causal decoders alike -- where index 0 is the
embedding output and index i the output of block i.  Layer numbers here are those indices.

Differences from the paper, and why:

* One ``nn.Linear`` per mapped pair instead of TinyBERT's single shared W_h: pairs at different
  depths live in different bases, and the extra parameters are negligible next to the student.
  With equal widths there is no projection at all (W_h = identity), as in TinyBERT's
  same-width setting.
* Pairs are averaged, not summed, so the loss weight does not grow with the student's depth.
* When N / M is not an integer, g(m) = floor(m * N / M): the last student layer still maps to
  the last teacher layer.
* ``loss="cosine"`` (1 - cosine per token) is offered next to the paper's MSE; it ignores the
  scale of the hidden states, which differs a lot between layers of pre-LN decoders.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _token_weights(mask: Tensor | None, hidden: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must have shape (batch, seq_len) = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=hidden.device, dtype=hidden.dtype)


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """TinyBERT eq. (7) for one pair: mean over real tokens and features of (H^S W_h - H^T)^2.

    ``student`` is already projected to the teacher's width; both are (B, L, D).
    """
    w = _token_weights(mask, teacher)
    sq = (student - teacher).pow(2).sum(dim=-1)
    return (sq * w).sum() / (w.sum().clamp_min(1) * teacher.shape[-1])


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over real tokens of 1 - cos(H^S W_h, H^T) along the feature axis."""
    w = _token_weights(mask, teacher)
    dist = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return (dist * w).sum() / w.sum().clamp_min(1)


def uniform_mapping(n_teacher_layers: int, n_student_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform strategy: [(m, g(m))] for m = 1..M, g(m) = floor(m * N / M)."""
    return [(m, m * n_teacher_layers // n_student_layers) for m in range(1, n_student_layers + 1)]


class LayerMap(nn.Module):
    """Hidden-state loss over mapped (student layer, teacher layer) pairs, with learned projections.

        layer_map = LayerMap(12, 4, teacher_width=768, student_width=384)   # pairs (1,3) (2,6) (3,9) (4,12)
        loss = layer_map(student_out.hidden_states, teacher_out.hidden_states, mask=attention_mask)

    ``mapping`` is ``"uniform"`` or an explicit list of ``(student_layer, teacher_layer)`` indices
    into ``hidden_states`` (0 = embeddings).  Put the LayerMap's parameters in the optimiser
    with the student's when the widths differ.
    """

    def __init__(
        self,
        n_teacher_layers: int,
        n_student_layers: int,
        teacher_width: int,
        student_width: int,
        mapping: Literal["uniform"] | Sequence[tuple[int, int]] = "uniform",
        loss: Literal["mse", "cosine"] = "mse",
    ):
        super().__init__()
        for name, value in (("n_teacher_layers", n_teacher_layers), ("n_student_layers", n_student_layers),
                            ("teacher_width", teacher_width), ("student_width", student_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        if isinstance(mapping, str):
            if mapping != "uniform":
                raise ValueError(f"mapping must be 'uniform' or a list of (student_layer, teacher_layer) pairs, got {mapping!r}")
            pairs = uniform_mapping(n_teacher_layers, n_student_layers)
        else:
            pairs = [tuple(p) for p in mapping]
            if not pairs:
                raise ValueError("mapping is an empty list; give at least one (student_layer, teacher_layer) pair or 'uniform'")
            for p in pairs:
                if len(p) != 2 or not all(isinstance(i, int) for i in p):
                    raise ValueError(f"mapping entries must be (student_layer, teacher_layer) integer pairs, got {p!r}")
                s, t = p
                if not (0 <= s <= n_student_layers and 0 <= t <= n_teacher_layers):
                    raise ValueError(
                        f"mapping pair (student {s}, teacher {t}) is out of range: student layers are 0..{n_student_layers} "
                        f"and teacher layers 0..{n_teacher_layers} (hidden_states indices, 0 = embeddings)"
                    )
        self.pairs: list[tuple[int, int]] = pairs
        self.n_teacher_layers, self.n_student_layers = n_teacher_layers, n_student_layers
        self.loss = loss
        self.projections = (
            nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in pairs) if student_width != teacher_width else None
        )

    def extra_repr(self) -> str:
        return f"pairs={self.pairs}, loss={self.loss!r}"

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        mask: Tensor | None = None,
    ) -> Tensor:
        for who, states, n in (("student", student_hidden_states, self.n_student_layers),
                               ("teacher", teacher_hidden_states, self.n_teacher_layers)):
            if len(states) != n + 1:
                raise ValueError(
                    f"{who} hidden_states has {len(states)} entries but this LayerMap expects {n + 1} "
                    f"(embeddings + {n} layers); run the model with output_hidden_states=True and build the "
                    "LayerMap with its layer count"
                )
        loss_fn = hidden_mse if self.loss == "mse" else hidden_cosine
        total = 0.0
        for i, (s, t) in enumerate(self.pairs):
            h_s = student_hidden_states[s]
            if self.projections is not None:
                h_s = self.projections[i](h_s)
            total = total + loss_fn(h_s, teacher_hidden_states[t], mask)
        return total / len(self.pairs)
