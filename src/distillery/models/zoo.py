"""The built-in model zoo, and the registry it lives in.

Every factory takes the data-derived ``in_channels``, ``num_classes`` and ``input_size``
(``(H, W)`` for images, ``(features,)`` for tables) plus its own keyword arguments, and
returns an ``nn.Module`` that follows three conventions the feature taps rely on:

* the classifier is an ``nn.Linear`` attribute named ``head``; its input is the penultimate
  feature vector (so a hook on ``head`` sees the embedding);
* the stages have stable dotted names (``layer1``, ``features.3``, ``blocks.5``, ...);
* ``model.default_feature_layers`` lists those stage names, shallow to deep; the last entry is
  the deepest spatial (or token) stage.

All image models are fully convolutional up to a global pooling (the ViT excepted, whose
position embedding is sized from ``input_size``), so the same architecture serves 1-channel
8x8 digits, 1-channel 28x28 Fashion-MNIST and 3-channel 32x32 CIFAR.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillery.errors import ModelError

# ---------------------------------------------------------------------------------------------
# Registry

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make ``factory`` buildable as ``arch: <name>``.

    The first line of the factory's docstring is its description in :func:`available_models`.
    """

    def deco(factory: ModelFactory) -> ModelFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != factory.__qualname__:
            raise ValueError(f"model '{name}' is already registered (by {existing.__module__}.{existing.__qualname__})")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_models() -> dict[str, str]:
    """Registered model names -> one-line descriptions, sorted by name."""
    out = {}
    for name in sorted(_REGISTRY):
        doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()
        out[name] = doc[0].strip() if doc else ""
    return out


def get_factory(name: str) -> ModelFactory:
    """The factory registered as ``name``; a :class:`ModelError` listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelError(
            f"unknown model '{name}'.{hint} Built-in models: {', '.join(sorted(_REGISTRY))}. "
            "Any other model: an import path 'pkg.module:factory' (called with the model kwargs), "
            "or 'hf:<local dir or Hub id>' for a Hugging Face classification model."
        ) from None


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _image_channels(arch: str, in_channels: int | None, input_size: Sequence[int] | None) -> int:
    """Check that a conv/attention model is fed images; returns ``in_channels``."""
    if input_size is not None and len(input_size) != 2:
        raise ModelError(
            f"'{arch}' needs image inputs (input_size (H, W)) but the data has input_size={tuple(input_size)}; "
            "for tabular data use arch: mlp"
        )
    if in_channels is None or int(in_channels) < 1:
        raise ModelError(
            f"'{arch}' needs image inputs with a channel count, got in_channels={in_channels}; "
            "for tabular data use arch: mlp"
        )
    return int(in_channels)


def _init_conv_net(model: nn.Module) -> None:
    """He et al. (2015) init for convs, identity BatchNorm, small-uniform (PyTorch default) linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


# ---------------------------------------------------------------------------------------------
# CIFAR-style ResNets -- He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
# CVPR 2016, Sec. 4.2; widths and the x4 variants as used in the KD literature
# (Tian et al., "Contrastive Representation Distillation", ICLR 2020).


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; identity shortcut, or 1x1 conv + BN when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2): a 3x3 stem conv, three stages of n BasicBlocks (strides 1, 2, 2), global
    average pooling and a linear ``head``.  ``widths`` = (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: Sequence[int], in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        stem, w1, w2, w3 = widths
        self.conv1 = _conv3x3(in_channels, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = self._stage(stem, w1, n, stride=1)
        self.layer2 = self._stage(w1, w2, n, stride=2)
        self.layer3 = self._stage(w2, w3, n, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(w3, num_classes)
        self.default_feature_layers = ["layer1", "layer2", "layer3"]
        _init_conv_net(self)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(c_in, c_out, stride)]
        layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(torch.flatten(self.pool(x), 1))


_RESNET_WIDTHS = (16, 16, 32, 64)
_RESNET_X4_WIDTHS = (32, 64, 128, 256)


def _resnet(arch: str, depth: int, widths: Sequence[int], in_channels, num_classes, input_size) -> CifarResNet:
    return CifarResNet(depth, widths, _image_channels(arch, in_channels, input_size), num_classes)


@register_model("resnet8")
def resnet8(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-8, CIFAR-style (He et al. 2016); ~0.08M params."""
    return _resnet("resnet8", 8, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet14")
def resnet14(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-14, CIFAR-style (He et al. 2016); ~0.18M params."""
    return _resnet("resnet14", 14, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet20")
def resnet20(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-20, CIFAR-style (He et al. 2016); ~0.27M params."""
    return _resnet("resnet20", 20, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet32")
def resnet32(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-32, CIFAR-style (He et al. 2016); ~0.47M params."""
    return _resnet("resnet32", 32, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet44")
def resnet44(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-44, CIFAR-style (He et al. 2016); ~0.66M params."""
    return _resnet("resnet44", 44, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet56")
def resnet56(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-56, CIFAR-style (He et al. 2016); ~0.86M params."""
    return _resnet("resnet56", 56, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet110")
def resnet110(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-110, CIFAR-style (He et al. 2016); ~1.7M params."""
    return _resnet("resnet110", 110, _RESNET_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet8x4")
def resnet8x4(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-8 with 4x wider stages (64/128/256), as in CRD (Tian et al. 2020); ~1.2M params."""
    return _resnet("resnet8x4", 8, _RESNET_X4_WIDTHS, in_channels, num_classes, input_size)


@register_model("resnet32x4")
def resnet32x4(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """ResNet-32 with 4x wider stages (64/128/256), as in CRD (Tian et al. 2020); ~7.4M params."""
    return _resnet("resnet32x4", 32, _RESNET_X4_WIDTHS, in_channels, num_classes, input_size)


# ---------------------------------------------------------------------------------------------
# Wide ResNets -- Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
# Pre-activation blocks (BN-ReLU-conv); WRN-d-k has (d-4)/6 blocks per stage and widths
# 16k, 32k, 64k.


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut
    (identity, or a 1x1 conv on the pre-activated input when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: stem conv (16), stages ``layer1..3``, final BN-ReLU, pooling, ``head``."""

    def __init__(self, depth: int, widen_factor: int, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ModelError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ModelError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.layer1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[3], num_classes)
        self.default_feature_layers = ["layer1", "layer2", "layer3"]
        _init_conv_net(self)

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [WideBlock(c_in, c_out, stride, dropout)]
        layers += [WideBlock(c_out, c_out, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.head(torch.flatten(self.pool(x), 1))


@register_model("wrn")
def wrn(
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    depth: int = 16,
    widen_factor: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """Wide ResNet WRN-depth-widen_factor (Zagoruyko & Komodakis 2016); depth = 6n+4."""
    channels = _image_channels("wrn", in_channels, input_size)
    return WideResNet(int(depth), int(widen_factor), channels, num_classes, float(dropout))


@register_model("wrn_16_1")
def wrn_16_1(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """WRN-16-1 (Zagoruyko & Komodakis 2016); ~0.18M params."""
    return wrn(in_channels, num_classes, input_size, depth=16, widen_factor=1)


@register_model("wrn_16_2")
def wrn_16_2(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """WRN-16-2 (Zagoruyko & Komodakis 2016); ~0.7M params."""
    return wrn(in_channels, num_classes, input_size, depth=16, widen_factor=2)


@register_model("wrn_40_1")
def wrn_40_1(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """WRN-40-1 (Zagoruyko & Komodakis 2016); ~0.57M params."""
    return wrn(in_channels, num_classes, input_size, depth=40, widen_factor=1)


@register_model("wrn_40_2")
def wrn_40_2(in_channels: int | None, num_classes: int, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """WRN-40-2 (Zagoruyko & Komodakis 2016); ~2.2M params."""
    return wrn(in_channels, num_classes, input_size, depth=40, widen_factor=2)


# ---------------------------------------------------------------------------------------------
# MobileNetV2 -- Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and
# Linear Bottlenecks", CVPR 2018.  Adapted to small inputs: stride-1 stem and stride-1 second
# stage (total stride 8 instead of 32), as is usual for CIFAR.

# (expansion t, output channels c, blocks n, first stride s) per stage, Table 2 of the paper
# with the first two strides set to 1.
_MOBILENETV2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never going down by >10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (t-fold) -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(c_in, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """``stem``, inverted-residual stages ``stage1..stage7``, 1x1 ``conv_last``, pooling, ``head``."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if width_mult <= 0:
            raise ModelError(f"mobilenetv2 width_mult must be > 0, got {width_mult}")
        c = _make_divisible(32 * width_mult)
        self.stem = _conv_bn_relu6(in_channels, c, 3, stride=1)
        for i, (t, c_out, n, s) in enumerate(_MOBILENETV2_STAGES, start=1):
            c_out = _make_divisible(c_out * width_mult)
            blocks = [InvertedResidual(c if j == 0 else c_out, c_out, s if j == 0 else 1, t) for j in range(n)]
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
            c = c_out
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.conv_last = _conv_bn_relu6(c, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(last, num_classes)
        # The last stage at each resolution (1, 1/2, 1/4, 1/8 of the input).
        self.default_feature_layers = ["stage2", "stage3", "stage5", "conv_last"]
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, len(_MOBILENETV2_STAGES) + 1):
            x = getattr(self, f"stage{i}")(x)
        x = self.conv_last(x)
        return self.head(self.dropout(torch.flatten(self.pool(x), 1)))


@register_model("mobilenetv2")
def mobilenetv2(
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> nn.Module:
    """MobileNetV2 for small images (Sandler et al. 2018); ~2.3M params at width_mult 1."""
    channels = _image_channels("mobilenetv2", in_channels, input_size)
    return MobileNetV2(channels, num_classes, float(width_mult), float(dropout))


# ---------------------------------------------------------------------------------------------
# A plain CNN: the quick baseline / tiny student.


class PlainCNN(nn.Module):
    """``depth`` conv-BN-ReLU blocks ``features.0..``; channels ``width, 2*width, 4*width,
    4*width, ...``; 2x2 max-pooling after each of the first two blocks (skipped once the map
    is 1 pixel), so most convolutions run at 1/4 or 1/16 of the input resolution -- cheap on
    a CPU.  Global average pooling, then ``head``."""

    def __init__(self, in_channels: int, num_classes: int, input_size: Sequence[int] | None, width: int, depth: int):
        super().__init__()
        if width < 1 or depth < 1:
            raise ModelError(f"cnn needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        size = min(input_size) if input_size is not None else None
        blocks, c, ends = [], in_channels, []
        for i in range(depth):
            c_out = width * 2 ** min(i, 2)
            layers: list[nn.Module] = [_conv3x3(c, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < 2 and (size is None or size >= 2):
                layers.append(nn.MaxPool2d(2))
                size = size // 2 if size is not None else None
                ends.append(i)
            blocks.append(nn.Sequential(*layers))
            c = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)
        # Where the resolution drops, and the last block.
        self.default_feature_layers = [f"features.{i}" for i in sorted(set(ends) | {depth - 1})]
        _init_conv_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@register_model("cnn")
def cnn(
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    width: int = 32,
    depth: int = 4,
) -> nn.Module:
    """Plain conv-BN-ReLU CNN (channels w, 2w, 4w, 4w; pooling after blocks 1-2); 0.24M params at width 32."""
    channels = _image_channels("cnn", in_channels, input_size)
    return PlainCNN(channels, num_classes, input_size, int(width), int(depth))


# ---------------------------------------------------------------------------------------------
# A multi-layer perceptron, for tables (input_size=(features,)) or flattened images.


class MLP(nn.Module):
    """``flatten`` -> hidden blocks ``layers.N`` (Linear-ReLU[-Dropout]) -> ``head``."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten()
        blocks, n = [], in_features
        for h in hidden:
            block: list[nn.Module] = [nn.Linear(n, int(h)), nn.ReLU(inplace=True)]
            if dropout > 0:
                block.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*block))
            n = int(h)
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(n, num_classes)
        self.default_feature_layers = [f"layers.{i}" for i in range(len(blocks))] or ["flatten"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))


@register_model("mlp")
def mlp(
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    hidden: Sequence[int] = (128,),
    dropout: float = 0.0,
) -> nn.Module:
    """Multi-layer perceptron on flattened inputs (tables or images); hidden sizes via ``hidden``."""
    if input_size is None:
        raise ModelError("'mlp' needs input_size ((features,) for tables, (H, W) for images) to size its first layer")
    if isinstance(hidden, int):
        hidden = [hidden]
    if any(int(h) < 1 for h in hidden):
        raise ModelError(f"mlp hidden sizes must be >= 1, got {list(hidden)}")
    in_features = (in_channels or 1) * math.prod(int(s) for s in input_size)
    return MLP(in_features, num_classes, list(hidden), float(dropout))


# ---------------------------------------------------------------------------------------------
# Vision Transformer -- Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for
# Image Recognition at Scale", ICLR 2021.  Patch embedding by a strided conv, a class token,
# learned position embeddings, pre-norm transformer blocks.


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, D)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """``patch_embed`` -> [cls] + patches + ``pos_embed`` -> ``blocks.N`` -> ``norm`` -> ``head`` on [cls]."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        input_size: Sequence[int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
    ):
        super().__init__()
        h, w = (int(s) for s in input_size)
        if patch_size < 1 or h % patch_size or w % patch_size:
            divisors = [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]
            raise ModelError(
                f"vit_tiny patch_size={patch_size} does not divide the input size {h}x{w}; "
                f"patch sizes that do: {divisors}"
            )
        if depth < 1 or dim < 1 or heads < 1 or dim % heads:
            raise ModelError(f"vit_tiny needs depth >= 1 and dim divisible by heads, got dim={dim}, heads={heads}, depth={depth}")
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        # Blocks at a third, two thirds and the end of the depth.
        taps = sorted({max(0, round(depth * k / 3) - 1) for k in (1, 2, 3)})
        self.default_feature_layers = [f"blocks.{i}" for i in taps]
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch embedding is a linear map of each patch: init it like one (fan-in).
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / self.patch_embed.weight[0].numel()))
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@register_model("vit_tiny")
def vit_tiny(
    in_channels: int | None,
    num_classes: int,
    input_size: tuple[int, ...] | None = None,
    patch_size: int = 4,
    dim: int = 128,
    depth: int = 6,
    heads: int = 4,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Small Vision Transformer for small images (Dosovitskiy et al. 2021); ~1.2M params by default."""
    channels = _image_channels("vit_tiny", in_channels, input_size)
    if input_size is None:
        raise ModelError("'vit_tiny' needs input_size (H, W) to size its position embedding")
    return VisionTransformer(
        channels, num_classes, input_size, int(patch_size), int(dim), int(depth), int(heads), float(mlp_ratio), float(dropout)
    )
