"""A weight-sharing BERT super-network: every smaller BERT encoder of a sub-space runs on slices
of one set of weights (AutoDistil's SuperLM: Xu, Mukherjee, Liu, Dey, Wang, Zhang, Awadallah,
Gao, "AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large Language
Models", 2022, section 3.2).

A sub-network is an :class:`Arch` -- (layers, hidden, heads, ffn) -- and uses

* the first ``layers`` transformer blocks,
* the first ``hidden`` columns of every embedding table and the leading ``hidden`` x ``hidden``
  block of every projection (``weight[:out, :in]``, ``bias[:out]``), the first ``hidden`` entries
  of every LayerNorm (which normalises over those ``hidden`` features only),
* the first ``ffn`` units of each feed-forward layer,
* ``heads`` attention heads of size ``hidden / heads`` (Q, K, V are ``hidden`` wide, as in BERT:
  a sub-network is a plain ``BertModel`` once its slices are copied out -- :func:`export_bert`).

Parameter names are those of Hugging Face's ``BertModel`` (``encoder.layer.3.attention.self.query``
...), so the teacher's state dict initialises the super-network by name (:func:`init_from_teacher`),
an exported sub-network loads with ``strict=True``, and the same ``distillery.taps`` module paths
read Q/K/V from the teacher, the super-network and the exported student.  The module is written
here rather than patched into ``transformers`` so that the slicing stays in ~60 visible lines.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, order=True)
class Arch:
    """One student architecture of the space."""

    layers: int
    hidden: int
    heads: int
    ffn: int

    @property
    def key(self) -> str:
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-F{self.ffn}"

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads, "ffn": self.ffn}


@dataclass
class EncoderOutput:
    """The fields of Hugging Face's BaseModelOutput that callers read (no transformers import here)."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


# ------------------------------------------------------------------------------- sliced layers
class SlicedLinear(nn.Linear):
    """``nn.Linear`` that runs on ``weight[:out, :in]``; ``in`` is the input's width."""

    def forward(self, x: Tensor, out_features: int | None = None) -> Tensor:
        out = self.out_features if out_features is None else out_features
        return F.linear(x, self.weight[:out, : x.shape[-1]], self.bias[:out])


class SlicedLayerNorm(nn.LayerNorm):
    """LayerNorm over the input's width, with the first entries of the affine parameters."""

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[-1]
        return F.layer_norm(x, (h,), self.weight[:h], self.bias[:h], self.eps)


class SlicedEmbedding(nn.Embedding):
    """An embedding table read through its first ``width`` columns."""

    def forward(self, ids: Tensor, width: int | None = None) -> Tensor:
        w = self.weight if width is None else self.weight[:, :width]
        return F.embedding(ids, w, self.padding_idx)


class SuperLayer(nn.Module):
    """One post-LayerNorm BERT block whose widths are chosen per call."""

    def __init__(self, config):
        super().__init__()
        h, f, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: SlicedLinear(h, h) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": SlicedLinear(h, h), "LayerNorm": SlicedLayerNorm(h, eps=eps)}),
        })
        self.intermediate = nn.ModuleDict({"dense": SlicedLinear(h, f)})
        self.output = nn.ModuleDict({"dense": SlicedLinear(f, h), "LayerNorm": SlicedLayerNorm(h, eps=eps)})
        from transformers.activations import ACT2FN

        self.act = ACT2FN[config.hidden_act]
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, key_mask: Tensor, heads: int, ffn: int) -> Tensor:
        b, n, h = x.shape
        sa = self.attention["self"]

        def split(t: Tensor) -> Tensor:  # (B, L, h) -> (B, heads, L, h / heads), BERT's head layout
            return t.view(b, n, heads, h // heads).transpose(1, 2)

        q, k, v = (split(sa[name](x, h)) for name in ("query", "key", "value"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, n, h)
        att = self.attention["output"]
        x = att["LayerNorm"](x + self.dropout(att["dense"](ctx, h)))
        inner = self.act(self.intermediate["dense"](x, ffn))
        return self.output["LayerNorm"](x + self.dropout(self.output["dense"](inner, h)))


class SuperBert(nn.Module):
    """The largest encoder of a sub-space (``config``: a ``BertConfig`` with its layers, hidden size
    and FFN size); ``forward(..., arch=Arch(...))`` runs one sub-network."""

    def __init__(self, config):
        super().__init__()
        self.config = copy.deepcopy(config)
        h, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = nn.ModuleDict({
            "word_embeddings": SlicedEmbedding(config.vocab_size, h, padding_idx=config.pad_token_id),
            "position_embeddings": SlicedEmbedding(config.max_position_embeddings, h),
            "token_type_embeddings": SlicedEmbedding(config.type_vocab_size, h),
            "LayerNorm": SlicedLayerNorm(h, eps=eps),
        })
        self.emb_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(SuperLayer(config) for _ in range(config.num_hidden_layers))
        # BertModel's pooler: unused by the distillation, kept so an exported student is a complete
        # BertModel and parameter counts match the model a user loads.
        self.pooler = nn.ModuleDict({"dense": SlicedLinear(h, h)})

    @property
    def largest(self) -> Arch:
        c = self.config
        return Arch(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)

    def check(self, arch: Arch) -> None:
        top = self.largest
        if arch.layers > top.layers or arch.hidden > top.hidden or arch.ffn > top.ffn or min(arch.as_dict().values()) < 1:
            raise ValueError(f"sub-network {arch.key} does not fit in this super-network "
                             f"(at most {top.layers} layers, hidden {top.hidden}, ffn {top.ffn})")
        if arch.hidden % arch.heads:
            raise ValueError(f"sub-network {arch.key}: {arch.heads} heads do not divide hidden size {arch.hidden}")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                *, arch: Arch, output_hidden_states: bool = False) -> EncoderOutput:
        self.check(arch)
        n = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb, h = self.embeddings, arch.hidden
        positions = torch.arange(n, device=input_ids.device).unsqueeze(0)
        x = (emb["word_embeddings"](input_ids, h) + emb["position_embeddings"](positions, h)
             + emb["token_type_embeddings"](token_type_ids, h))
        x = self.emb_dropout(emb["LayerNorm"](x))
        key_mask = attention_mask.bool()[:, None, None, :]  # True = a real key may be attended to
        states = [x]
        for block in self.encoder.layer[: arch.layers]:
            x = block(x, key_mask, arch.heads, arch.ffn)
            states.append(x)
        return EncoderOutput(last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None)


# ---------------------------------------------------------------------------- build and export
def bert_config(base_config, arch: Arch):
    """``base_config`` (the teacher's BertConfig) with the sizes of ``arch``."""
    cfg = copy.deepcopy(base_config)
    cfg.num_hidden_layers, cfg.hidden_size = arch.layers, arch.hidden
    cfg.num_attention_heads, cfg.intermediate_size = arch.heads, arch.ffn
    return cfg


def supernet_for(teacher_config, largest: Arch) -> SuperBert:
    """A super-network whose largest sub-network is ``largest`` (random weights until
    :func:`init_from_teacher`)."""
    return SuperBert(bert_config(teacher_config, largest))


def _slice_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    if len(shape) != t.dim() or any(s > d for s, d in zip(shape, t.shape)):
        raise ValueError(f"cannot slice a tensor of shape {tuple(t.shape)} to {shape}")
    return t[tuple(slice(0, s) for s in shape)]


def _block_index(key: str) -> tuple[int, str] | None:
    """``encoder.layer.3.attention...`` -> (3, ``attention...``); None outside the blocks."""
    if not key.startswith("encoder.layer."):
        return None
    index, rest = key[len("encoder.layer."):].split(".", 1)
    return int(index), rest


@torch.no_grad()
def init_from_teacher(net: SuperBert, teacher_state: dict[str, Tensor], teacher_layers: int) -> list[int]:
    """Copy the teacher's weights into the super-network by name, each sliced to the super-network's
    shape (its leading rows/columns).  Super-network block i takes teacher block ``layers[i]``,
    evenly spaced with the first and last kept (DistilBERT's choice, as in ``lm/encoder.py``), so
    the largest sub-network starts as a thinner copy of the whole teacher and a sub-network of the
    teacher's size *is* the teacher.  Returns ``layers``."""
    from distillery.lm.encoder import evenly_spaced_layers

    layers = evenly_spaced_layers(teacher_layers, net.config.num_hidden_layers)
    state = {}
    for key, value in net.state_dict().items():
        block = _block_index(key)
        src = key if block is None else f"encoder.layer.{layers[block[0]]}.{block[1]}"
        if src not in teacher_state:
            raise ValueError(f"the teacher has no tensor '{src}': it is not a BERT encoder with BertModel's names")
        state[key] = _slice_to(teacher_state[src], tuple(value.shape)).clone()
    net.load_state_dict(state, strict=True)
    return layers


@functools.lru_cache(maxsize=4096)
def _bert_shapes(config_json: str, arch: Arch) -> dict[str, tuple[int, ...]]:
    """Shapes of the BertModel of ``arch`` (built on the meta device: no memory, no init)."""
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        model = BertModel(bert_config(BertConfig.from_dict(json.loads(config_json)), arch))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def bert_shapes(base_config, arch: Arch) -> dict[str, tuple[int, ...]]:
    return _bert_shapes(base_config.to_json_string(use_diff=False), arch)


def count_params(base_config, arch: Arch) -> int:
    """Parameters of the exported BertModel of ``arch`` (embeddings and pooler included)."""
    return sum(math.prod(s) for s in bert_shapes(base_config, arch).values())


def count_macs(arch: Arch, seq_len: int) -> int:
    """Multiply-accumulates of one sequence of ``seq_len`` tokens through the blocks (FLOPs ~ 2x):
    per block Q, K, V and output projections 4 L h^2, the feed-forward 2 L h f, attention scores
    and the weighted sum of values 2 L^2 h.  Embedding look-ups, LayerNorms and the pooler are left out."""
    h, f, n = arch.hidden, arch.ffn, seq_len
    return arch.layers * (4 * n * h * h + 2 * n * h * f + 2 * n * n * h)


@torch.no_grad()
def export_bert(net: SuperBert, arch: Arch):
    """The sub-network ``arch`` as a standalone Hugging Face ``BertModel`` (copied slices, eval mode)."""
    from transformers import BertModel

    net.check(arch)
    config = bert_config(net.config, arch)
    model = BertModel(config)
    source = net.state_dict()
    state = {key: _slice_to(source[key], shape).clone() for key, shape in bert_shapes(net.config, arch).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
