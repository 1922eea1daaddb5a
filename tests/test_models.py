"""Model zoo, registry, import-path / Hugging Face adapters and safetensors weights."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from distillery.config import ModelSpec
from distillery.errors import ModelError
from distillery.models import (
    available_models,
    build_model,
    count_parameters,
    forward_logits,
    load_weights,
    register_model,
)

SHAPES = [  # (in_channels, input_size, num_classes)
    (1, (28, 28), 10),  # Fashion-MNIST
    (1, (8, 8), 10),  # scikit-learn digits
    (3, (32, 32), 100),  # CIFAR-100
]

ZOO = sorted(available_models())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(arch: str, shape=SHAPES[2], **kwargs) -> nn.Module:
    c, size, k = shape
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=c, num_classes=k, input_size=size)


# ---------------------------------------------------------------------------------------------
# Zoo


def test_zoo_lists_the_literature_models():
    for name in ["resnet8", "resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn", "wrn_40_2",
                 "wrn_16_2", "mobilenetv2", "cnn", "mlp", "vit_tiny"]:
        assert name in ZOO
        assert available_models()[name]  # a description from the docstring


@pytest.mark.parametrize("arch", ZOO)
def test_zoo_model_builds_for_every_data_shape(arch):
    for c, size, k in SHAPES:
        torch.manual_seed(0)
        model = build(arch, (c, size, k)).eval()
        with torch.no_grad():
            logits = forward_logits(model, torch.randn(2, c, *size))
        assert logits.shape == (2, k), (arch, c, size)
        assert torch.isfinite(logits).all()
        assert isinstance(model.head, nn.Linear) and model.head.out_features == k
        assert model.default_feature_layers
        for name in model.default_feature_layers:
            model.get_submodule(name)  # raises if the name does not resolve


def test_head_input_is_the_penultimate_feature_and_deepest_stage_is_spatial():
    model = build("resnet20", SHAPES[0]).eval()
    seen = {}
    model.head.register_forward_hook(lambda m, inp, out: seen.setdefault("head_in", inp[0]))
    model.get_submodule(model.default_feature_layers[-1]).register_forward_hook(
        lambda m, inp, out: seen.setdefault("deep", out)
    )
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert seen["head_in"].shape == (2, 64)
    assert seen["deep"].shape == (2, 64, 7, 7)


def test_models_are_deterministic_given_the_seed():
    torch.manual_seed(3)
    a = build("cnn").state_dict()
    torch.manual_seed(3)
    b = build("cnn").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("resnet20", 0.27e6),  # He et al. 2016, Table 6 (0.27M)
        ("resnet56", 0.85e6),  # He et al. 2016, Table 6 (0.85M)
        ("resnet110", 1.7e6),  # He et al. 2016, Table 6 (1.7M)
        ("resnet32x4", 7.43e6),  # CRD (Tian et al. 2020), CIFAR-100
        ("resnet8x4", 1.23e6),  # CRD (Tian et al. 2020), CIFAR-100
        ("wrn_40_2", 2.2e6),  # Zagoruyko & Komodakis 2016 / CRD
        ("wrn_16_2", 0.70e6),  # CRD (Tian et al. 2020)
    ],
)
def test_parameter_counts_match_the_literature(arch, expected):
    n = count_parameters(build(arch, (3, (32, 32), 100)))
    assert abs(n - expected) / expected < 0.05, f"{arch}: {n} params, literature {expected:.0f}"


def test_cnn_and_mlp_sizes():
    big = count_parameters(build("cnn", SHAPES[0]))
    tiny = count_parameters(build("cnn", SHAPES[0], width=8))
    assert 1e5 <= big <= 1e6
    assert tiny < big / 10
    deep = build("cnn", SHAPES[1], depth=8)  # pooling stops at 1x1 on 8x8 inputs
    assert deep(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert [m.out_features for m in build("mlp", SHAPES[0], hidden=[64, 32]).modules() if isinstance(m, nn.Linear)] == [64, 32, 10]


def test_mlp_on_tables():
    model = build_model(ModelSpec(arch="mlp"), in_channels=None, num_classes=3, input_size=(13,))
    assert model(torch.randn(5, 13)).shape == (5, 3)
    assert model.layers[0][0].in_features == 13


def test_zoo_kwargs_are_passed_and_checked():
    model = build("wrn", SHAPES[2], depth=10, widen_factor=1)
    assert len(model.layer1) == 1
    assert build("mobilenetv2", SHAPES[0], width_mult=0.5).head.in_features == 1280
    vit = build("vit_tiny", SHAPES[0], patch_size=7, dim=32, depth=2, heads=2)
    assert vit.pos_embed.shape == (1, 17, 32)
    assert build("resnet8", SHAPES[0], num_classes=4).head.out_features == 4  # kwargs beat the data

    with pytest.raises(ModelError, match=r"no parameter\(s\) widht.*width, depth"):
        build("cnn", SHAPES[0], widht=16)
    with pytest.raises(ModelError, match="6n\\+4"):
        build("wrn", SHAPES[0], depth=12)
    with pytest.raises(ModelError, match="patch sizes that do"):
        build("vit_tiny", SHAPES[0], patch_size=5)


def test_conv_model_on_tables_says_use_mlp():
    with pytest.raises(ModelError, match="mlp"):
        build_model(ModelSpec(arch="resnet20"), in_channels=None, num_classes=3, input_size=(13,))


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ModelError) as err:
        build("resnet21")
    msg = str(err.value)
    assert "resnet20" in msg and "cnn" in msg and "pkg.module:factory" in msg and "hf:" in msg


def test_register_model_adds_to_the_zoo():
    @register_model("_test_linear")
    def _test_linear(in_channels, num_classes, input_size=None):
        """A test-only linear model."""
        model = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size[0] * input_size[1], num_classes))
        return model

    try:
        assert available_models()["_test_linear"] == "A test-only linear model."
        assert build("_test_linear", SHAPES[1])(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    finally:
        from distillery.models import zoo

        zoo._REGISTRY.pop("_test_linear")


# ---------------------------------------------------------------------------------------------
# forward_logits / count_parameters


class _TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, "aux"


class _KwOut(nn.Module):
    def forward(self, input_ids, attention_mask=None):
        class Out:
            logits = input_ids.float() + attention_mask

        return Out()


def test_forward_logits_conventions():
    x = torch.ones(2, 3)
    assert torch.equal(forward_logits(_TupleOut(), x), x * 2)
    assert torch.equal(forward_logits(nn.Identity(), x), x)
    out = forward_logits(_KwOut(), {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": x})
    assert torch.equal(out, x * 2)


def test_count_parameters_counts_shared_weights_once():
    lin = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(lin, lin)) == 20
    lin.bias.requires_grad_(False)
    assert count_parameters(lin, trainable_only=True) == 16


# ---------------------------------------------------------------------------------------------
# pkg.module:factory


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(
        """
        import torch.nn as nn

        def plain(hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

        def shaped(in_channels, num_classes, input_size, hidden=8):
            n = in_channels * input_size[0] * input_size[1]
            return nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.Linear(hidden, num_classes))

        def only_kwargs(**kwargs):
            assert "in_channels" not in kwargs
            return nn.Linear(64, 10)

        def not_a_model():
            return 42
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets"
    sys.modules.pop("my_nets", None)


def test_import_path_factory_without_data_kwargs(user_module):
    model = build(f"{user_module}:plain", SHAPES[1], hidden=5)
    assert model[1].out_features == 5
    assert build(f"{user_module}:only_kwargs", SHAPES[1]).out_features == 10


def test_import_path_factory_with_data_kwargs(user_module):
    model = build(f"{user_module}:shaped", (3, (4, 4), 7))
    assert model[1].in_features == 48 and model[2].out_features == 7
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 7)


def test_import_path_errors(user_module):
    with pytest.raises(ModelError, match="cannot import module 'no_such_pkg_xyz.nets'.*No module named"):
        build("no_such_pkg_xyz.nets:f")
    with pytest.raises(ModelError, match="has no attribute 'missing'.*plain"):
        build(f"{user_module}:missing")
    with pytest.raises(ModelError, match="expected a torch.nn.Module"):
        build(f"{user_module}:not_a_model")
    with pytest.raises(ModelError, match="bogus"):
        build(f"{user_module}:plain", bogus=1)


# ---------------------------------------------------------------------------------------------
# Weights: safetensors only


def test_weights_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = build("resnet8", SHAPES[0]).eval()
    save_file(teacher.state_dict(), str(tmp_path / "model.safetensors"))
    x = torch.randn(2, 1, 28, 28)

    for weights in [tmp_path / "model.safetensors", tmp_path]:  # the file, or its directory
        torch.manual_seed(1)
        spec = ModelSpec(arch="resnet8", weights=str(weights))
        loaded = build_model(spec, in_channels=1, num_classes=10, input_size=(28, 28)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), teacher(x))


def test_pickle_and_bad_files_are_refused(tmp_path):
    model = build("resnet8", SHAPES[0])
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(ModelError, match=r"only safetensors|Only safetensors") as err:
        load_weights(model, tmp_path / "model.pt")
    assert "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')" in str(err.value)

    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_weights(model, tmp_path / "corrupt.safetensors")
    with pytest.raises(ModelError, match="not found"):
        load_weights(model, tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_weights(model, tmp_path)


def test_class_count_mismatch_names_the_key(tmp_path):
    from safetensors.torch import save_file

    save_file(build("resnet8", SHAPES[0]).state_dict(), str(tmp_path / "t.safetensors"))
    spec = ModelSpec(arch="resnet8", weights=str(tmp_path / "t.safetensors"))
    with pytest.raises(ModelError) as err:
        build_model(spec, in_channels=1, num_classes=3, input_size=(28, 28))
    msg = str(err.value)
    assert "10 classes but the data has 3" in msg and "head.weight" in msg and "(10, 64)" in msg


def test_architecture_mismatch_names_keys(tmp_path):
    from safetensors.torch import save_file

    save_file(build("resnet8", SHAPES[0]).state_dict(), str(tmp_path / "t.safetensors"))
    with pytest.raises(ModelError, match="missing from the file: layer1.1"):
        load_weights(build("resnet14", SHAPES[0]), tmp_path / "t.safetensors")


# ---------------------------------------------------------------------------------------------
# Hugging Face


def test_hf_sequence_classifier_from_a_local_dir(tmp_path):
    transformers = pytest.importorskip("transformers")

    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "tiny-bert")

    spec = ModelSpec(arch=f"hf:{tmp_path / 'tiny-bert'}")
    model = build_model(spec, in_channels=None, num_classes=3, input_size=None).eval()
    assert isinstance(model, transformers.BertForSequenceClassification)
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with torch.no_grad():
        assert forward_logits(model, inputs).shape == (2, 3)


def test_hf_missing_source_is_a_model_error(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ModelError, match="cannot read its config"):
        build_model(ModelSpec(arch=f"hf:{tmp_path / 'nothing'}"), in_channels=None, num_classes=2, input_size=None)


def test_hf_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelError, match=r"pip install 'distillery\[hf\]'"):
        build_model(ModelSpec(arch="hf:some/model"), in_channels=None, num_classes=2, input_size=None)
