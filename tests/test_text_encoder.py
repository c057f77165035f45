"""The project's BERT text side (bert.py: WordPieceTokenizer, Bert, load_bert; model.py:
BertTextEncoder) against Hugging Face's transformers, the oracle: token ids equal, token
states within 1e-5 with every weight perturbed, the folder loader and its errors, and no
transformers import at run time."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # noqa: E402

from bert import (Bert, BertConfig, WordPieceTokenizer, load_bert, load_bert_weights,  # noqa: E402
                  read_tokenizer)
from model import BertTextEncoder  # noqa: E402

# ids 0, 100, 101, 102 for [PAD], [UNK], [CLS], [SEP], as in bert-base-uncased's vocab.txt
VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + ["cafe", "deja", "vu", "cat", "dog", "bird", "red", "blue", "circle", "star", "un",
            "##aff", "##able", "play", "##ing", "##s", "the", "a", "e", "c", "##a", "##f", "##e",
            ".", ",", "!", "?", "-", "'", "$", "猫", "犬", "と", "中", "文", "naive", "uber", "οδοσ"])

# accents, punctuation, CJK (と is kana: not spaced out), pieces, unknown words, mixed case,
# extra whitespace, a caption, ASCII symbols, the 100-character limit, control characters
CAPTIONS = ["Café Déjà vu", "cat. dog,bird!", "猫と犬", "unaffable playing plays",
            "zebra xylophone", "RED Circle", "  the\tcat \n\n dog  ",
            "red circle . blue star .", "naïve Über", "dog's $cat-bird?", "中文cat", "a" * 100,
            "a" * 101, "\x00cat\ufffd dog\u200b", ""]


def write_vocab(folder: Path) -> Path:
    path = folder / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved randomly: Hugging Face zero-initialises biases and sets LayerNorms
    to 1 and 0, which would hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module


def hf_bert(seed: int = 0, cls=None) -> torch.nn.Module:
    """A tiny perturbed Hugging Face BERT, in eval mode. LayerNorm's eps is 0.01, not 1e-12:
    an eps that does not reach the LayerNorms shows then."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=len(VOCAB),
                                     layer_norm_eps=0.01)
    torch.manual_seed(seed)
    return perturbed((cls or transformers.BertModel)(config), seed).eval()


def our_bert(reference) -> Bert:
    """Ours from a Hugging Face model's settings, with random weights, in eval mode."""
    return Bert(BertConfig.from_dict(reference.config.to_dict(), "the reference")).eval()


def test_bert_dropout_equals_hugging_faces_in_training(tmp_path):
    """In training, dropout on the embeddings, the attention weights and each sublayer's
    output, at the rates of Hugging Face's config, drawn as BertModel draws them: the same
    seed gives the same states, padded or not. Without dropout, training computes as
    evaluation does."""
    reference = hf_bert().train()
    bert = our_bert(reference).train()
    load_bert_weights(bert, reference.state_dict())
    assert (bert.config.hidden_dropout, bert.config.attention_dropout) == (0.1, 0.1)
    input_ids, attention_mask = padded_batch(WordPieceTokenizer.from_file(write_vocab(tmp_path)),
                                             ["red circle . blue star .", "cat"])
    with torch.no_grad():
        for mask in (None, attention_mask):
            torch.manual_seed(7)
            expected = reference(input_ids, attention_mask=mask).last_hidden_state
            torch.manual_seed(7)
            torch.testing.assert_close(bert(input_ids, mask), expected)
        assert not torch.allclose(bert(input_ids), bert.eval()(input_ids))
        settings = {**reference.config.to_dict(), "hidden_dropout_prob": 0.0,
                    "attention_probs_dropout_prob": 0.0}
        without = Bert(BertConfig.from_dict(settings, "the reference"))
        assert torch.equal(without(input_ids), without.eval()(input_ids))


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("caption", CAPTIONS)
def test_tokenizer_matches_hugging_face(tmp_path, caption):
    """Both of Hugging Face's BERT tokenizers: the `tokenizers`-backed BertTokenizer and the
    pure-Python BertTokenizerLegacy. BertTokenizer 5.x takes `vocab=`; it silently ignores
    `vocab_file=` and keeps a 5-token default vocabulary."""
    vocab = write_vocab(tmp_path)
    ours = WordPieceTokenizer.from_file(vocab).encode(caption)
    fast = transformers.BertTokenizer(vocab=str(vocab), do_lower_case=True)
    legacy = BertTokenizerLegacy(vocab_file=str(vocab), do_lower_case=True)
    assert ours == fast(caption)["input_ids"] == legacy(caption)["input_ids"]


def test_tokenizer_pieces_and_specials(tmp_path):
    """Worked by hand, so that the parity above cannot pass on a vocabulary that was ignored."""
    tokenizer = WordPieceTokenizer.from_file(write_vocab(tmp_path))
    ids = {token: index for index, token in enumerate(VOCAB)}
    specials = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.unk_id)
    assert specials == (101, 102, 0, 100)
    assert tokenizer.words("Café Déjà vu, 猫と犬") == ["cafe", "deja", "vu", ",", "猫", "と", "犬"]
    assert tokenizer.encode("unaffable zebra") == [101, ids["un"], ids["##aff"], ids["##able"],
                                                   100, 102]
    assert tokenizer.encode("red circle .") == [101, ids["red"], ids["circle"], ids["."], 102]
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        WordPieceTokenizer(["[PAD]", "[UNK]", "[SEP]"])


# ----------------------------------------------------------------------------- encoder

def test_parameter_names_are_hugging_face_s():
    reference = hf_bert()
    names = {name for name in reference.state_dict() if not name.startswith("pooler.")}
    assert set(our_bert(reference).state_dict()) == names


def padded_batch(tokenizer: WordPieceTokenizer, texts: list[str]):
    """Texts -> input_ids (B, T) padded with [PAD] and attention_mask (B, T), 1 = a token."""
    encoded = [tokenizer.encode(text) for text in texts]
    length = max(map(len, encoded))
    input_ids = torch.tensor([ids + [tokenizer.pad_id] * (length - len(ids)) for ids in encoded])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in encoded])
    return input_ids, attention_mask


def test_bert_matches_hugging_face_on_a_padded_batch(tmp_path):
    reference = hf_bert()
    bert = our_bert(reference)
    assert load_bert_weights(bert, reference.state_dict()) == ["pooler.dense.weight",
                                                               "pooler.dense.bias"]
    input_ids, attention_mask = padded_batch(WordPieceTokenizer.from_file(write_vocab(tmp_path)),
                                             ["red circle . blue star .", "cat"])
    assert attention_mask[1].sum() < attention_mask.shape[1]        # the second one is padded
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        ours = bert(input_ids, attention_mask)
    # padded positions too: they attend to the caption's tokens, as in Hugging Face's
    assert (ours - expected).abs().max() < 1e-5


def test_bert_matches_hugging_face_with_positions_and_a_per_token_mask():
    """Grounding DINO's text side: phrase-local position ids and a (B, T, T) sub-sentence
    mask. BertModel 5.x rejects a 3-D mask; it takes a 4-D (B, 1, T, T) boolean mask as it
    is (True = attend), which is what Hugging Face's GroundingDinoModel passes it."""
    reference = hf_bert(seed=1)
    bert = our_bert(reference)
    load_bert_weights(bert, reference.state_dict())
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(len(VOCAB), (2, 7), generator=generator)
    phrases = torch.tensor([[0, 1, 1, 2, 2, 2, 3], [0, 1, 1, 1, 2, 3, 3]])   # phrase of each token
    # (B, T, T), 1 = query attends to key: within its phrase, and (to make the mask asymmetric,
    # so that a transposed mask shows) only to keys up to itself
    mask = (phrases[:, :, None] == phrases[:, None, :]).long().tril()
    position_ids = torch.tensor([[0, 0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 0, 0, 1]])
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask[:, None].bool(),
                             position_ids=position_ids).last_hidden_state
        ours = bert(input_ids, mask, position_ids)
        unmasked = bert(input_ids, None, position_ids)
    assert (ours - expected).abs().max() < 1e-5
    assert (unmasked - expected).abs().max() > 1e-2                   # the mask matters here


def test_a_pre_training_checkpoint_with_tensorflow_names_loads():
    """bert-base-uncased is saved as BertForPreTraining ("bert." prefix, cls heads) with
    LayerNorm gamma/beta: the encoder loads, the heads are named as left out."""
    reference = hf_bert(seed=3, cls=transformers.BertForPreTraining)
    state = {name.replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): tensor
             for name, tensor in reference.state_dict().items()}
    bert = our_bert(reference)
    unused = load_bert_weights(bert, state)
    assert unused and all(name.startswith(("bert.pooler.", "cls.")) for name in unused)
    input_ids = torch.tensor([[101, 120, 121, 102]])
    with torch.no_grad():
        expected = reference.bert(input_ids).last_hidden_state
        assert (bert(input_ids) - expected).abs().max() < 1e-5


def test_a_renamed_weight_is_named():
    reference = hf_bert()
    state = reference.state_dict()
    state["encoder.layer.1.output.dense.weights"] = state.pop("encoder.layer.1.output.dense.weight")
    with pytest.raises(ValueError) as error:
        load_bert_weights(our_bert(reference), state)
    assert "'encoder.layer.1.output.dense.weight'" in str(error.value)
    assert "'encoder.layer.1.output.dense.weights'" in str(error.value)


# ----------------------------------------------------------------------------- loader

@pytest.fixture()
def bert_folder(tmp_path):
    """A tiny random Hugging Face BERT saved as a folder: config.json, model.safetensors and
    vocab.txt; returns (folder, the Hugging Face model)."""
    reference = hf_bert(seed=4)
    folder = tmp_path / "tiny-bert"
    reference.save_pretrained(folder)
    write_vocab(folder)
    return folder, reference


def test_load_bert_folder(bert_folder):
    folder, reference = bert_folder
    tokenizer, bert, unused = load_bert(folder)
    assert sorted(unused) == ["pooler.dense.bias", "pooler.dense.weight"]
    bert.eval()                                         # as the reference: no dropout
    input_ids, attention_mask = padded_batch(tokenizer, ["Red circle . blue star .", "猫と犬"])
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        assert (bert(input_ids, attention_mask) - expected).abs().max() < 1e-5


def test_load_bert_folder_with_pytorch_weights(bert_folder):
    folder, reference = bert_folder
    (folder / "model.safetensors").unlink()
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    bert = load_bert(folder).bert.eval()
    input_ids = torch.tensor([[101, 110, 111, 102]])
    with torch.no_grad():
        expected = reference(input_ids).last_hidden_state
        assert (bert(input_ids) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_missing_file_is_named(bert_folder, name):
    folder, _ = bert_folder
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / name))):
        load_bert(folder)


def test_a_folder_without_a_vocabulary_is_named_with_both_files(bert_folder):
    folder, _ = bert_folder
    (folder / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder} has neither vocab.txt nor "
                                                          f"tokenizer.json")):
        load_bert(folder)


# ------------------------------------------------------- folders saved by transformers 5

# BertTokenizer's normaliser settings: bert-base-uncased's, cased, lower-cased with accents
# kept, and CJK ideographs left inside words.
CASINGS = [dict(do_lower_case=True), dict(do_lower_case=False),
           dict(do_lower_case=True, strip_accents=False),
           dict(do_lower_case=True, tokenize_chinese_chars=False)]


def save_tokenizer(folder: Path, vocab: Path, **casing) -> None:
    """What transformers 5 saves for a BERT tokenizer: tokenizer.json and
    tokenizer_config.json, no vocab.txt."""
    transformers.BertTokenizer(vocab=str(vocab), **casing).save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").exists()


@pytest.mark.parametrize("casing", CASINGS, ids=lambda casing: str(casing))
def test_a_saved_tokenizer_json_tokenizes_as_hugging_face(tmp_path, casing):
    """tokenizer.json alone: its vocabulary and its normaliser's settings, the ids of the
    tokenizer that transformers loads from the same folder, caption by caption."""
    folder = tmp_path / "saved"
    save_tokenizer(folder, write_vocab(tmp_path), **casing)
    ours = read_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for caption in CAPTIONS + ["Café CAT 猫と犬中文cat", "ΟΔΟΣ", "a\U0002B820b\U0002B920c"]:
        assert ours.encode(caption) == theirs(caption)["input_ids"], caption


@pytest.mark.parametrize("casing", CASINGS[1:3], ids=lambda casing: str(casing))
def test_vocab_txt_takes_the_casing_of_tokenizer_config_json(tmp_path, casing):
    """The hub's form, vocab.txt with a tokenizer_config.json that is not uncased."""
    folder = tmp_path / "hub"
    save_tokenizer(folder, write_vocab(tmp_path), **casing)
    (folder / "tokenizer.json").unlink()
    vocab = write_vocab(folder)
    legacy = BertTokenizerLegacy(vocab_file=str(vocab), **casing)
    for caption in CAPTIONS:
        assert read_tokenizer(folder).encode(caption) == legacy(caption)["input_ids"], caption


def test_tokenizer_config_json_overrides_the_casing_of_tokenizer_json(tmp_path):
    """transformers rebuilds the normaliser from tokenizer_config.json's settings where they
    differ from tokenizer.json's; so does read_tokenizer."""
    folder = tmp_path / "saved"
    save_tokenizer(folder, write_vocab(tmp_path))                         # uncased
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for caption in ["RED Circle", "Café Déjà vu", "ΟΔΟΣ cat"]:
        assert read_tokenizer(folder).encode(caption) == theirs(caption)["input_ids"], caption
    assert read_tokenizer(folder).encode("RED") != read_tokenizer(tmp_path).encode("RED")


def test_a_bert_folder_saved_by_transformers_loads(tmp_path):
    """model.save_pretrained and tokenizer.save_pretrained, nothing added by hand."""
    reference = hf_bert(seed=5)
    folder = tmp_path / "saved"
    reference.save_pretrained(folder)
    save_tokenizer(folder, write_vocab(tmp_path))
    tokenizer, bert, _ = load_bert(folder)
    input_ids, attention_mask = padded_batch(tokenizer, ["Red circle . blue star .", "猫と犬"])
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).last_hidden_state
        assert (bert.eval()(input_ids, attention_mask) - expected).abs().max() < 1e-5


def test_a_vocabulary_that_cannot_be_read_as_berts_is_refused_naming_the_files(tmp_path):
    save_tokenizer(tmp_path / "saved", write_vocab(tmp_path))
    tmp_path = tmp_path / "saved"
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    write_vocab(tmp_path)
    read_tokenizer(tmp_path)                    # the same vocabulary twice: taken
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:-1] + ["zebra"]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'vocab.txt'} and "
                                                   f"{tmp_path / 'tokenizer.json'} hold "
                                                   f"different vocabularies")):
        read_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").unlink()
    for part, change, message in [
            ("model", dict(type="BPE"), "holds a 'BPE' tokenizer, not WordPiece"),
            ("normalizer", dict(type="NFC"), "its normalizer 'NFC'"),
            ("normalizer", dict(clean_text=False), "BertNormalizer with clean_text")]:
        changed = {**spec, part: {**spec[part], **change}}
        (tmp_path / "tokenizer.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer.json'}") + ".*"
                                             + re.escape(message)):
            read_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer.json'} is not valid")):
        read_tokenizer(tmp_path)
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if token != "[CLS]"}
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "model": {**spec["model"],
                                                                          "vocab": vocab}}))
    with pytest.raises(ValueError, match="ids are not 0 to"):
        read_tokenizer(tmp_path)


def test_an_unsupported_activation_is_refused(bert_folder):
    folder, _ = bert_folder
    config = (folder / "config.json").read_text().replace('"gelu"', '"relu"')
    (folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match="hidden_act"):
        load_bert(folder)


def test_the_detector_builds_without_transformers(bert_folder):
    """model.py with a BERT text encoder, in a fresh interpreter: transformers never imported,
    and class names come out as (K, d)."""
    folder, _ = bert_folder
    program = ("import sys, torch, model\n"
               f"detector = model.build_model('tiny', text_encoder={str(folder)!r})\n"
               "assert isinstance(detector.text_encoder, model.BertTextEncoder)\n"
               "prompts = detector.text_encoder(['red circle', 'blue star', 'zebra'])\n"
               "assert prompts.shape == (3, detector.config.hidden_dim), prompts.shape\n"
               "loaded = sorted(name for name in sys.modules if 'transformers' in name)\n"
               "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", program], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_text_encoder_reads_names_as_one_grounding_dino_caption(bert_folder):
    """BertTextEncoder: "[CLS] red circle . cat . [SEP]" through BERT with GD's sub-sentence
    mask and phrase positions (the reference BertModel given the same), every token projected
    by `out`; a class is the mean of its name's tokens."""
    from model import caption_phrases

    folder, reference = bert_folder
    encoder = BertTextEncoder.from_folder(folder, dim=8).eval()      # as the reference
    ids = encoder.tokenizer.ids
    names = ["red circle", "cat"]
    caption_ids, spans = encoder.caption_ids(names)
    assert caption_ids == [ids[t] for t in ("[CLS]", "red", "circle", ".", "cat", ".", "[SEP]")]
    assert spans == [(1, 3), (4, 5)]
    input_ids = torch.tensor([caption_ids])
    phrases = caption_phrases(input_ids, torch.zeros_like(input_ids, dtype=torch.bool),
                              encoder.delimiters, 8)
    assert phrases.position_ids.tolist() == [[0, 0, 1, 2, 0, 1, 0]]
    with torch.no_grad():
        states = reference(input_ids, attention_mask=phrases.attention[:, None],
                           position_ids=phrases.position_ids).last_hidden_state
        tokens = encoder.out(states)
        caption = encoder.caption(names)
        assert (caption.tokens - tokens).abs().max() < 1e-5
        means = torch.stack([tokens[0, 1:3].mean(0), tokens[0, 4]])
        assert (encoder(names) - means).abs().max() < 1e-5
    assert caption.class_tokens.tolist() == [[[1, 2], [4, 5]]]      # 5: a padding slot
    assert caption.class_token_padding.tolist() == [[[False, False], [False, True]]]
