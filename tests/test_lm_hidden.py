"""LayerMap: TinyBERT's uniform mapping, MSE / cosine values by hand, padding, errors, and a
real Hugging Face causal decoder pair."""
import pytest
import torch

from distillery.lm.hidden import LayerMap, hidden_cosine, hidden_mse, uniform_mapping

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_uniform_mapping_is_tinybert_g():
    # TinyBERT (4 layers from BERT-base's 12): g(m) = 3m
    assert uniform_mapping(12, 4) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert uniform_mapping(6, 3) == [(1, 2), (2, 4), (3, 6)]
    assert uniform_mapping(6, 2) == [(1, 3), (2, 6)]
    assert uniform_mapping(6, 4) == [(1, 1), (2, 3), (3, 4), (4, 6)]  # floor(1.5), 3, floor(4.5), 6
    assert LayerMap(12, 4, 8, 8).pairs == [(1, 3), (2, 6), (3, 9), (4, 12)]


def hidden(n_layers, batch, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=g, dtype=torch.float64) for _ in range(n_layers + 1))


def test_mse_by_hand_same_width_explicit_mapping():
    hs, ht = hidden(2, 1, 2, 2, 0), hidden(4, 1, 2, 2, 1)
    hs = list(hs)
    ht = list(ht)
    hs[1] = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    ht[2] = torch.tensor([[[1.0, 0.0], [3.0, 6.0]]], dtype=torch.float64)
    hs[2] = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    ht[4] = torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    lm = LayerMap(4, 2, 2, 2, mapping=[(1, 2), (2, 4)], loss="mse")
    assert lm.projections is None
    # pair 1: squared errors (0 + 4) + (0 + 4) = 8 over 2 tokens x 2 features -> 2; pair 2: 1; mean 1.5
    assert lm(hs, ht).item() == pytest.approx(1.5)
    # mask out the second token: pair 1 -> 4 / 2 = 2, pair 2 -> 2 / 2 = 1
    assert lm(hs, ht, mask=torch.tensor([[1, 0]])).item() == pytest.approx(1.5)
    assert lm(hs, ht, mask=torch.tensor([[0, 1]])).item() == pytest.approx((4 / 2 + 2 / 2) / 2)


def test_cosine_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]]])
    t = torch.tensor([[[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]])
    # 1 - cos: orthogonal 1, opposite 2, parallel 0
    assert hidden_cosine(s, t).item() == pytest.approx(1.0)
    assert hidden_cosine(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx(1.5)
    lm = LayerMap(1, 1, 2, 2, loss="cosine")
    assert lm((s, s), (t, t), torch.tensor([[0, 1, 1]])).item() == pytest.approx(1.0)


def test_projection_when_widths_differ():
    lm = LayerMap(2, 1, teacher_width=3, student_width=2, mapping=[(1, 2)], loss="mse")
    assert len(lm.projections) == 1 and lm.projections[0].weight.shape == (3, 2)
    with torch.no_grad():
        lm.projections[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        lm.projections[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    hs = (torch.zeros(1, 1, 2), torch.tensor([[[1.0, 2.0]]]))
    ht = (torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.tensor([[[1.0, 2.0, 0.0]]]))
    # W h + b = (1, 2, 4); error (0, 0, 4) -> 16 / 3
    assert lm(hs, ht).item() == pytest.approx(16 / 3)
    assert hidden_mse(lm.projections[0](hs[1]), ht[2]).item() == pytest.approx(16 / 3)


def test_padding_values_do_not_matter():
    hs, ht = hidden(3, 2, 5, 4, 2), hidden(6, 2, 5, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for loss in ("mse", "cosine"):
        lm = LayerMap(6, 3, 4, 4, loss=loss)
        base = lm(hs, ht, mask)
        noisy_s = tuple(h.masked_fill(~mask.bool()[..., None], 7.0) for h in hs)
        noisy_t = tuple(h.masked_fill(~mask.bool()[..., None], -3.0) for h in ht)
        assert lm(noisy_s, noisy_t, mask).item() == pytest.approx(base.item(), rel=1e-12)
        assert lm(noisy_s, noisy_t).item() != pytest.approx(base.item(), rel=1e-3)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"out of range.*student layers are 0..2 and teacher layers 0..6"):
        LayerMap(6, 2, 8, 8, mapping=[(1, 3), (3, 6)])
    with pytest.raises(ValueError, match="out of range"):
        LayerMap(6, 2, 8, 8, mapping=[(1, 7)])
    with pytest.raises(ValueError, match="mapping must be 'uniform'"):
        LayerMap(6, 2, 8, 8, mapping="skip")
    with pytest.raises(ValueError, match="loss must be"):
        LayerMap(6, 2, 8, 8, loss="l1")
    lm = LayerMap(6, 2, 8, 8)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        lm(hidden(2, 1, 3, 8, 0), hidden(4, 1, 3, 8, 1))


def test_causal_decoder_pair_learns_through_projections():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    teacher = transformers.GPT2Model(transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).eval()
    student = transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16))
    lm = LayerMap(4, 2, teacher_width=32, student_width=16, loss="mse")
    assert lm.pairs == [(1, 2), (2, 4)]
    ids = torch.randint(0, 64, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.inference_mode():
        t_states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    t_states = tuple(h.clone() for h in t_states)
    opt = torch.optim.Adam([*student.parameters(), *lm.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        loss = lm(out.hidden_states, t_states, mask)
        opt.zero_grad()
        loss.backward()
        assert lm.projections[0].weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
