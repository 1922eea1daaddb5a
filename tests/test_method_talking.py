"""Talking models (Zhao et al. 2023): the loss terms against their definitions, the encoder/decoder
shapes for every family pair, the teacher's later layers really running on the student's message
(compared with running them by hand), gradients reaching the encoder, decoder and student through the
frozen teacher but never the teacher's weights, all-zero exchange weights reducing to plain KD, bad
input, and short digits runs (CNN -> CNN and CNN -> MLP)."""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import interrupt_then_resume, same_weights, tiny_cfg
from distillery import methods
from distillery.config import AugmentConfig, ModelSpec
from distillery.engine import fit
from distillery.engine.teacher import OnlineTeacher
from distillery.losses import logits as L
from distillery.losses.talking import interaction_loss, message_consistency, response_consistency, state_consistency
from distillery.methods.base import ModelOutput, Progress
from distillery.methods.talking import Translator
from distillery.models import build_model
from distillery.taps import Taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROGRESS = Progress(epoch=0.0, step=0, total_steps=1)


def _model(arch, **kwargs):
    return build_model(ModelSpec(arch=arch, kwargs=kwargs), in_channels=1, num_classes=10, input_size=(8, 8))


def _teacher(seed=0):
    torch.manual_seed(seed)
    return _model("cnn", width=8).eval().requires_grad_(False)


@contextmanager
def _wired(student, teacher, **params):
    """The method with the engine's wiring: a live teacher (not run on the batch) and student taps."""
    spec = methods.get_spec("talking")
    method = spec.cls(spec.validate_params(params), student=student, teacher_layers=teacher.default_feature_layers,
                      num_classes=10)
    with OnlineTeacher(teacher, method.teacher_taps, AugmentConfig(), 0, True, on_batch=False) as source, \
            Taps(student, method.student_taps) as taps:
        object.__setattr__(method, "_teacher_fn", source.outputs)
        object.__setattr__(method, "_student_taps", taps)

        def run(x):
            taps.clear()
            return ModelOutput(student(x), taps.collect(), x)

        yield method, run


# --------------------------------------------------------------------------- the losses


def test_losses_match_their_definitions_on_hand_cases():
    a, b = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # mean of squared differences: (1 + 4 + 1 + 4) / 4
    for fn in (message_consistency, response_consistency, state_consistency):
        assert fn(a, b).item() == pytest.approx(2.5)
        assert fn(a, a).item() == 0.0
    # CE of [0, ln 3] with target 1: -log(3 / 4)
    z = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])
    assert interaction_loss(z, torch.tensor([1])).item() == pytest.approx(-torch.log(torch.tensor(0.75)).item())
    # gradient of mean((a - b)^2) in a is 2 (a - b) / n
    a64 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b64 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(state_consistency, (a64, b64))
    (g,) = torch.autograd.grad(message_consistency(a64, b64), a64)
    torch.testing.assert_close(g, 2 * (a64 - b64).detach() / 12)


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(2, 4\)"):
        message_consistency(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- the translator


@pytest.mark.parametrize("src,dst,mode", [
    ((8, 4, 4), (16, 2, 2), "map"), ((8, 2, 2), (4, 4, 4), "map"),  # down- and upsampled
    ((5, 16), (9, 8), "tokens"), ((17, 16), (17, 4), "tokens"),
    ((16,), (32,), "vector"),
    ((16,), (8, 2, 2), "flat"), ((17, 16), (8, 2, 2), "flat"), ((8, 4, 4), (17, 16), "flat"), ((32,), (17, 16), "flat"),
])
def test_translator_maps_onto_the_exact_target_shape(src, dst, mode):
    t = Translator(src, dst, "test")
    assert t.mode == mode and t(torch.randn(3, *src)).shape == (3, *dst)


def test_translator_by_hand():
    t = Translator((2, 4, 4), (3, 2, 2), "test")
    x = torch.randn(1, 2, 4, 4)
    pooled = x.view(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 average pooling
    expect = torch.einsum("oc,bchw->bohw", t.proj.weight[:, :, 0, 0], pooled) + t.proj.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(t(x), expect)
    flat = Translator((5, 4), (3, 2, 2), "test")  # tokens -> map: token mean, linear, reshape
    y = torch.randn(2, 5, 4)
    torch.testing.assert_close(flat(y), flat.proj(y.mean(1)).view(2, 3, 2, 2))
    tokens = Translator((6, 4), (3, 5), "test")  # per-token linear, then pairs of positions averaged
    z = torch.randn(2, 6, 4)
    torch.testing.assert_close(tokens(z), tokens.proj(z).view(2, 3, 2, 5).mean(2))


def test_translator_refuses_unsupported_shapes():
    with pytest.raises(ValueError, match=r"cannot translate from a feature of shape \(B, 2, 3, 4, 5\).*tap another layer"):
        Translator((2, 3, 4, 5), (8,), "encoder")
    with pytest.raises(ValueError, match="tap a deeper"):
        Translator((4096,), (256, 64, 64), "encoder")


# --------------------------------------------------------------------------- the exchange


def test_teacher_later_layers_run_on_the_message_and_the_student_on_the_answer():
    teacher, student = _teacher(), _model("mlp", hidden=[16])
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with _wired(student, teacher) as (method, run):
        assert (method.student_layer, method.student_answer) == ("layers.0", "layers.0")
        assert (method.teacher_layer, method.teacher_answer) == ("features.1", "head:input")
        with torch.no_grad():
            method.setup(run(x), None)
        s_out = run(x)
        terms = method(s_out, None, y, PROGRESS)
        h_s = s_out.features["layers.0"]
        with torch.no_grad():
            engine_response = method.converse(x, h_s).response
    message = method.encoder(h_s)
    assert message.shape == (6, 16, 2, 2)  # the teacher's features.1 output
    # By hand: the teacher's layers after features.1, then its pooling, on the message.
    response = torch.flatten(teacher.pool(teacher.features[3](teacher.features[2](message))), 1)
    decoded = method.decoder(response)
    own_state = teacher.features[1](teacher.features[0](x))
    own_answer = torch.flatten(teacher.pool(teacher.features[3](teacher.features[2](own_state))), 1)
    with torch.no_grad():
        torch.testing.assert_close(engine_response, response)
        expect = {
            "kd": 0.9 * L.kd(s_out.logits, teacher(x), temperature=4.0),
            "ce": 0.1 * F.cross_entropy(s_out.logits, y),
            "message": F.mse_loss(message, own_state),
            "response": F.mse_loss(response, own_answer),
            "state": F.mse_loss(decoded, h_s),
            "interact": F.cross_entropy(student.head(decoded), y),  # the student's layers after layers.0: its head
        }
    assert set(terms) == set(expect)
    for name, value in expect.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), name


def test_gradients_cross_the_frozen_teacher_into_encoder_and_student_but_not_its_weights():
    teacher, student = _teacher(), _model("mlp", hidden=[16])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    # Only L_interact: the student's own layer reaches the loss only through message -> teacher -> answer.
    with _wired(student, teacher, interact_weight=1.0, message_weight=0, state_weight=0, response_weight=0,
                kd_weight=0, ce_weight=0) as (method, run):
        with torch.no_grad():
            method.setup(run(x), None)
        terms = method(run(x), None, y, PROGRESS)
    assert set(terms) == {"interact"}
    w = student.layers[0][0].weight
    params = [w, *method.encoder.parameters(), *method.decoder.parameters()]
    grads = torch.autograd.grad(terms["interact"], params)
    assert all(g.abs().sum() > 0 for g in grads)
    # The same composition written by hand gives the same gradient in the student's first layer.
    h = student.layers(student.flatten(x))
    t = teacher.features[3](teacher.features[2](method.encoder(h)))
    by_hand = F.cross_entropy(student.head(method.decoder(torch.flatten(teacher.pool(t), 1))), y)
    torch.testing.assert_close(grads[0], torch.autograd.grad(by_hand, w)[0])
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_zero_exchange_weights_reduce_to_kd_and_run_the_teacher_once():
    teacher, student = _teacher(), _model("cnn", width=4)
    calls = {"n": 0}
    teacher.head.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    with _wired(student, teacher, interact_weight=0, message_weight=0, state_weight=0, response_weight=0) as (method, run):
        with torch.no_grad():
            method.setup(run(x), None)
        s_out = run(x)
        calls["n"] = 0
        terms = method(s_out, None, y, PROGRESS)
    assert calls["n"] == 1
    kd = methods.get_spec("kd")
    base = kd.cls(kd.validate_params({"temperature": 4.0, "alpha": 0.9}), student=student, teacher_layers=None,
                  num_classes=10)(s_out, ModelOutput(teacher(x)), y, PROGRESS)
    assert set(terms) == set(base) == {"kd", "ce"}
    for name in base:
        assert terms[name].item() == pytest.approx(base[name].item(), rel=1e-6)


def test_cnn_teacher_to_vit_student():
    teacher = _teacher()
    torch.manual_seed(1)
    student = _model("vit_tiny", patch_size=4, dim=16, depth=2, heads=2)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with _wired(student, teacher) as (method, run):
        with torch.no_grad():
            method.setup(run(x), None)
        terms = method(run(x), None, y, PROGRESS)
    assert (method.encoder.mode, method.decoder.mode) == ("flat", "flat")  # tokens -> map, vector -> tokens
    assert set(terms) == {"kd", "ce", "message", "response", "state", "interact"}
    sum(terms.values()).backward()
    assert student.patch_embed.weight.grad.abs().sum() > 0 and method.decoder.proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- bad input


def test_bad_layer_choices_are_refused_with_the_fix():
    teacher, student = _teacher(), _model("mlp", hidden=[16])
    with pytest.raises(ValueError, match="is the layer the message replaces"):
        with _wired(student, teacher, teacher_layer="features.2", teacher_answer="features.2"):
            pass
    with pytest.raises(ValueError, match="must be a module path"):
        with _wired(student, teacher, teacher_layer="features.2:input"):
            pass
    bare = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ValueError, match=r"cannot choose student_layer, student_answer.*method.params.student_layer"):
        with _wired(bare, teacher):
            pass
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))
    with _wired(student, teacher, teacher_layer="features.2", teacher_answer="features.0") as (method, run):
        with torch.no_grad():
            method.setup(run(x), None)
        with pytest.raises(ValueError, match="does not depend on the message"):
            method(run(x), None, y, PROGRESS)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    return fit(tiny_cfg(tmp_path_factory.mktemp("teacher"), name="teacher", student={"arch": "cnn", "kwargs": {"width": 8}}))


@pytest.mark.parametrize("student", [{"arch": "cnn", "kwargs": {"width": 8}}, {"arch": "mlp", "kwargs": {"hidden": [32]}}],
                         ids=["cnn_to_cnn", "cnn_to_mlp"])
def test_digits_runs(tmp_path, digits_teacher, student):
    cfg = tiny_cfg(tmp_path, teacher={"run": str(digits_teacher.run_dir)}, student=student, method={"name": "talking"},
                   train={"epochs": 3, "progress": False})
    res = fit(cfg)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    for term in ("kd", "ce", "message", "response", "state", "interact"):
        assert all(f"train_{term}" in r for r in rows), term
    assert rows[-1]["train_message"] < rows[0]["train_message"]  # the encoder learns the teacher's language
    assert rows[-1]["train_interact"] < rows[0]["train_interact"]  # the student learns to use the answers
    assert res.summary["test_accuracy"] > 0.5
    # The encoder and decoder are the method's: checkpointed with the run, never part of the exported student.
    saved = load_file(str(res.run_dir / "model.safetensors"))
    assert not any(k.startswith(("encoder", "decoder")) for k in saved)


def test_encoder_and_decoder_are_checkpointed(tmp_path, digits_teacher, monkeypatch):
    # Interrupted at step 3, resumed: bit-identical to the uninterrupted run only if the encoder, the
    # decoder and their optimiser state were saved and restored with the student.
    raw = dict(teacher={"run": str(digits_teacher.run_dir)}, student={"arch": "mlp", "kwargs": {"hidden": [16]}},
               method={"name": "talking"}, train={"epochs": 1, "progress": False})
    whole = fit(tiny_cfg(tmp_path / "a", **raw))
    resumed = interrupt_then_resume(tiny_cfg(tmp_path / "b", **raw), monkeypatch, at_step=3)
    assert same_weights(whole, resumed)
