"""BERT, the text encoder of Grounding DINO, in torch alone: the WordPiece tokenizer (BERT's
normaliser and pre-tokenizer, then greedy longest-match pieces), the encoder, and a Hugging
Face folder read by its file and weight names (config.json, model.safetensors or
pytorch_model.bin, vocab.txt or tokenizer.json). `transformers` is only the tests' oracle:
nothing here imports it. The detector's text side, which reads class names as a Grounding
DINO caption, is model.BertTextEncoder.
"""

import json
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


# ----------------------------------------------------------------------------- tokenizer

# The CJK ideographs that BERT's normaliser spaces out, as the `tokenizers` library (behind
# transformers 5's BertTokenizer) lists them: it starts the sixth range at 0x2B920 where the
# older Python tokenizer started at 0x2B820.
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def clean_character(char: str) -> str:
    """Whitespace becomes a space; control characters (\\x00 included) and U+FFFD go; as in
    Hugging Face's BasicTokenizer._clean_text, where tab and newlines count as whitespace."""
    if char in " \t\n\r" or unicodedata.category(char) == "Zs":
        return " "
    if char == "\ufffd" or unicodedata.category(char).startswith("C"):
        return ""
    return char


def is_cjk(char: str) -> bool:
    """A CJK ideograph, by Hugging Face's BasicTokenizer._is_chinese_char (no kana, no hangul)."""
    return any(low <= ord(char) <= high for low, high in CJK_RANGES)


def is_punctuation(char: str) -> bool:
    """Every ASCII symbol ("$", "+", "^" are Unicode symbols, not punctuation) and Unicode's
    P* categories, as in Hugging Face's BERT tokenizers."""
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def split_punctuation(word: str) -> list[str]:
    """Each punctuation character becomes a word: "dog,bird!" -> ["dog", ",", "bird", "!"]."""
    pieces = []
    for char in word:
        if not pieces or is_punctuation(char) or is_punctuation(pieces[-1][-1]):
            pieces.append(char)
        else:
            pieces[-1] += char
    return pieces


def token_ids(tokens: list[str]) -> dict[str, int]:
    """token -> id, the token of id i being tokens[i]; a repeated token keeps its last id, as
    in Hugging Face's load_vocab."""
    return {token: index for index, token in enumerate(tokens)}


class WordPieceTokenizer:
    """BERT's tokenizer, as Hugging Face's BertTokenizer computes it: basic tokenisation
    (`words`: BERT's normaliser and pre-tokenizer), then greedy longest-match-first WordPiece
    with "##" continuations (`word_pieces`). For captions and class names: a literal "[SEP]" in
    the text is tokenised as text, not recognised as the special token. With `byte_fallback`
    (the generated vocabulary's, not BERT's) a character that no token covers is spelled by its
    UTF-8 bytes, tokens "<0x00>" to "<0xFF>" ("##<0x00>"... within a word), instead of turning
    its word into [UNK]."""
    special_tokens = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")

    def __init__(self, tokens: list[str], byte_fallback: bool = False, lowercase: bool = True,
                 strip_accents: bool | None = None, chinese_characters: bool = True,
                 max_word_chars: int = 100):
        """`tokens[i]` is the token of id i (see token_ids). The normaliser's settings are
        BertNormalizer's (the defaults are bert-base-uncased's): accents are stripped where
        `strip_accents` says, or, when it is None, where the text is lower-cased; CJK ideographs
        become words of their own where `chinese_characters`; a word longer than
        `max_word_chars` is one [UNK]."""
        self.ids = token_ids(tokens)
        self.longest = max(map(len, self.ids), default=0)      # no piece is longer
        self.byte_fallback = byte_fallback
        self.lowercase, self.chinese_characters = lowercase, chinese_characters
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.max_word_chars = max_word_chars
        if byte_fallback and any(f"{prefix}<0x{byte:02X}>" not in self.ids
                                 for prefix in ("", "##") for byte in range(256)):
            raise ValueError("a vocabulary with byte fallback needs the 512 byte tokens")
        missing = [token for token in self.special_tokens if token not in self.ids]
        if missing:
            raise ValueError(f"the vocabulary has no {missing[0]} token")
        self.cls_id, self.sep_id, self.pad_id, self.unk_id = map(self.ids.get, self.special_tokens)

    @classmethod
    def from_file(cls, path: str | Path, **settings) -> "WordPieceTokenizer":
        """Hugging Face's vocab.txt: the token of id i on line i."""
        return cls(read_vocab_txt(Path(path)), **settings)

    def words(self, text: str) -> list[str]:
        """Basic tokenisation: "Café  猫,dog" -> ["cafe", "猫", ",", "dog"] (uncased). As in
        Hugging Face's BasicTokenizer: clean, space out CJK characters, split at whitespace,
        lower-case, strip accents (NFD, then drop the combining marks, category Mn), split
        punctuation; each step where the settings ask for it."""
        text = "".join(map(clean_character, text))
        if self.chinese_characters:
            text = "".join(f" {char} " if is_cjk(char) else char for char in text)
        words = []
        for word in text.split():
            if self.lowercase:      # by character, as `tokenizers` does: "ΟΔΟΣ" -> "οδοσ"
                word = "".join(char.lower() for char in word)
            if self.strip_accents:
                word = "".join(c for c in unicodedata.normalize("NFD", word)
                               if unicodedata.category(c) != "Mn")
            words += split_punctuation(word)
        return words

    def word_pieces(self, word: str) -> list[int]:
        """One word -> its ids: "unaffable" -> [un, ##aff, ##able]; without byte fallback, one
        [UNK] when some part of it matches nothing or it is longer than `max_word_chars`."""
        if len(word) > self.max_word_chars and not self.byte_fallback:
            return [self.unk_id]
        pieces, start = [], 0
        while start < len(word):
            prefix = "##" if start else ""
            end = next((end for end in range(min(len(word), start + self.longest), start, -1)
                        if prefix + word[start:end] in self.ids), None)
            if end is None and not self.byte_fallback:
                return [self.unk_id]
            if end is None:
                pieces += [self.ids[f"{prefix}<0x{byte:02X}>"]
                           for byte in word[start].encode("utf-8")]
                start += 1
                continue
            pieces.append(self.ids[prefix + word[start:end]])
            start = end
        return pieces

    def pieces(self, text: str) -> list[int]:
        """The ids of a text's word pieces."""
        return [index for word in self.words(text) for index in self.word_pieces(word)]

    def encode(self, text: str) -> list[int]:
        """[CLS] word pieces [SEP]."""
        return [self.cls_id, *self.pieces(text), self.sep_id]


def read_vocab_txt(path: Path) -> list[str]:
    """vocab.txt: the token of id i on line i."""
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n")


def read_json_file(path: Path) -> dict:
    """A JSON file's content; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_tokenizer_json(path: Path) -> tuple[list[str], dict]:
    """tokenizer.json, as transformers 5 saves a BERT tokenizer -> its tokens by id and its
    normaliser's settings (WordPieceTokenizer's keywords). ValueError naming the file when it
    is not BERT's WordPiece, which is all that WordPieceTokenizer computes."""
    spec = read_json_file(path)
    model, normalizer = spec.get("model") or {}, spec.get("normalizer") or {}
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix") != "##":
        raise ValueError(f"{path} holds a {model.get('type')!r} tokenizer, not WordPiece with "
                         f"'##' continuations: this project reads BERT's vocabularies only")
    pre_tokenizer = (spec.get("pre_tokenizer") or {}).get("type")
    if (normalizer.get("type"), pre_tokenizer) != ("BertNormalizer", "BertPreTokenizer") \
            or not normalizer.get("clean_text", True):
        raise ValueError(f"{path}: its normalizer {normalizer.get('type')!r} and pre-tokenizer "
                         f"{pre_tokenizer!r} are not BERT's (BertNormalizer with clean_text, "
                         f"BertPreTokenizer), which are all that this project computes")
    vocab = model.get("vocab") or {}
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[token] for token in tokens] != list(range(len(tokens))):
        raise ValueError(f"{path}: the WordPiece ids are not 0 to {len(tokens) - 1}, each once")
    return tokens, dict(lowercase=normalizer.get("lowercase", True),
                        strip_accents=normalizer.get("strip_accents"),
                        chinese_characters=normalizer.get("handle_chinese_chars", True),
                        max_word_chars=model.get("max_input_chars_per_word", 100))


def tokenizer_casing(folder: Path) -> dict:
    """The normaliser's settings in a folder's tokenizer_config.json (BertTokenizer's
    do_lower_case, strip_accents, tokenize_chinese_chars) as WordPieceTokenizer's keywords;
    {} (bert-base-uncased's) without the file."""
    path = folder / "tokenizer_config.json"
    config = read_json_file(path) if path.is_file() else {}
    names = dict(do_lower_case="lowercase", strip_accents="strip_accents",
                 tokenize_chinese_chars="chinese_characters")
    return {ours: config[theirs] for theirs, ours in names.items() if theirs in config}


def read_tokenizer(folder: Path) -> WordPieceTokenizer:
    """A Hugging Face folder's WordPiece tokenizer, in either form: the hub's vocab.txt, or the
    tokenizer.json that transformers 5 saves instead (the vocabulary and the normaliser's
    settings); a tokenizer_config.json's casing applies to either, over tokenizer.json's, as
    in transformers. Where both vocabularies are there they must be the same.
    FileNotFoundError or ValueError naming the files otherwise."""
    vocab_txt, tokenizer_json = folder / "vocab.txt", folder / "tokenizer.json"
    if not vocab_txt.is_file() and not tokenizer_json.is_file():
        raise FileNotFoundError(f"{folder} has neither vocab.txt nor tokenizer.json: a Hugging "
                                f"Face folder (BERT or Grounding DINO) holds its WordPiece "
                                f"vocabulary in one of them")
    if not tokenizer_json.is_file():
        tokens, settings, source = read_vocab_txt(vocab_txt), tokenizer_casing(folder), vocab_txt
    else:
        (tokens, settings), source = read_tokenizer_json(tokenizer_json), tokenizer_json
        settings.update(tokenizer_casing(folder))      # transformers lets these override it
        listed = read_vocab_txt(vocab_txt) if vocab_txt.is_file() else tokens
        if token_ids(listed) != token_ids(tokens):
            raise ValueError(f"{vocab_txt} and {tokenizer_json} hold different vocabularies: "
                             f"keep the one that belongs to these weights")
    try:
        return WordPieceTokenizer(tokens, **settings)
    except ValueError as error:         # a special token missing
        raise ValueError(f"{source}: {error}") from error


def generated_vocabulary() -> list[str]:
    """The tiny preset's WordPiece vocabulary, made in code so that it needs no file: BERT's
    special tokens ([PAD] first), ASCII punctuation, digits, every lower-case letter and letter
    pair as a word start and as a "##" continuation, and the 256 bytes, both ways too, with
    which a character outside these is spelled (WordPieceTokenizer's byte_fallback). Any name
    composes: "purple pentagon" -> pu ##rp ##le pe ##nt ##ag ##on, "猫" -> its three bytes;
    1,973 tokens."""
    letters, digits = string.ascii_lowercase, string.digits
    pairs = [first + second for first in letters for second in letters]
    words = [*digits, *letters, *pairs]
    words += [f"<0x{byte:02X}>" for byte in range(256)]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *words,
            *(f"##{word}" for word in words)]


# ------------------------------------------------------------------------------- encoder

@dataclass
class BertConfig:
    """The sizes of a BERT; the defaults are bert-base-uncased's."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0       # its word embedding gets no gradient, as in Hugging Face's
    hidden_dropout: float = 0.1     # training only: on the embeddings and each sublayer's output
    attention_dropout: float = 0.1  # training only: on the attention weights

    # our field -> its key in Hugging Face's config.json
    json_keys = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                     num_layers="num_hidden_layers", num_heads="num_attention_heads",
                     intermediate_size="intermediate_size", max_positions="max_position_embeddings",
                     type_vocab_size="type_vocab_size", layer_norm_eps="layer_norm_eps",
                     pad_token_id="pad_token_id", hidden_dropout="hidden_dropout_prob",
                     attention_dropout="attention_probs_dropout_prob")

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Hugging Face's config.json (see from_dict)."""
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))

    @classmethod
    def from_dict(cls, settings: dict, source: str) -> "BertConfig":
        """Hugging Face's BERT settings; an absent key keeps its default, as in their
        BertConfig. ValueError naming `source` for a variant that `Bert` does not compute
        (another activation, relative positions), rather than silently computing something
        else."""
        for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if settings.get(key, supported) != supported:
                raise ValueError(f"{source}: {key} {settings[key]!r} is not supported, "
                                 f"only {supported!r}")
        return cls(**{field: settings[key] for field, key in cls.json_keys.items()
                      if key in settings})


class BertEmbeddings(nn.Module):
    """Word + token type + position embeddings, then LayerNorm and dropout, as in Hugging Face's
    BertEmbeddings. Every token is of type 0: one caption, as Grounding DINO passes it."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)    # Hugging Face's name
        self.dropout = config.hidden_dropout

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """input_ids (B, T), position_ids (B|1, T) -> (B, T, hidden)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = self.LayerNorm(x + self.position_embeddings(position_ids))
        return F.dropout(x, self.dropout, self.training)


class BertResidual(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): BERT's post-LN sublayer ending, as in Hugging
    Face's BertSelfOutput and BertOutput."""

    def __init__(self, in_dim: int, dim: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = dropout

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """x (B, T, in_dim), residual (B, T, dim) -> (B, T, dim)."""
        return self.LayerNorm(F.dropout(self.dense(x), self.dropout, self.training) + residual)


class BertLayer(nn.Module):
    """Self-attention, then a GELU FFN, each closed by a BertResidual, as in Hugging Face's
    BertLayer. Modules are nested under Hugging Face's names (attention.self.query, ...)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d, eps, dropout = config.hidden_size, config.layer_norm_eps, config.hidden_dropout
        self.num_heads, self.attention_dropout = config.num_heads, config.attention_dropout
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: nn.Linear(d, d) for name in ("query", "key", "value")}),
            "output": BertResidual(d, d, eps, dropout)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, config.intermediate_size)})
        self.output = BertResidual(config.intermediate_size, d, eps, dropout)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x (B, T, hidden), bias (B, 1, 1|T, T) added to the attention scores -> (B, T, hidden)."""
        query, key, value = (rearrange(self.attention["self"][name](x), "b t (h c) -> b h t c",
                                       h=self.num_heads) for name in ("query", "key", "value"))
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias,
            dropout_p=self.attention_dropout if self.training else 0.0)
        x = self.attention["output"](rearrange(attended, "b h t c -> b t (h c)"), x)
        return self.output(F.gelu(self.intermediate["dense"](x)), x)


def attention_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """attention_mask (B, T) per key or (B, T, T) per query and key, 1 = attend -> an additive
    bias (B, 1, 1|T, T): 0 or the dtype's minimum, as in Hugging Face's BertModel before 5.0
    (get_extended_attention_mask). Not -inf: in float32, a row with nothing to attend gets
    uniform weights rather than NaN."""
    if attention_mask.dim() not in (2, 3):
        raise ValueError(f"attention_mask must be (B, T) or (B, T, T), "
                         f"got {tuple(attention_mask.shape)}")
    keep = attention_mask[:, None, None] if attention_mask.dim() == 2 else attention_mask[:, None]
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


class Bert(nn.Module):
    """BERT's encoder: what Hugging Face's BertModel returns as last_hidden_state, dropout in
    training included, under its parameter names, so its weights load as they are."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(
            BertLayer(config) for _ in range(config.num_layers))})

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> token states (B, T, hidden).

        attention_mask: (B, T) padding, or (B, T, T) per query and key (Grounding DINO's
        sub-sentence mask); 1 = attend; None attends everywhere.
        position_ids: (B, T), by default 0..T-1 (Grounding DINO restarts them per phrase)."""
        length = input_ids.shape[1]
        if length > self.config.max_positions:
            raise ValueError(f"{length} tokens, more than BERT's "
                             f"{self.config.max_positions} positions")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]
        x = self.embeddings(input_ids, position_ids)
        bias = None if attention_mask is None else attention_bias(attention_mask, x.dtype)
        for layer in self.encoder["layer"]:
            x = layer(x, bias)
        return x


# ----------------------------------------------------------------- a Hugging Face folder

# Checkpoint names that are not part of Bert: the pooler and the pre-training heads (Grounding
# DINO uses only the token states) and the position_ids buffer that older transformers saved.
# Hugging Face's BertModel.from_pretrained leaves them out too, and warns.
BERT_UNUSED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def load_bert_weights(bert: Bert, state: dict[str, Tensor]) -> list[str]:
    """Load a Hugging Face BERT state dict into `bert`, strictly. Returns the checkpoint names
    that were left out by design (BERT_UNUSED_PREFIXES). ValueError naming the first missing
    or unexpected key otherwise.

    Checkpoints of BertModel load as they are; bert-base-uncased's is a BertForPreTraining,
    with the encoder under "bert." and TensorFlow's LayerNorm names gamma and beta, which are
    renamed here as Hugging Face's from_pretrained renames them."""
    weights, unused = {}, []
    for name, tensor in state.items():
        key = (name.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
               .replace("LayerNorm.beta", "LayerNorm.bias"))
        if key.startswith(BERT_UNUSED_PREFIXES):
            unused.append(name)
        else:
            weights[key] = tensor
    expected = bert.state_dict().keys()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    if missing or unexpected:
        details = [f"{len(keys)} {kind}, the first {keys[0]!r}"
                   for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ValueError("BERT weights do not match the model: " + "; ".join(details))
    bert.load_state_dict(weights, strict=True)
    return unused


def required_file(folder: Path, name: str) -> Path:
    """folder/name, or FileNotFoundError naming the path a Hugging Face folder must have."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a Hugging Face folder (BERT or Grounding "
                                f"DINO) holds config.json, model.safetensors (or "
                                f"pytorch_model.bin) and vocab.txt or tokenizer.json")
    return path


def read_hf_state(folder: Path) -> dict[str, Tensor]:
    """The weights of a Hugging Face folder: model.safetensors, else pytorch_model.bin."""
    pickle_path = folder / "pytorch_model.bin"
    if pickle_path.is_file() and not (folder / "model.safetensors").is_file():
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    path = required_file(folder, "model.safetensors")
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(f"reading {path} needs the safetensors package "
                          f"(pip install safetensors)") from error
    return load_file(path)


class LoadedBert(NamedTuple):
    tokenizer: WordPieceTokenizer
    bert: Bert
    unused_weights: list[str]   # checkpoint names left out by design (BERT_UNUSED_PREFIXES)


def load_bert(folder: str | Path) -> LoadedBert:
    """A local Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin,
    vocab.txt or tokenizer.json) -> its tokenizer, its encoder with the weights, and the names
    left out."""
    folder = Path(folder)
    config = BertConfig.from_json(required_file(folder, "config.json"))
    tokenizer = read_tokenizer(folder)
    bert = Bert(config)
    unused = load_bert_weights(bert, read_hf_state(folder))
    return LoadedBert(tokenizer, bert, unused)
