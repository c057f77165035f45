"""The DINO-R1 detector: Grounding DINO with a visual prompt encoder (METHOD.md section 2),
its Hungarian matcher and the SFT losses (METHOD.md section 3).

Read top to bottom:

    DetectorConfig / PRESETS / build_model      settings: the `tiny`, `swin_t` and `r50` scales
    Backbone, sine_encoding                     multi-scale image features, L levels of width d
    MultiScaleDeformableAttention               the hot spot, through deform_attn.ms_deform_attn
    WordPieceTokenizer, Bert, BertTextEncoder   class names as a GD caption (2.3)
    VisualPromptEncoder, contrastive_logits     one embedding per exemplar box (2.2), L_contra (2.4)
    PromptTokens, caption_phrases, class_logits the prompts as one token sequence (2.3)
    BiAttention, EnhancerLayer                  image <-> prompt fusion (METHOD 2.6)
    DecoderLayer, Decoder                       cross-modality decoder, box refinement (2.8)
    build_denoising_queries                     contrastive denoising queries (2.10)
    DINOR1                                      encode, query selection (2.7), heads (2.9)
    HungarianMatcher, SetCriterion              METHOD (1) and the SFT losses
    postprocess, model_from_checkpoint          top-k (query, prompt) pairs to boxes; loading
    rename_grounding_dino, load_grounding_dino  Hugging Face Grounding DINO weights

Conventions used everywhere in this file:
- boxes are normalised (cx, cy, w, h) in [0, 1], relative to the *unpadded* image;
- masks are True where something is padding (image pixels, tokens or prompts);
- prompts are T tokens (B, T, d) for K classes: a visual prompt is one token, a class name
  in a Grounding DINO caption a phrase of tokens; class logits are (B, Q, K), read from the
  per-token logits (B, Q, T) by class_logits.
"""

import json
import math
import re
import string
import unicodedata
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import (FrozenBatchNorm2d, box_convert, generalized_box_iou,
                             sigmoid_focal_loss, stochastic_depth)

from deform_attn import ms_deform_attn

if TYPE_CHECKING:       # only for annotations: the detector does not depend on data.py
    from data import Target, VisualInstructions


# ----------------------------------------------------------------------------- settings

@dataclass
class DetectorConfig:
    """Every size of the detector. `PRESETS` holds the named scales."""
    backbone: str = "tiny"              # "tiny" | "swin" | "r50"
    pretrained_backbone: bool = False   # torchvision ImageNet weights (never by default)
    swin_embed_dim: int = 96            # Swin's sizes (backbone "swin"): Swin-T's by default
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window: int = 7
    hidden_dim: int = 64                # d
    num_heads: int = 4
    num_levels: int = 4                 # strides 8, 16, 32, 64 (3: 8-32; 5: 8-128)
    num_points: int = 4                 # sampling points per head and level
    num_encoder_layers: int = 2
    num_decoder_layers: int = 3
    ffn_dim: int = 256                  # the encoder's and the visual prompt encoder's
    decoder_heads: int | None = None    # the decoder's, where a Grounding DINO config sets
    decoder_points: int | None = None   # them apart from the encoder's (None: the same;
    decoder_ffn_dim: int | None = None  # see decoder_sizes)
    num_queries: int = 100              # N_q, the selected tokens
    num_dn_queries: int = 40            # contrastive denoising queries (METHOD 2.10)
    dn_label_noise: float = 0.25        # probability of a wrong prompt on a DN query
    dn_box_noise: float = 1.0           # lambda of DINO's box noise
    text_encoder: str = "generated"     # "generated" (a small BERT, vocabulary made in code)
                                        # or a local BERT folder (see load_bert)
    text_layers: int = 2
    image_size: int = 128               # short side at evaluation
    max_size: int = 171                 # long side cap
    kernel: str = "auto"                # deformable attention backend: auto | torch | triton
    position_temperature: float = 10000.0   # of the image tokens' sine positions (GD: 20)
    class_head: str = "scaled"          # "dot" (GD) | "scaled" (the release's; see ContrastiveHead)
    pad_multiple: int = 32              # batches padded to a multiple of this (data.collate):
                                        # 32 aligns every level with the masks; GD pads to 1
    select_invalid_tokens: bool = False  # GD: True (see DINOR1.select_queries)
    fusion_drop_path: float = 0.0       # training only: drop path on the enhancer's image <->
                                        # prompt fusion, per sample (GD: 0.1)

    @classmethod
    def from_saved(cls, saved: dict, **overrides) -> "DetectorConfig":
        """A checkpoint's config. A training-only setting added after it was written takes the
        value of the preset it came from (the tiny backbone: tiny's; any other: swin_t's),
        not the field's default."""
        preset = PRESETS["tiny" if saved.get("backbone", "tiny") == "tiny" else "swin_t"]
        added = {name: getattr(preset, name) for name in ("fusion_drop_path",) if name not in saved}
        return cls(**{**saved, **added, **overrides})

    def decoder_sizes(self) -> tuple[int, int, int]:
        """The decoder's heads, sampling points and FFN width: its own where set, else the
        encoder's (num_heads, num_points, ffn_dim)."""
        return (self.decoder_heads or self.num_heads, self.decoder_points or self.num_points,
                self.decoder_ffn_dim or self.ffn_dim)

    def __post_init__(self):
        self.swin_depths, self.swin_heads = tuple(self.swin_depths), tuple(self.swin_heads)
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {self.num_levels}")


PRESETS = {
    # Trains on the embedded shapes data on a 2-core CPU in minutes.
    "tiny": DetectorConfig(),
    # The paper's model (METHOD.md section 2, "Paper-scale settings").
    "swin_t": DetectorConfig(backbone="swin", hidden_dim=256, num_heads=8,
                             num_encoder_layers=6, num_decoder_layers=6, ffn_dim=2048,
                             num_queries=900, num_dn_queries=100, image_size=800,
                             max_size=1333, position_temperature=20.0, class_head="dot",
                             select_invalid_tokens=True, fusion_drop_path=0.1),
}
PRESETS["r50"] = replace(PRESETS["swin_t"], backbone="r50")     # the same with a ResNet-50


def build_model(preset: str = "tiny", **overrides) -> "DINOR1":
    """The detector at a named scale; keyword overrides replace DetectorConfig fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return DINOR1(replace(PRESETS[preset], **overrides))


# ----------------------------------------------------------------------------- outputs

@dataclass
class ImageFeatures:
    """Multi-scale image tokens, flattened level after level (S = sum of H_l * W_l)."""
    tokens: Tensor             # (B, S, d)
    pos: Tensor                # (B, S, d) sine position + level embedding
    padding_mask: Tensor       # (B, S) True = padding
    spatial_shapes: Tensor     # (L, 2) long, (H_l, W_l)
    level_start_index: Tensor  # (L,) long
    valid_ratios: Tensor       # (B, L, 2) (w, h) fraction of each level that is not padding


@dataclass
class Selection:
    """Prompt-guided query selection (METHOD 2.7); queries in rank order (see select_queries)."""
    indices: Tensor             # (B, Q) long, token index into the S encoder tokens
    objectness_logits: Tensor   # (B, Q) s_i; O_i = sigmoid(s_i)


class Phrases(NamedTuple):
    """How the T prompt tokens of each image group into phrases (Grounding DINO's sub-sentence
    structure): in the enhancer a token attends only to the tokens of its own phrase (visual
    prompts: one phrase of them all, see visual_phrases)."""
    padding: Tensor        # (B, T) True = padding token
    attention: Tensor      # (B, T, T) True = token i may attend to token j
    position_ids: Tensor   # (B, T) long, each token's position within its phrase
    pos: Tensor            # (B, T, d) their sines


def visual_phrases(prompt_mask: Tensor, dim: int) -> Phrases:
    """Visual prompts (or any ready-made class vectors) as one set: one token each, all at
    position 0 (a set has no order), each attending in the enhancer to every real prompt and
    to itself. Seeing the other classes is what tells similar ones apart: a tiny model trained
    so lost 12 AP on dev when its generic prompts came one class at a time, one whose prompts
    stayed each in a phrase of its own lost 2 (docs/EXPERIMENTS.md).
    prompt_mask (B, K) True = padding."""
    batch, num_prompts = prompt_mask.shape
    itself = torch.eye(num_prompts, dtype=torch.bool, device=prompt_mask.device)
    attention = itself | ~prompt_mask[:, None, :]                            # (B, K, K)
    at_zero = torch.zeros(batch, num_prompts, dtype=torch.long, device=prompt_mask.device)
    return Phrases(padding=prompt_mask, attention=attention, position_ids=at_zero,
                   pos=sine_encoding(at_zero[..., None].float(), dim))


def caption_phrases(input_ids: Tensor, padding: Tensor, delimiters: Tensor, dim: int) -> Phrases:
    """Grounding DINO's sub-sentence structure of tokenised captions. input_ids (B, T), padding
    (B, T) True = padding, delimiters: the ids that end a phrase ([CLS], [SEP], "." and "?").

    A phrase runs from the token after one delimiter to the next delimiter, which it includes:
    "[CLS] red car . cat . [SEP]" has the phrases "red car ." and "cat .". Its tokens attend to
    each other and count positions from 0. As in GD, a token stands alone at position 0 when
    its phrase would end at [CLS], at the sequence's last token or nowhere (padding)."""
    batch, length = input_ids.shape
    index = torch.arange(length, device=input_ids.device).expand(batch, -1)
    is_delimiter = torch.isin(input_ids, delimiters)
    # The delimiter that ends each token's phrase (the first at or after it; T: none), and the
    # one before it (-1: none).
    ends = torch.where(is_delimiter, index, length).flip(1).cummin(1).values.flip(1)
    before = F.pad(torch.where(is_delimiter, index, -1).cummax(1).values[:, :-1], (1, 0),
                   value=-1)
    in_phrase = (ends > 0) & (ends < length - 1)
    alone = torch.eye(length, dtype=torch.bool, device=input_ids.device)
    attention = ((ends[:, :, None] == ends[:, None, :]) & in_phrase[:, None, :]) | alone
    positions = torch.where(in_phrase, index - before - 1, 0)
    return Phrases(padding=padding, attention=attention, position_ids=positions,
                   pos=sine_encoding(positions[..., None].float(), dim))


class PromptTokens(NamedTuple):
    """The K prompts every image reads, as one sequence of T tokens (METHOD 2.3): a visual
    prompt (or any ready-made class vector) is one token; a Grounding DINO caption gives each
    class a phrase of tokens. A class's score is read from its tokens (class_logits)."""
    tokens: Tensor                    # (B, T, d), before the enhancer
    phrases: Phrases                  # over the T tokens; phrases.padding (B, T) True = padding
    classes: Tensor                   # (B, K, d) one embedding per class: its tokens' mean
    class_mask: Tensor                # (B, K) True = padding class
    class_tokens: Tensor | None       # (B, K, L) long, the tokens of each class; None: token k
                                      # is class k (T = K)
    class_token_padding: Tensor | None  # (B, K, L) True = no token in that slot


def one_token_per_class(prompts: Tensor, prompt_mask: Tensor) -> PromptTokens:
    """Prompts (B, K, d) with prompt_mask (B, K) True = padding, one token each, as one set
    (visual_phrases)."""
    return PromptTokens(prompts, visual_phrases(prompt_mask, prompts.shape[-1]), prompts,
                        prompt_mask, None, None)


def expand_prompts(prompts: PromptTokens, batch: int) -> PromptTokens:
    """Prompts of a batch of one, shown to every image of a batch of `batch` (no copy)."""
    def expand(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.expand(batch, *x.shape[1:])
    return PromptTokens(expand(prompts.tokens), Phrases(*map(expand, prompts.phrases)),
                        *map(expand, prompts[2:]))


def outside_tokens(prompts: PromptTokens) -> Tensor | None:
    """(B, T) True = a token of no class: a caption's [CLS], [SEP] and "." (padding excluded);
    None when every token is a class's (visual prompts). Training reads them as negatives for
    every query, as Grounding DINO's per-token loss does, since class scores never do."""
    if prompts.class_tokens is None:
        return None
    inside = torch.zeros(prompts.phrases.padding.shape, dtype=torch.long,
                         device=prompts.class_tokens.device)
    inside.scatter_add_(1, prompts.class_tokens.flatten(1),      # padding slots add 0
                        (~prompts.class_token_padding).flatten(1).long())
    return (inside == 0) & ~prompts.phrases.padding


def class_logits(token_logits: Tensor, prompts: PromptTokens) -> Tensor:
    """Per-token logits (..., B, Q, T) -> per-class logits (..., B, Q, K): the logit of the mean
    of the sigmoids over each class's tokens (Grounding DINO's COCO rule; a one-token class
    keeps its token's logit), computed in log space. Padding classes get -1e4."""
    if prompts.class_tokens is None:
        return token_logits
    num_classes, width = prompts.class_tokens.shape[1:]
    index = prompts.class_tokens.flatten(1)[:, None, :]                      # (B, 1, K * L)
    gathered = token_logits.gather(-1, index.expand(*token_logits.shape[:-1], -1))
    gathered = gathered.unflatten(-1, (num_classes, width))                 # (..., B, Q, K, L)
    padding = prompts.class_token_padding[:, None]                          # (B, 1, K, L)
    positive = F.logsigmoid(gathered).masked_fill(padding, -math.inf).logsumexp(-1)
    negative = F.logsigmoid(-gathered).masked_fill(padding, -math.inf).logsumexp(-1)
    return torch.where(prompts.class_mask[:, None], -1e4, positive - negative)


@dataclass
class Encoded:
    """The encoder side of one forward pass: everything before the decoder."""
    features: ImageFeatures
    prompts: PromptTokens      # as given or sampled, before the enhancer (T tokens, K classes)
    exemplars: Tensor | None   # (N, d) every exemplar's embedding (with instructions only)
    memory: Tensor             # (B, S, d) enhanced image tokens
    enhanced: Tensor           # (B, T, d) enhanced prompt tokens
    anchors: Tensor            # (B, S, 4) each token's anchor box, inverse sigmoid (+inf:
                               # not a valid proposal, see token_anchors)
    proposal_features: Tensor  # (B, S, d) the memory after the encoder output layer, read
                               # by the encoder's class and box heads
    token_logits: Tensor       # (B, S, T) every image token against every prompt token
    objectness_logits: Tensor  # (B, S) s_n = the max of token_logits (METHOD 2.7)


@dataclass
class DetectorOutput:
    """Everything a loss or a post-processor needs. K = number of prompts."""
    logits: Tensor                  # (layers, B, Q, K) class logits per decoder layer
    boxes: Tensor                   # (layers, B, Q, 4) cxcywh per decoder layer
    encoder_logits: Tensor          # (B, Q, K) on the selected encoder tokens
    encoder_boxes: Tensor           # (B, Q, 4) their proposal boxes
    selection: Selection
    prompt_mask: Tensor             # (B, K) True = padding prompt
    dn_logits: Tensor | None = None       # (layers, B, N_dn, K)
    dn_boxes: Tensor | None = None        # (layers, B, N_dn, 4)
    dn_targets: "DenoisingTargets | None" = None
    contrastive_logits: Tensor | None = None  # (K, K) visual class means x text (METHOD 2.4)
    outside_logits: Tensor | None = None  # (layers + 1, B, Q, U) in training with a caption:
                                          # the queries' logits (decoder layers, then the
                                          # encoder's) at its U tokens of no class
    outside_mask: Tensor | None = None    # (B, U) True = such a token (False: a filler slot)


# ----------------------------------------------------------------------------- small parts

def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def sine_encoding(coords: Tensor, num_features: int, temperature: float = 10000.0) -> Tensor:
    """(..., C) coordinates in [0, 1] -> (..., C * num_features) sine/cosine features."""
    exponent = 2 * (torch.arange(num_features, device=coords.device) // 2) / num_features
    frequencies = temperature ** exponent.to(coords.dtype)
    angles = coords[..., None] * (2 * math.pi) / frequencies          # (..., C, F)
    encoded = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1)
    return encoded.flatten(-3)


def sine_positions(not_mask: Tensor, dim: int, temperature: float) -> Tensor:
    """DETR's normalised sine position of every pixel of a feature map: not_mask (B, H, W)
    1 = image, 0 = padding -> (B, H, W, dim), y's features then x's, each over the unpadded
    extent (Grounding DINO: temperature 20; DETR and Deformable DETR: 10000)."""
    y = not_mask.cumsum(1) / not_mask.cumsum(1)[:, -1:, :].clamp(min=1)
    x = not_mask.cumsum(2) / not_mask.cumsum(2)[:, :, -1:].clamp(min=1)
    return sine_encoding(torch.stack([y, x], dim=-1), dim // 2, temperature)


def pad_targets(targets: list["Target"], device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image targets -> labels (B, M) long, boxes (B, M, 4) cxcywh, gt_mask (B, M) with
    True = a real ground truth (M = the most any image has). Padding slots hold label 0 and
    the box (0.5, 0.5, 0.5, 0.5), harmless dummies that keep costs finite; every user masks
    them."""
    max_gt = max((len(t.labels) for t in targets), default=0)
    labels = torch.zeros(len(targets), max_gt, dtype=torch.long, device=device)
    boxes = torch.full((len(targets), max_gt, 4), 0.5, device=device)
    gt_mask = torch.zeros(len(targets), max_gt, dtype=torch.bool, device=device)
    for b, target in enumerate(targets):
        count = len(target.labels)
        labels[b, :count], boxes[b, :count], gt_mask[b, :count] = target.labels, target.boxes, True
    return labels, boxes, gt_mask


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FeedForward(nn.Module):
    """Post-norm FFN block: x + FFN(x), then LayerNorm."""
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.net(x))


def attend(attention: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
           key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
    """nn.MultiheadAttention that returns zeros (not NaN) for a row whose keys are all padding.

    That happens for an image prompted with nothing (an interactive prompt on an image
    without ground truth).
    """
    if key.shape[1] == 0:
        return torch.zeros_like(query)
    if key_padding_mask is None:
        return attention(query, key, value, attn_mask=attn_mask, need_weights=False)[0]
    all_padding = key_padding_mask.all(dim=1)                          # (B,)
    safe_mask = key_padding_mask.clone()
    safe_mask[all_padding, 0] = False
    out = attention(query, key, value, key_padding_mask=safe_mask, attn_mask=attn_mask,
                    need_weights=False)[0]
    return out * (~all_padding)[:, None, None].to(out.dtype)


# ----------------------------------------------------------------------------- backbone

class TinyConvNet(nn.Module):
    """A small convolutional backbone for the `tiny` preset: strides 8, 16, 32."""
    def __init__(self, widths=(32, 64, 96, 128)):
        super().__init__()

        def block(cin, cout):  # a stride-2 conv then a stride-1 conv
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU())

        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                  nn.GroupNorm(8, widths[0]), nn.ReLU())      # stride 2
        self.stage1 = block(widths[0], widths[0])                              # stride 4
        self.stage2 = block(widths[0], widths[1])                              # stride 8
        self.stage3 = block(widths[1], widths[2])                              # stride 16
        self.stage4 = block(widths[2], widths[3])                              # stride 32
        self.channels = list(widths[1:])                      # of stages 2-4 (strides 8-32)

    def forward(self, x: Tensor) -> Tensor:
        return self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x)))))


def make_swin(config: DetectorConfig) -> nn.Module:
    """torchvision's Swin Transformer at the configured sizes; ImageNet weights only for
    Swin-T's."""
    from torchvision import models

    sizes = (config.swin_embed_dim, config.swin_depths, config.swin_heads, config.swin_window)
    swin_t = (96, (2, 2, 6, 2), (3, 6, 12, 24), 7)
    if config.pretrained_backbone:
        if sizes != swin_t:
            raise ValueError("torchvision's ImageNet weights are Swin-T's (embed 96, depths "
                             "2-2-6-2, heads 3-6-12-24, window 7); these sizes have none")
        return models.swin_t(weights="IMAGENET1K_V1")
    return models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=config.swin_embed_dim, depths=list(config.swin_depths),
        num_heads=list(config.swin_heads), window_size=[config.swin_window] * 2,
        stochastic_depth_prob=0.2)


def make_backbone(config: DetectorConfig) -> tuple[nn.Module, list[int], bool]:
    """A torchvision feature extractor returning strides 8, 16, 32.

    Returns (extractor, channels per level, outputs_nhwc) where outputs_nhwc is True for
    Swin, whose stages produce (B, H, W, C).
    """
    from torchvision import models
    from torchvision.models.feature_extraction import create_feature_extractor

    name, pretrained = config.backbone, config.pretrained_backbone
    if name == "tiny":
        if pretrained:
            raise ValueError("the tiny backbone has no pretrained weights; drop "
                             "--pretrained-backbone or use --model swin_t / r50")
        network, nodes, outputs_nhwc = TinyConvNet(), ["stage2", "stage3", "stage4"], False
        channels = network.channels
    elif name == "swin":
        network, embed = make_swin(config), config.swin_embed_dim
        nodes, channels, outputs_nhwc = ["features.3", "features.5", "features.7"], \
            [2 * embed, 4 * embed, 8 * embed], True
    elif name == "r50":
        # BatchNorm frozen, as in DETR: at 2 images per GPU batch statistics are noise. With
        # ImageNet weights it keeps their statistics; from scratch it is the identity.
        network = models.resnet50(weights="IMAGENET1K_V2" if pretrained else None,
                                  norm_layer=FrozenBatchNorm2d)
        nodes, channels, outputs_nhwc = ["layer2", "layer3", "layer4"], [512, 1024, 2048], False
    else:
        raise ValueError(f"unknown backbone {name!r}; choose tiny, swin or r50")
    extractor = create_feature_extractor(network, {node: str(i) for i, node in enumerate(nodes)})
    return extractor, channels, outputs_nhwc


class Backbone(nn.Module):
    """Backbone + neck: `num_levels` levels of width d, with sine positions and level
    embeddings (METHOD 2.1). The backbone gives strides 8, 16, 32; up to 3 levels take its
    last stages (1x1 conv + GroupNorm), and each level beyond 3 is a stride-2 conv on the one
    before (the 4th on the last backbone stage): 4 levels are strides 8, 16, 32, 64.
    Swin's stages pass through a LayerNorm each, and its input is padded to a multiple of 4
    (both as in Grounding DINO). torchvision's Swin does not shift a window along a side
    shorter than the window, where transformers' (and GD's) does: the two agree when every
    stage is at least a window wide (7: pictures of 224 px and more), not on smaller ones."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        d, num_levels = config.hidden_dim, config.num_levels
        self.body, channels, self.outputs_nhwc = make_backbone(config)
        self.num_stages = min(num_levels, len(channels))
        used = channels[len(channels) - self.num_stages:]
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in used) if self.outputs_nhwc \
            else None
        groups = math.gcd(32, d)
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(groups, d))
            for c in used)
        for level in range(self.num_stages, num_levels):
            source = channels[-1] if level == self.num_stages else d
            self.projections.append(nn.Sequential(nn.Conv2d(source, d, 3, 2, 1),
                                                  nn.GroupNorm(groups, d)))
        self.level_embed = nn.Parameter(torch.randn(num_levels, d) * 0.02)
        self.position_temperature = config.position_temperature

    def forward(self, images: Tensor, mask: Tensor) -> ImageFeatures:
        """images (B, 3, H, W) normalised; mask (B, H, W) True = padding."""
        if self.outputs_nhwc:
            images = F.pad(images, (0, -images.shape[-1] % 4, 0, -images.shape[-2] % 4))
        stages = list(self.body(images).values())[-self.num_stages:]
        if self.outputs_nhwc:
            stages = [rearrange(norm(s), "b h w c -> b c h w")
                      for norm, s in zip(self.stage_norms, stages)]
        maps = [proj(s) for proj, s in zip(self.projections, stages)]
        previous = stages[-1]
        for proj in self.projections[self.num_stages:]:
            previous = proj(previous)
            maps.append(previous)
        tokens, positions, masks, shapes, ratios = [], [], [], [], []
        for level, feature in enumerate(maps):
            height, width = feature.shape[-2:]
            level_mask = F.interpolate(mask[:, None].float(), size=(height, width))[:, 0].bool()
            not_mask = (~level_mask).float()
            pos = sine_positions(not_mask, feature.shape[1], self.position_temperature)
            tokens.append(rearrange(feature, "b c h w -> b (h w) c"))
            positions.append(rearrange(pos, "b h w c -> b (h w) c") + self.level_embed[level])
            masks.append(level_mask.flatten(1))
            shapes.append((height, width))
            ratios.append(torch.stack([not_mask[:, 0, :].sum(1) / width,
                                       not_mask[:, :, 0].sum(1) / height], dim=-1))
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=images.device)
        level_sizes = spatial_shapes.prod(1)
        return ImageFeatures(
            tokens=torch.cat(tokens, 1), pos=torch.cat(positions, 1).to(tokens[0].dtype),
            padding_mask=torch.cat(masks, 1), spatial_shapes=spatial_shapes,
            level_start_index=torch.cat([level_sizes.new_zeros(1), level_sizes.cumsum(0)[:-1]]),
            valid_ratios=torch.stack(ratios, 1))


# ----------------------------------------------------------------------------- attention

class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention (Deformable DETR): each query samples P points per head and level
    around its reference and mixes them with learned weights. The sampling itself is
    deform_attn.ms_deform_attn (PyTorch reference or Triton)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int,
                 kernel: str = "auto"):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.kernel = kernel
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self):
        # Start with points spread on a ring around the reference, one direction per head,
        # further out for later points (as in Deformable DETR), and uniform weights.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads) * (2 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        grid = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference: Tensor, features: ImageFeatures,
                value: Tensor | None = None) -> Tensor:
        """query (B, Q, d); reference (B, Q, L, 2) points or (B, Q, L, 4) boxes, normalised
        to the padded feature map (already multiplied by valid ratios); value (B, S, d)
        defaults to features.tokens. Returns (B, Q, d)."""
        value = features.tokens if value is None else value
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value).masked_fill(features.padding_mask[..., None], 0)
        value = rearrange(value, "b s (h d) -> b s h d", h=heads)
        offsets = rearrange(self.sampling_offsets(query), "b q (h l p xy) -> b q h l p xy",
                            h=heads, l=levels, p=points)
        weights = rearrange(self.attention_weights(query), "b q (h lp) -> b q h lp", h=heads)
        weights = rearrange(weights.softmax(-1), "b q h (l p) -> b q h l p", l=levels)
        reference = reference.float()[:, :, None, :, None, :]                 # (B, Q, 1, L, 1, .)
        if reference.shape[-1] == 2:
            size_xy = features.spatial_shapes.flip(-1).float()                 # (L, 2) as (W, H)
            locations = reference + offsets.float() / size_xy[None, None, None, :, None, :]
        else:
            locations = (reference[..., :2] + offsets.float() / points * reference[..., 2:] * 0.5)
        out = ms_deform_attn(value, features.spatial_shapes, features.level_start_index,
                             locations, weights.to(value.dtype), backend=self.kernel)
        return self.output_proj(out)


def scale_reference(boxes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Boxes or points normalised to the unpadded image (B, Q, 4|2) -> per level, normalised
    to each padded feature map: (B, Q, L, 4|2)."""
    ratios = valid_ratios if boxes.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
    return boxes[:, :, None] * ratios[:, None]


# ----------------------------------------------------------------------------- text encoder

# BERT, the text encoder of Grounding DINO: the project's own WordPiece tokenizer and encoder,
# loading Hugging Face's bert-base-uncased files (config.json, weights, vocab.txt or
# tokenizer.json) by their names. `transformers` is only the tests' oracle: nothing here imports it.

CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
              (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


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
            word = word.lower() if self.lowercase else word
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


def read_vocab_txt(path: Path) -> list[str]:
    """vocab.txt: the token of id i on line i."""
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n")


def read_tokenizer_json(path: Path) -> tuple[list[str], dict]:
    """tokenizer.json, as transformers 5 saves a BERT tokenizer -> its tokens by id and its
    normaliser's settings (WordPieceTokenizer's keywords). ValueError naming the file when it
    is not BERT's WordPiece, which is all that WordPieceTokenizer computes."""
    spec = json.loads(path.read_text(encoding="utf-8"))
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


def read_tokenizer(folder: Path) -> WordPieceTokenizer:
    """A Hugging Face folder's WordPiece tokenizer, in either form: the hub's vocab.txt (with
    its tokenizer_config.json's casing, when there is one), or the tokenizer.json that
    transformers 5 saves instead (the vocabulary and the normaliser's settings). Where both
    are there they must hold the same vocabulary. FileNotFoundError or ValueError naming the
    files otherwise."""
    vocab_txt, tokenizer_json = folder / "vocab.txt", folder / "tokenizer.json"
    if not vocab_txt.is_file() and not tokenizer_json.is_file():
        raise FileNotFoundError(f"{folder} has neither vocab.txt nor tokenizer.json: a Hugging "
                                f"Face folder (BERT or Grounding DINO) holds its WordPiece "
                                f"vocabulary in one of them")
    if not tokenizer_json.is_file():
        tokens, settings, source = read_vocab_txt(vocab_txt), tokenizer_casing(folder), vocab_txt
    else:
        (tokens, settings), source = read_tokenizer_json(tokenizer_json), tokenizer_json
        listed = read_vocab_txt(vocab_txt) if vocab_txt.is_file() else tokens
        if token_ids(listed) != token_ids(tokens):
            raise ValueError(f"{vocab_txt} and {tokenizer_json} hold different vocabularies: "
                             f"keep the one that belongs to these weights")
    try:
        return WordPieceTokenizer(tokens, **settings)
    except ValueError as error:         # a special token missing
        raise ValueError(f"{source}: {error}") from error


def tokenizer_casing(folder: Path) -> dict:
    """The normaliser's settings in a folder's tokenizer_config.json (BertTokenizer's
    do_lower_case, strip_accents, tokenize_chinese_chars) as WordPieceTokenizer's keywords;
    {} (bert-base-uncased's) without the file."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    names = dict(do_lower_case="lowercase", strip_accents="strip_accents",
                 tokenize_chinese_chars="chinese_characters")
    return {ours: config[theirs] for theirs, ours in names.items() if theirs in config}


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


MAX_TEXT_TOKENS = 256      # Grounding DINO's max_text_len


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


class BertTextEncoder(nn.Module):
    """Grounding DINO's text side: a tokenizer and a BERT. Class names are read as Grounding
    DINO reads them: one caption "[CLS] cat . remote control . [SEP]", each name a phrase,
    every token's state projected to d (GD's text_projection); a class is embedded as the mean
    of its tokens. Built from a local Hugging Face folder (`from_folder`), or, for the tiny
    preset, at a small size with a vocabulary generated in code (`generated`)."""

    def __init__(self, tokenizer: WordPieceTokenizer, bert: "Bert", dim: int):
        super().__init__()
        self.tokenizer, self.bert = tokenizer, bert
        self.out = nn.Linear(self.bert.config.hidden_size, dim)
        ids = self.tokenizer.ids
        self.register_buffer("delimiters", torch.tensor(
            [ids[token] for token in ("[CLS]", "[SEP]", ".", "?") if token in ids]),
            persistent=False)

    @classmethod
    def from_folder(cls, folder: str | Path, dim: int) -> "BertTextEncoder":
        """A BERT folder (`--text-encoder path/to/bert-base-uncased`, its weights loaded here,
        see load_bert) or a Grounding DINO folder (its config's text_config and its vocabulary,
        see read_tokenizer; the weights come with the detector's, see load_grounding_dino)."""
        path = required_file(Path(folder), "config.json")
        settings = json.loads(path.read_text())
        if settings.get("model_type") != "grounding-dino":
            tokenizer, bert, _ = load_bert(folder)      # the pooler is not used
            return cls(tokenizer, bert, dim)
        tokenizer = read_tokenizer(Path(folder))
        bert = Bert(BertConfig.from_dict(settings.get("text_config", {}), f"{path} text_config"))
        return cls(tokenizer, bert, dim)

    @classmethod
    def generated(cls, dim: int, num_layers: int, num_heads: int) -> "BertTextEncoder":
        """The tiny preset's: a BERT of width d, FFN 4d, trained from scratch without dropout,
        over generated_vocabulary() with byte fallback (no download, any script)."""
        tokenizer = WordPieceTokenizer(generated_vocabulary(), byte_fallback=True)
        bert = Bert(BertConfig(vocab_size=len(tokenizer.ids), hidden_size=dim,
                               num_layers=num_layers, num_heads=num_heads,
                               intermediate_size=4 * dim, max_positions=MAX_TEXT_TOKENS,
                               hidden_dropout=0.0, attention_dropout=0.0))
        return cls(tokenizer, bert, dim)

    def name_tokens(self, name: str) -> int:
        """What a name costs in a caption: its pieces and its "."."""
        return len(self.tokenizer.pieces(name)) + 1

    def caption_ids(self, names: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """The caption's token ids and each name's span [start, end) among them. ValueError for
        a name without a token or a caption longer than MAX_TEXT_TOKENS."""
        if not names:
            raise ValueError("a caption needs at least one class name")
        if "." not in self.tokenizer.ids:
            raise ValueError("the vocabulary has no '.' token to end a caption's phrases")
        ids, spans = [self.tokenizer.cls_id], []
        for name in names:
            pieces = self.tokenizer.pieces(name)
            if not pieces:
                raise ValueError(f"the class name {name!r} has no token")
            spans.append((len(ids), len(ids) + len(pieces)))
            ids += pieces + [self.tokenizer.ids["."]]
        ids.append(self.tokenizer.sep_id)
        if len(ids) > MAX_TEXT_TOKENS:
            raise ValueError(f"the caption of these {len(names)} class names has {len(ids)} "
                             f"tokens, more than Grounding DINO's {MAX_TEXT_TOKENS}: give fewer "
                             f"names at once")
        return ids, spans

    def caption_chunks(self, names: list[str], max_names: int) -> list[tuple[int, int]]:
        """[start, end) ranges of `names`, in order, each at most `max_names` long and with a
        caption of at most MAX_TEXT_TOKENS tokens (a name costs its pieces and a ".", a
        caption [CLS] and [SEP])."""
        ranges, start, length = [], 0, 2
        for index, name in enumerate(names):
            cost = self.name_tokens(name)
            if index > start and (length + cost > MAX_TEXT_TOKENS or index - start == max_names):
                ranges.append((start, index))
                start, length = index, 2
            length += cost
        return ranges + [(start, len(names))] if names else ranges

    def encode_ids(self, input_ids: Tensor, padding: Tensor | None = None
                   ) -> tuple[Tensor, Phrases]:
        """Token ids of captions (B, T), padding (B, T) True = padding -> each token's state
        projected to d (B, T, d), and the captions' phrases (caption_phrases): BERT reads
        them with GD's sub-sentence mask and phrase positions."""
        if padding is None:
            padding = torch.zeros_like(input_ids, dtype=torch.bool)
        phrases = caption_phrases(input_ids, padding, self.delimiters, self.out.out_features)
        states = self.bert(input_ids, phrases.attention.long(), phrases.position_ids)
        return self.out(states), phrases

    def caption(self, names: list[str]) -> PromptTokens:
        """K class names -> their caption as the prompts of a batch of one: its T tokens'
        states projected to d, its phrases, each class's tokens and their mean."""
        device = self.out.weight.device
        ids, spans = self.caption_ids(names)
        tokens, phrases = self.encode_ids(torch.tensor([ids], device=device))
        width = max(end - start for start, end in spans)
        slots = torch.arange(width, device=device)
        starts, ends = (torch.tensor(part, device=device) for part in zip(*spans))
        class_tokens = (starts[:, None] + slots).clamp(max=len(ids) - 1)[None]    # (1, K, L)
        padding = (starts[:, None] + slots >= ends[:, None])[None]
        gathered = tokens[0][class_tokens[0]].masked_fill(padding[0, ..., None], 0)
        classes = (gathered.sum(1) / (~padding[0]).sum(1, keepdim=True))[None]
        return PromptTokens(tokens, phrases, classes, torch.zeros_like(padding[..., 0]),
                            class_tokens, padding)

    def forward(self, names: list[str]) -> Tensor:
        """K names -> (K, d): each the mean of its tokens in their caption (as many captions
        as MAX_TEXT_TOKENS asks for; a name's tokens attend only to its phrase, so the split
        changes nothing)."""
        return torch.cat([self.caption(names[start:end]).classes[0]
                          for start, end in self.caption_chunks(names, len(names))])


# ----------------------------------------------------------------------------- prompts

class VisualPromptEncoder(nn.Module):
    """One embedding per exemplar box (METHOD 2.2): a learned query shared by all prompts,
    positioned by an MLP of the box's sine encoding, reads the image with one deformable
    cross-attention around the box, then self-attention (each prompt attends only to itself,
    as in the release), an FFN and LayerNorms."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        d = config.hidden_dim
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.box_position = MLP(d, d, d, 2)
        self.cross_attention = MultiScaleDeformableAttention(
            d, config.num_heads, config.num_levels, config.num_points, config.kernel)
        self.cross_norm = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, config.num_heads, batch_first=True)
        self.self_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, config.ffn_dim)

    def forward(self, features: ImageFeatures, image_index: Tensor, boxes: Tensor) -> Tensor:
        """image_index (N,) long: the image each box is on; boxes (N, 4) cxcywh. -> (N, d)."""
        batch, d = features.tokens.shape[0], self.query.shape[0]
        if boxes.shape[0] == 0:
            return features.tokens.new_zeros(0, d)
        # Lay the exemplars out as (B, slots) so each one reads the features of its own image.
        counts = torch.bincount(image_index, minlength=batch)
        first_of_image = counts.cumsum(0) - counts
        order = torch.argsort(image_index, stable=True)
        slot = torch.empty_like(image_index)
        slot[order] = (torch.arange(len(order), device=slot.device)
                       - first_of_image[image_index[order]])
        num_slots = int(counts.max())
        box_grid = boxes.new_full((batch, num_slots, 4), 0.5)
        box_grid[image_index, slot] = boxes.to(box_grid.dtype)
        position = self.box_position(sine_encoding(box_grid, d // 4))          # (B, slots, d)
        query = self.query.expand(batch, num_slots, d)
        reference = scale_reference(box_grid, features.valid_ratios)
        x = self.cross_norm(query + self.cross_attention(query + position, reference, features))
        only_itself = ~torch.eye(num_slots, dtype=torch.bool, device=x.device)
        x = self.self_norm(x + attend(self.self_attention, x + position, x + position, x,
                                      attn_mask=only_itself))
        return self.ffn(x)[image_index, slot]


def contrastive_logits(visual: Tensor, labels: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """METHOD 2.4: visual (N, d) exemplar embeddings with labels (N,) in 0..K-1, text (K, d).

    Returns (K, K) logits between each class's mean visual embedding and every class's text
    embedding; the symmetric InfoNCE over them (SetCriterion) is L_contra.
    """
    num_classes = text.shape[0]
    sums = visual.new_zeros(num_classes, visual.shape[1]).index_add(0, labels, visual)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
    means = F.normalize(sums / counts[:, None].to(sums.dtype), dim=-1)
    return logit_scale.exp().clamp(max=100) * means @ F.normalize(text, dim=-1).T


# ----------------------------------------------------------------------------- enhancer

class BiAttention(nn.Module):
    """Grounding DINO's bi-directional attention between image tokens and prompts (its
    BiMultiHeadAttention): one set of logits, image queries against prompt keys, normalised
    over the prompts for the image side and over the image tokens for the prompt side, with
    separate values and output projections per direction. GD's sizes: width = FFN / 2 (1024),
    heads = heads / 2 (4)."""

    def __init__(self, dim: int, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.image_query, self.prompt_key = nn.Linear(dim, width), nn.Linear(dim, width)
        self.image_value, self.prompt_value = nn.Linear(dim, width), nn.Linear(dim, width)
        self.image_output, self.prompt_output = nn.Linear(width, dim), nn.Linear(width, dim)

    def forward(self, image: Tensor, prompts: Tensor, image_padding: Tensor,
                prompt_padding: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, S, d), prompts (B, T, d); image_padding (B, S) and prompt_padding (B, T)
        True = padding. Returns what each side reads from the other: (B, S, d), (B, T, d);
        an image whose prompts are all padding reads zeros."""
        def heads(x: Tensor) -> Tensor:
            return rearrange(x, "b n (h c) -> b h n c", h=self.num_heads)

        query, key = heads(self.image_query(image)), heads(self.prompt_key(prompts))
        logits = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5      # (B, h, S, K)
        # Logits within 50000 of their maximum, as GD keeps them for half precision (GD
        # shifts by the global maximum and clamps twice; the softmax is the same).
        logits = (logits - logits.amax((-2, -1), keepdim=True)).clamp(min=-50000)
        lowest = torch.finfo(logits.dtype).min
        to_prompts = logits.masked_fill(prompt_padding[:, None, None, :], lowest).softmax(-1)
        to_image = logits.transpose(-1, -2).masked_fill(
            image_padding[:, None, None, :], lowest).softmax(-1)                # (B, h, K, S)
        image_read = to_prompts @ heads(self.prompt_value(prompts))
        prompts_read = to_image @ heads(self.image_value(image))
        image_read = image_read * (~prompt_padding.all(1))[:, None, None, None].to(image_read.dtype)
        return (self.image_output(rearrange(image_read, "b h n c -> b n (h c)")),
                self.prompt_output(rearrange(prompts_read, "b h n c -> b n (h c)")))


class EnhancerLayer(nn.Module):
    """One feature-enhancer layer, Grounding DINO's (METHOD 2.6): bi-directional image <->
    prompt attention, its result added with layer scale 1e-4 to the layer-normed inputs; prompt
    self-attention (positions on queries and keys, each prompt token within its phrase) + FFN;
    image deformable self-attention + FFN. The prompt side runs at half the heads and half the
    FFN width, as in GD. In training, the fusion's updates pass a drop path (fusion_drop_path).
    """

    def __init__(self, config: DetectorConfig):
        super().__init__()
        d, heads, ffn = config.hidden_dim, config.num_heads, config.ffn_dim
        self.fusion_image_norm, self.fusion_prompt_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fusion = BiAttention(d, ffn // 2, heads // 2)
        self.image_scale = nn.Parameter(torch.full((d,), 1e-4))
        self.prompt_scale = nn.Parameter(torch.full((d,), 1e-4))
        self.fusion_drop_rate = config.fusion_drop_path
        self.prompt_self_attention = nn.MultiheadAttention(d, heads // 2, batch_first=True)
        self.prompt_norm = nn.LayerNorm(d)
        self.prompt_ffn = FeedForward(d, ffn // 2)
        self.image_self_attention = MultiScaleDeformableAttention(
            d, heads, config.num_levels, config.num_points, config.kernel)
        self.image_norm = nn.LayerNorm(d)
        self.image_ffn = FeedForward(d, ffn)

    def forward(self, image: Tensor, prompts: Tensor, phrases: "Phrases",
                features: ImageFeatures, reference_points: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, S, d), prompts (B, T, d), reference_points (B, S, L, 2). Returns the
        updated (image, prompts)."""
        if prompts.shape[1] > 0:
            image, prompts = self.fusion_image_norm(image), self.fusion_prompt_norm(prompts)
            image_read, prompts_read = self.fusion(image, prompts, features.padding_mask,
                                                   phrases.padding)
            image = image + self.fusion_drop_path(self.image_scale * image_read)
            prompts = prompts + self.fusion_drop_path(self.prompt_scale * prompts_read)
            positioned = prompts + phrases.pos.to(prompts.dtype)
            elsewhere = ~phrases.attention.repeat_interleave(
                self.prompt_self_attention.num_heads, dim=0)      # (B * heads, K, K)
            prompts = self.prompt_norm(prompts + attend(
                self.prompt_self_attention, positioned, positioned, prompts, attn_mask=elsewhere))
            prompts = self.prompt_ffn(prompts)
        attended = self.image_self_attention(image + features.pos, reference_points, features,
                                             value=image)
        image = self.image_ffn(self.image_norm(image + attended))
        return image, prompts

    def fusion_drop_path(self, x: Tensor) -> Tensor:
        """x (B, N, d): one side's fusion update. In training each sample's is dropped with
        probability fusion_drop_path, the kept ones scaled up to match, as GD's DropPath does
        (the image side and the prompt side draw apart)."""
        return stochastic_depth(x, self.fusion_drop_rate, "row", self.training)


def token_centres(features: ImageFeatures) -> Tensor:
    """The centre of every token, normalised to its level's unpadded extent: (B, S, 2)."""
    centres = []
    for level, (height, width) in enumerate(features.spatial_shapes.tolist()):
        y, x = torch.meshgrid(torch.arange(height, device=features.tokens.device) + 0.5,
                              torch.arange(width, device=features.tokens.device) + 0.5,
                              indexing="ij")
        ratios = features.valid_ratios[:, level]                               # (B, 2) (w, h)
        x = x.flatten()[None] / (ratios[:, None, 0] * width)
        y = y.flatten()[None] / (ratios[:, None, 1] * height)
        centres.append(torch.stack([x, y], -1))
    return torch.cat(centres, 1)


def token_anchors(features: ImageFeatures) -> tuple[Tensor, Tensor]:
    """One anchor box per token (METHOD 2.7): at its centre, side 0.05 * 2^level. Returns the
    anchors in inverse-sigmoid space (B, S, 4) and which are valid (B, S): an image token whose
    anchor lies inside (0.01, 0.99). Invalid ones are +inf, a box at (1, 1, 1, 1) (as in GD)."""
    centres = token_centres(features)
    sides = [torch.full((h * w,), 0.05 * 2 ** level, device=centres.device)
             for level, (h, w) in enumerate(features.spatial_shapes.tolist())]
    sides = torch.cat(sides)[None, :, None].expand(centres.shape[0], -1, 2)
    anchors = torch.cat([centres, sides], -1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~features.padding_mask
    return torch.log(anchors / (1 - anchors)).masked_fill(~valid[..., None], math.inf), valid


class ContrastiveHead(nn.Module):
    """Class logits from query . prompt (METHOD 2.9): any prompt set works. Two forms:
    "dot", Grounding DINO's plain dot product, and "scaled", (query . prompt) / sqrt(d) + a
    bias at a prior of 0.01 (the paper's release and MM-Grounding-DINO), which trains from
    scratch more gently. Padding prompts get a large negative logit (probability 0, no
    gradient)."""

    def __init__(self, dim: int, form: str, prior_probability: float = 0.01):
        super().__init__()
        if form not in ("dot", "scaled"):
            raise ValueError(f"class_head must be 'dot' or 'scaled', got {form!r}")
        self.scale, self.bias = 1.0, None
        if form == "scaled":
            self.scale = dim ** -0.5
            prior_logit = -math.log((1 - prior_probability) / prior_probability)
            self.bias = nn.Parameter(torch.tensor(prior_logit))

    def forward(self, queries: Tensor, prompts: Tensor, prompt_mask: Tensor) -> Tensor:
        """queries (..., B, Q, d), prompt tokens (B, T, d), their padding (B, T) ->
        (..., B, Q, T)."""
        logits = queries @ prompts.transpose(-1, -2) * self.scale
        if self.bias is not None:
            logits = logits + self.bias
        return logits.masked_fill(prompt_mask[:, None, :], -1e4)


# ----------------------------------------------------------------------------- decoder

class DecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the prompts, deformable cross-attention to the
    image memory, FFN; post-norm (METHOD 2.8)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        d, (heads, points, ffn) = config.hidden_dim, config.decoder_sizes()
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.self_norm = nn.LayerNorm(d)
        self.prompt_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.prompt_norm = nn.LayerNorm(d)
        self.image_attention = MultiScaleDeformableAttention(
            d, heads, config.num_levels, points, config.kernel)
        self.image_norm = nn.LayerNorm(d)
        self.ffn = FeedForward(d, ffn)

    def forward(self, queries: Tensor, query_pos: Tensor, reference: Tensor,
                features: ImageFeatures, memory: Tensor, prompts: Tensor, prompt_mask: Tensor,
                attn_mask: Tensor | None) -> Tensor:
        """queries, query_pos (B, T, d); reference (B, T, L, 4); attn_mask (T, T) True =
        may not attend (keeps the DN groups and the matching queries apart)."""
        q = queries + query_pos
        queries = self.self_norm(queries + attend(self.self_attention, q, q, queries,
                                                  attn_mask=attn_mask))
        queries = self.prompt_norm(queries + attend(self.prompt_attention, queries + query_pos,
                                                    prompts, prompts, prompt_mask))
        queries = self.image_norm(queries + self.image_attention(queries + query_pos, reference,
                                                                 features, value=memory))
        return self.ffn(queries)


class Decoder(nn.Module):
    """Cross-modality decoder with iterative box refinement (METHOD 2.8), Grounding DINO's:
    one box head shared by every layer predicts a delta on the previous layer's box. The
    reference for the next layer is read from the layer's output, the box reported for the
    layer from its normed output (both as in GD); each layer's query position is an MLP of the
    sine of its reference box, scaled to the padded image, in GD's (y, x, w, h) order."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        d = config.hidden_dim
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.box_head = MLP(d, d, 4, 3)
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        self.query_pos_head = MLP(2 * d, d, d, 2)
        self.norm = nn.LayerNorm(d)

    def forward(self, queries: Tensor, reference: Tensor, features: ImageFeatures,
                memory: Tensor, prompts: Tensor, prompt_mask: Tensor,
                attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """queries (B, T, d), reference (B, T, 4) cxcywh. Returns hidden states
        (layers, B, T, d), normed, and boxes (layers, B, T, 4)."""
        hidden, boxes = [], []
        for layer in self.layers:
            scaled = scale_reference(reference, features.valid_ratios)           # (B, T, L, 4)
            sine = sine_encoding(scaled[:, :, 0, [1, 0, 2, 3]], queries.shape[-1] // 2)
            queries = layer(queries, self.query_pos_head(sine).to(queries.dtype), scaled,
                            features, memory, prompts, prompt_mask, attn_mask)
            normed = self.norm(queries)
            previous = inverse_sigmoid(reference)
            hidden.append(normed)
            boxes.append((self.box_head(normed).float() + previous).sigmoid())
            reference = (self.box_head(queries).float() + previous).sigmoid().detach()
        return torch.stack(hidden), torch.stack(boxes)


# ------------------------------------------------------------ denoising queries (METHOD 2.10)
# As in DINO: noised copies of the ground-truth boxes are fed to the decoder beside the
# matching queries and must be recovered without matching; an attention mask keeps them from
# leaking into the matching queries.

@dataclass
class DenoisingTargets:
    """Where the denoising (DN) queries sit and what they must recover (METHOD 2.10)."""
    labels: Tensor     # (B, N_dn) long, prompt index each DN query should predict
    boxes: Tensor      # (B, N_dn, 4) ground-truth cxcywh each positive should recover
    positive: Tensor   # (B, N_dn) bool, True = a positive (box and class targets)
    valid: Tensor      # (B, N_dn) bool, False = a padding slot (no loss at all)
    num_groups: int    # each group holds one positive and one negative per ground truth


class DenoisingQueries(NamedTuple):
    """What `build_denoising_queries` adds to the decoder's input (N = the DN queries)."""
    prompts: Tensor                # (B, N, d) the (possibly wrong) prompt of each DN query
    reference: Tensor              # (B, N, 4) noised boxes, cxcywh
    attn_mask: Tensor              # (N + Q, N + Q) bool, True = may not attend
    targets: DenoisingTargets


def build_denoising_queries(targets: list["Target"], prompts: Tensor, num_matching: int,
                            config: DetectorConfig, generator: torch.Generator | None = None
                            ) -> DenoisingQueries | None:
    """Contrastive denoising queries for a batch; None when there is nothing to denoise.

    targets: per image `boxes` (M, 4) cxcywh and `labels` (M,) prompt indices; prompts
    (B, K, d). Each group holds a positive (box corners moved by < lambda * half size) and a
    negative (between lambda and 2 lambda) copy of every ground truth; with probability
    `dn_label_noise` a query gets a wrong prompt (label noise). Groups see neither each
    other nor are seen by the `num_matching` matching queries. The noise is drawn on the
    CPU from `generator` (None: torch's global RNG), so a seed gives the same queries on
    any device.
    """
    device = prompts.device
    batch, num_prompts = prompts.shape[:2]
    labels, boxes, valid = pad_targets(targets, device)
    max_gt = labels.shape[1]
    if max_gt == 0 or num_prompts == 0 or config.num_dn_queries == 0:
        return None
    groups = max(1, config.num_dn_queries // (2 * max_gt))
    shape = (batch, groups, 2, max_gt)          # group, (positive, negative), ground truth
    labels, valid = labels[:, None, None].expand(shape), valid[:, None, None].expand(shape)
    boxes = boxes[:, None, None].expand(*shape, 4)
    positive = torch.tensor([True, False], device=device)[None, None, :, None].expand(shape)
    flip = torch.rand(shape, generator=generator).to(device) < config.dn_label_noise
    wrong = torch.randint(0, num_prompts, shape, generator=generator).to(device)
    noisy_labels = torch.where(flip, wrong, labels)
    half_size = torch.cat([boxes[..., 2:]] * 2, -1) / 2          # (w, h, w, h) / 2
    magnitude = (torch.rand(*shape, 4, generator=generator).to(device)
                 + (~positive)[..., None].float())
    sign = torch.randint(0, 2, (*shape, 4), generator=generator).to(device) * 2.0 - 1.0
    corners = box_convert(boxes, "cxcywh", "xyxy")
    corners = (corners + sign * magnitude * half_size * config.dn_box_noise).clamp(0, 1)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    total = groups * 2 * max_gt
    attn_mask = torch.zeros(total + num_matching, total + num_matching, dtype=torch.bool,
                            device=device)
    attn_mask[total:, :total] = True             # matching queries never see DN queries
    group_of = torch.arange(total, device=device) // (2 * max_gt)
    attn_mask[:total, :total] = group_of[:, None] != group_of[None, :]
    return DenoisingQueries(
        prompts=prompts[batch_index, noisy_labels].flatten(1, 3),
        reference=box_convert(corners, "xyxy", "cxcywh").flatten(1, 3), attn_mask=attn_mask,
        targets=DenoisingTargets(labels=labels.flatten(1), boxes=boxes.flatten(1, 3),
                                 positive=positive.flatten(1), valid=valid.flatten(1),
                                 num_groups=groups))


# ----------------------------------------------------------------------------- the detector

def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """tokens (B, S, C), indices (B, Q) -> (B, Q, C)."""
    return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


def outside_token_logits(token_logits: Tensor, encoder_token_logits: Tensor,
                         prompts: PromptTokens) -> tuple[Tensor | None, Tensor | None]:
    """DetectorOutput's outside_logits and outside_mask ((None, None) with visual prompts):
    the decoder's (layers, B, Q, T) and the encoder's (B, Q, T) token logits at the tokens of
    no class, gathered to the width U of the image with the most; outside_mask (B, U) says
    which slots hold such a token."""
    outside = outside_tokens(prompts)
    if outside is None or not outside.any():
        return None, None
    width = int(outside.sum(1).max())
    index = outside.long().argsort(dim=1, descending=True, stable=True)[:, :width]  # (B, U)
    every = torch.cat([token_logits, encoder_token_logits[None]])       # (layers + 1, B, Q, T)
    gathered = every.gather(-1, index[None, :, None].expand(*every.shape[:-1], -1))
    return gathered, outside.gather(1, index)


class DINOR1(nn.Module):
    """Grounding DINO with a visual prompt encoder and prompt-guided query selection."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.backbone = Backbone(config)
        if config.text_encoder == "generated":
            self.text_encoder = BertTextEncoder.generated(d, config.text_layers, config.num_heads)
        else:
            self.text_encoder = BertTextEncoder.from_folder(config.text_encoder, d)
        self.prompt_encoder = VisualPromptEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))    # METHOD 2.4
        self.enhancer = nn.ModuleList(EnhancerLayer(config)
                                      for _ in range(config.num_encoder_layers))
        self.encoder_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.encoder_class_head = ContrastiveHead(d, config.class_head)
        self.encoder_box_head = MLP(d, d, 4, 3)
        self.query_content = nn.Embedding(config.num_queries, d)
        self.dn_content = nn.Linear(d, d)
        self.decoder = Decoder(config)
        self.decoder_class_head = ContrastiveHead(d, config.class_head)

    # -- prompts ------------------------------------------------------------------------

    def encode_text(self, names: list[str]) -> Tensor:
        """K class names -> (K, d), one embedding per class (METHOD 2.3): the mean of the name's
        tokens in their caption."""
        return self.text_encoder(names)

    def text_chunks(self, names: list[str], max_names: int) -> list[tuple[int, int]]:
        """[start, end) ranges of `names` to prompt with at once: at most `max_names`, in a
        caption within Grounding DINO's 256 tokens (see BertTextEncoder.caption_chunks)."""
        return self.text_encoder.caption_chunks(names, max_names)

    def text_prompts(self, names: list[str], batch: int) -> PromptTokens:
        """K class names as the prompts of every image of a batch: Grounding DINO's caption
        ("cat . remote control .", see BertTextEncoder.caption)."""
        return expand_prompts(self.text_encoder.caption(names), batch)

    def encode_exemplars(self, images: Tensor, mask: Tensor, image_index: Tensor,
                         boxes: Tensor) -> Tensor:
        """Visual prompt embeddings for exemplar boxes (cxcywh) on these images: (N, d)."""
        return self.prompt_encoder(self.backbone(images, mask), image_index, boxes)

    def instruction_prompts(self, features: ImageFeatures,
                            instructions: "VisualInstructions") -> tuple[Tensor, Tensor]:
        """Encode every exemplar, then pick one per class as the prompt shown to every image
        (METHOD 2.5). Returns (prompts (B, K, d), all exemplar embeddings (N, d))."""
        embeddings = self.prompt_encoder(features, instructions.image_index, instructions.boxes)
        prompts = embeddings[instructions.selected]
        return prompts.expand(features.tokens.shape[0], -1, -1), embeddings

    # -- image side ---------------------------------------------------------------------

    def enhance(self, features: ImageFeatures, prompts: Tensor,
                phrases: Phrases) -> tuple[Tensor, Tensor]:
        """Feature enhancer: returns memory (B, S, d) and enhanced prompt tokens (B, T, d)."""
        reference = scale_reference(token_centres(features), features.valid_ratios)
        image = features.tokens
        for layer in self.enhancer:
            image, prompts = layer(image, prompts, phrases, features, reference)
        return image, prompts

    def score_tokens(self, memory: Tensor, valid: Tensor, prompts: Tensor,
                     prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """METHOD 2.7: s_n = max_k (I'_n . v'_k) (+ scale and bias, see ContrastiveHead) for
        every token. valid (B, S): tokens with a valid anchor (token_anchors).

        Returns the proposal features (B, S, d), token logits (B, S, T) and objectness logits
        s_n (B, S). As in Grounding DINO, the tokens that are not valid enter the output layer
        as zeros, so they score a constant and can still be selected (their box is the corner
        (1, 1, 1, 1)); with no prompts at all every token scores 0.
        """
        proposal_features = self.encoder_output(memory.masked_fill(~valid[..., None], 0))
        logits = self.encoder_class_head(proposal_features, prompts, prompt_mask)
        if logits.shape[-1] > 0:
            objectness_logits = logits.max(-1).values
        else:
            objectness_logits = logits.new_zeros(logits.shape[:2])
        return proposal_features, logits, objectness_logits.float()

    def select_queries(self, objectness_logits: Tensor, valid: Tensor) -> Selection:
        """The top N_q tokens by objectness logit s_n, in descending order (METHOD 2.7).
        valid (B, S): tokens with a valid anchor (token_anchors).

        Grounding DINO ranks every token, so padding and edge tokens, at their constant score,
        compete too (`select_invalid_tokens`, set for swin_t and GD's weights): harmless with
        900 of some 20,000 tokens. The tiny preset selects 100 of about 340, and in its
        multi-scale training batches a third of the tokens are padding: ranked with the rest
        they took half of the queries (docs/EXPERIMENTS.md). There invalid tokens are ranked
        after every valid one (selected only where an image has fewer valid tokens than
        queries), so the order is by score among the valid, then among the invalid."""
        ranked = objectness_logits
        if not self.config.select_invalid_tokens:
            ranked = objectness_logits.masked_fill(~valid, -math.inf)
        indices = ranked.topk(min(self.config.num_queries, ranked.shape[1]), dim=1).indices
        return Selection(indices=indices, objectness_logits=objectness_logits.gather(1, indices))

    # -- the two passes ------------------------------------------------------------------

    def encode(self, images: Tensor, mask: Tensor, prompts: Tensor | PromptTokens | None = None,
               prompt_mask: Tensor | None = None,
               instructions: "VisualInstructions | None" = None,
               class_names: list[str] | None = None) -> Encoded:
        """Backbone, prompts, feature enhancer and token scores: all that comes before the
        decoder, shared by `forward` and `objectness_logits`. Prompts come ready-made
        (`prompts` (B, K, d) with `prompt_mask` (B, K), e.g. generic prototypes, one token each
        in one set, see visual_phrases; or PromptTokens as they are), as `instructions` (training:
        exemplar boxes of this batch, one per class becomes the prompt of every image) or as
        K `class_names` through the text encoder, shown to every image; exactly one of the
        three."""
        if sum(given is not None for given in (prompts, instructions, class_names)) != 1:
            raise ValueError("give the detector prompts (B, K, d), visual instructions or "
                             "class names, exactly one of them")
        features = self.backbone(images, mask)
        exemplars = None
        if instructions is not None:
            prompts, exemplars = self.instruction_prompts(features, instructions)
        if class_names is not None:
            tokens = self.text_prompts(class_names, images.shape[0])
        elif isinstance(prompts, PromptTokens):
            tokens = prompts
        else:
            if prompt_mask is None:
                prompt_mask = torch.zeros(prompts.shape[:2], dtype=torch.bool,
                                          device=prompts.device)
            tokens = one_token_per_class(prompts, prompt_mask)
        memory, enhanced = self.enhance(features, tokens.tokens, tokens.phrases)
        anchors, valid = token_anchors(features)
        proposal_features, token_logits, objectness_logits = self.score_tokens(
            memory, valid, enhanced, tokens.phrases.padding)
        return Encoded(features, tokens, exemplars, memory, enhanced, anchors,
                       proposal_features, token_logits, objectness_logits)

    def objectness_logits(self, images: Tensor, mask: Tensor, indices: Tensor,
                          prompts: Tensor | PromptTokens | None = None,
                          prompt_mask: Tensor | None = None,
                          instructions: "VisualInstructions | None" = None,
                          class_names: list[str] | None = None) -> Tensor:
        """The light path for the GRQO reference model (no decoder): the objectness logits
        s (B, Q) of the given token indices (B, Q), e.g. the ones the policy selected."""
        encoded = self.encode(images, mask, prompts, prompt_mask, instructions, class_names)
        return encoded.objectness_logits.gather(1, indices)

    def forward(self, images: Tensor, mask: Tensor, prompts: Tensor | PromptTokens | None = None,
                prompt_mask: Tensor | None = None,
                instructions: "VisualInstructions | None" = None,
                dn_targets: list["Target"] | None = None,
                generator: torch.Generator | None = None,
                class_names: list[str] | None = None) -> DetectorOutput:
        """images (B, 3, H, W) normalised, mask (B, H, W) True = padding; prompts as in
        `encode` (instructions also yield the contrastive logits). `dn_targets` (training
        only) adds denoising queries, their noise drawn from `generator`."""
        encoded = self.encode(images, mask, prompts, prompt_mask, instructions, class_names)
        features, prompts = encoded.features, encoded.prompts
        token_padding = prompts.phrases.padding
        selection = self.select_queries(encoded.objectness_logits,
                                        encoded.anchors.isfinite().all(-1))
        anchors = gather_tokens(encoded.anchors, selection.indices)
        proposals = gather_tokens(encoded.proposal_features, selection.indices)
        encoder_boxes = (self.encoder_box_head(proposals).float() + anchors).sigmoid()
        # "Mixed" query selection: learned content, positions from the selected proposals.
        queries = self.query_content.weight.expand(images.shape[0], -1, -1)
        queries = queries[:, :encoder_boxes.shape[1]]
        reference, attn_mask, denoising = encoder_boxes.detach(), None, None
        if self.training and dn_targets is not None:
            denoising = build_denoising_queries(dn_targets, prompts.classes, queries.shape[1],
                                                self.config, generator)
        if denoising is not None:
            queries = torch.cat([self.dn_content(denoising.prompts).to(queries.dtype), queries], 1)
            reference = torch.cat([denoising.reference, reference], 1)
            attn_mask = denoising.attn_mask
        hidden, boxes = self.decoder(queries, reference, features, encoded.memory,
                                     encoded.enhanced, token_padding, attn_mask)
        token_logits = self.decoder_class_head(hidden, encoded.enhanced, token_padding).float()
        logits = class_logits(token_logits, prompts)
        num_dn = 0 if denoising is None else denoising.reference.shape[1]
        encoder_token_logits = gather_tokens(encoded.token_logits, selection.indices).float()
        outside_logits, outside_mask = None, None
        if self.training:
            outside_logits, outside_mask = outside_token_logits(
                token_logits[:, :, num_dn:], encoder_token_logits, prompts)
        contrast = None
        if instructions is not None:
            contrast = contrastive_logits(encoded.exemplars, instructions.labels,
                                          self.encode_text(instructions.class_names),
                                          self.logit_scale)
        return DetectorOutput(
            logits=logits[:, :, num_dn:], boxes=boxes[:, :, num_dn:],
            encoder_logits=class_logits(encoder_token_logits, prompts),
            encoder_boxes=encoder_boxes, selection=selection, prompt_mask=prompts.class_mask,
            dn_logits=logits[:, :, :num_dn] if num_dn else None,
            dn_boxes=boxes[:, :, :num_dn] if num_dn else None,
            dn_targets=None if denoising is None else denoising.targets,
            contrastive_logits=contrast, outside_logits=outside_logits,
            outside_mask=outside_mask)


# ----------------------------------------------------------------------------- matching

def paired_giou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """GIoU between every prediction and every ground truth of the same image:
    boxes (B, Q, 4), gt_boxes (B, M, 4) cxcywh -> (B, Q, M)."""
    batch, num_queries, num_gt = boxes.shape[0], boxes.shape[1], gt_boxes.shape[1]
    all_pairs = generalized_box_iou(box_convert(boxes.flatten(0, 1), "cxcywh", "xyxy"),
                                    box_convert(gt_boxes.flatten(0, 1), "cxcywh", "xyxy"))
    all_pairs = all_pairs.view(batch, num_queries, batch, num_gt)
    same_image = torch.arange(batch, device=boxes.device)
    return all_pairs[same_image, :, same_image]


class HungarianMatcher:
    """One-to-one matching of predictions to ground truth with the cost of METHOD (1):

        C_ij = 2.0 * C_class(i, j) + 5.0 * |b_i - b_j|_1 + 2.0 * (-GIoU(b_i, b_j))

    With p_ik = sigmoid(logit of query i for prompt k), k_j the prompt of ground truth j,
    pos(p) = alpha (1 - p)^gamma (-log p) and neg(p) = (1 - alpha) p^gamma (-log(1 - p)),
    `class_cost` picks C_class (METHOD section 4, "the release's cost C"):
    - "focal" (DINO-style, the default): pos(p_ik_j) - neg(p_ik_j), j's prompt only;
      unbounded below as p -> 1.
    - "binary_focal" (the release's, mmdetection's BinaryFocalLossCost): the sum over every
      real prompt k of y_jk pos(p_ik) + (1 - y_jk) neg(p_ik), y_j the one-hot of k_j, so a
      query is also charged for scoring the other prompts; bounded below by 0.
    """

    CLASS_COSTS = ("focal", "binary_focal")

    def __init__(self, class_weight: float = 2.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 class_cost: str = "focal"):
        if class_cost not in self.CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {self.CLASS_COSTS}, got {class_cost!r}")
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.class_cost = class_cost

    def layer_costs(self, output: "DetectorOutput", targets: list
                    ) -> tuple[list[Tensor], Tensor]:
        """`pairwise_cost` of every decoder layer's predictions (METHOD (2), one per layer):
        ([(B, Q, M)] * layers, gt_mask (B, M) True = a real ground truth)."""
        costs, gt_mask = [], None
        for logits, boxes in zip(output.logits, output.boxes):
            cost, gt_mask = self.pairwise_cost(logits, boxes, targets, output.prompt_mask)
            costs.append(cost)
        return costs, gt_mask

    def pairwise_cost(self, logits: Tensor, boxes: Tensor, targets: list,
                      prompt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The full cost matrices, differentiable (GRQO builds its rewards from them).

        logits (B, Q, K), boxes (B, Q, 4) cxcywh, targets with labels in 0..K-1;
        prompt_mask (B, K) True = padding prompt, left out of the binary focal sum
        (None = every prompt real; the focal cost never reads a padding prompt).
        Returns cost (B, Q, M) and gt_mask (B, M), True = real ground truth; the cost of a
        padding column is meaningless and must be masked by the caller.
        """
        labels, gt_boxes, gt_mask = pad_targets(targets, logits.device)
        batch, num_queries = logits.shape[:2]
        if labels.shape[1] == 0:
            return logits.new_zeros(batch, num_queries, 0), gt_mask
        probability = logits.float().sigmoid()                                   # (B, Q, K)
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - probability) ** gamma * -(probability + 1e-8).log()
        negative = (1 - alpha) * probability ** gamma * -(1 - probability + 1e-8).log()
        prompt_of_gt = labels[:, None, :].expand(-1, num_queries, -1)            # (B, Q, M)
        positive_j, negative_j = positive.gather(2, prompt_of_gt), negative.gather(2, prompt_of_gt)
        if self.class_cost == "focal":
            class_cost = positive_j - negative_j
        else:
            # sum_k (1 - y_jk) neg(p_ik) = (sum over real prompts) - neg(p_ik_j): a gather and
            # a sum instead of a (B, Q, K) x (B, K, M) product that autocast would run in bf16.
            if prompt_mask is not None:
                negative = negative.masked_fill(prompt_mask[:, None, :], 0.0)
            class_cost = positive_j + negative.sum(2, keepdim=True) - negative_j
        boxes = boxes.float()
        l1 = torch.cdist(boxes, gt_boxes, p=1)
        cost = (self.class_weight * class_cost + self.l1_weight * l1
                - self.giou_weight * paired_giou(boxes, gt_boxes))
        return cost, gt_mask

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list,
                 prompt_mask: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per image (query indices, ground-truth indices), each (min(Q, M),) long.
        Arguments as for `pairwise_cost`."""
        cost, gt_mask = self.pairwise_cost(logits, boxes, targets, prompt_mask)
        cost = cost.cpu()
        matches = []
        for b, count in enumerate(gt_mask.sum(1).tolist()):
            rows, cols = linear_sum_assignment(cost[b, :, :count].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                            torch.as_tensor(cols, dtype=torch.long, device=logits.device)))
        return matches


# ----------------------------------------------------------------------------- SFT losses

class SetCriterion:
    """The SFT losses (METHOD section 3): per decoder layer, on the selected encoder proposals
    and on the DN queries, sigmoid focal loss over the prompt logits (unmatched queries: an
    all-zero target), L1 x 5 and GIoU x 2 on matched boxes; with a caption in training, the
    focal loss of its tokens of no class as negatives; plus L_contra (METHOD 2.4).
    Losses are normalised by `num_boxes`, the number of ground truths per process (averaged
    over processes under DDP)."""

    def __init__(self, matcher: HungarianMatcher | None = None, class_weight: float = 1.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0,
                 contrastive_weight: float = 1.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        self.matcher = matcher or HungarianMatcher()
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.contrastive_weight = contrastive_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def focal(self, logits: Tensor, target: Tensor, keep: Tensor, num_boxes: float) -> Tensor:
        loss = sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, "none")
        return (loss * keep).sum() / num_boxes

    def box_losses(self, boxes: Tensor, gt_boxes: Tensor, num_boxes: float) -> Tensor:
        """boxes, gt_boxes (N, 4) cxcywh, paired -> weighted L1 + GIoU."""
        l1 = (boxes - gt_boxes).abs().sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                              box_convert(gt_boxes, "cxcywh", "xyxy")))
        return self.l1_weight * l1 + self.giou_weight * (1 - giou).sum() / num_boxes

    def set_loss(self, logits: Tensor, boxes: Tensor, targets: list, prompt_mask: Tensor,
                 num_boxes: float) -> Tensor:
        """Hungarian-matched loss of one prediction set (METHOD section 3, matched with the
        cost of METHOD (1)): logits (B, Q, K), boxes (B, Q, 4) cxcywh; prompt_mask (B, K)
        True = padding prompt (no loss)."""
        matches = self.matcher(logits, boxes, targets, prompt_mask)
        target_classes = torch.zeros_like(logits)
        matched_boxes, gt_boxes = [], []
        for b, (rows, cols) in enumerate(matches):
            target_classes[b, rows, targets[b].labels[cols]] = 1
            matched_boxes.append(boxes[b, rows])
            gt_boxes.append(targets[b].boxes[cols])
        keep = (~prompt_mask)[:, None, :].float()
        loss = self.class_weight * self.focal(logits, target_classes, keep, num_boxes)
        return loss + self.box_losses(torch.cat(matched_boxes), torch.cat(gt_boxes), num_boxes)

    def denoising_loss(self, logits: Tensor, boxes: Tensor, dn: DenoisingTargets,
                       prompt_mask: Tensor, num_boxes: float) -> Tensor:
        """DN queries know their targets (no matching): positives recover class and box,
        negatives must predict no class. logits (B, N, K), boxes (B, N, 4) cxcywh; the focal
        and box losses of the matched sets, normalised per group."""
        normaliser = num_boxes * dn.num_groups
        positive = dn.positive & dn.valid
        target_classes = torch.zeros_like(logits)
        target_classes[positive] = F.one_hot(dn.labels[positive],
                                             logits.shape[-1]).to(logits.dtype)
        keep = (dn.valid[..., None] & ~prompt_mask[:, None, :]).float()
        loss = self.class_weight * self.focal(logits, target_classes, keep, normaliser)
        return loss + self.box_losses(boxes[positive], dn.boxes[positive], normaliser)

    def contrastive_loss(self, logits: Tensor) -> Tensor:
        """Symmetric InfoNCE between class-mean visual and text embeddings (METHOD 2.4)."""
        classes = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, classes) + F.cross_entropy(logits.T, classes)) / 2

    def __call__(self, output: DetectorOutput, targets: list,
                 num_boxes: float) -> dict[str, Tensor]:
        """targets: per image `boxes` (M, 4) cxcywh and `labels` (M,) prompt indices.
        Returns named loss terms (each already weighted) and their sum under "sft"."""
        mask = output.prompt_mask
        terms = {"decoder": sum(self.set_loss(logits, boxes, targets, mask, num_boxes)
                                for logits, boxes in zip(output.logits, output.boxes)),
                 "encoder": self.set_loss(output.encoder_logits, output.encoder_boxes, targets,
                                          mask, num_boxes)}
        if output.dn_targets is not None:
            terms["denoising"] = sum(
                self.denoising_loss(logits, boxes, output.dn_targets, mask, num_boxes)
                for logits, boxes in zip(output.dn_logits, output.dn_boxes))
        if output.outside_logits is not None:
            # Grounding DINO's per-token loss: a caption's [CLS], [SEP] and "." are negatives
            # for every matching and encoder query (no class score reads them, but
            # objectness does, METHOD 2.7); the DN queries learn classes only.
            keep = output.outside_mask[None, :, None, :].expand_as(output.outside_logits)
            terms["outside_tokens"] = self.class_weight * self.focal(
                output.outside_logits, torch.zeros_like(output.outside_logits), keep.float(),
                num_boxes)
        if output.contrastive_logits is not None and output.contrastive_logits.shape[0] > 0:
            terms["contrastive"] = self.contrastive_weight * self.contrastive_loss(
                output.contrastive_logits.float())
        terms["sft"] = sum(terms.values())
        return terms


# ----------------------------------------------------------------------------- inference

@dataclass
class Detections:
    """One image's detections, in original image pixels."""
    boxes: Tensor    # (N, 4) xyxy
    scores: Tensor   # (N,)
    labels: Tensor   # (N,) long, prompt index


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, original_sizes: Tensor,
                top_k: int = 300) -> list[Detections]:
    """The top_k (query, prompt) pairs per image by sigmoid score.

    logits (B, Q, K) of the last decoder layer, boxes (B, Q, 4) cxcywh normalised to the
    unpadded image, original_sizes (B, 2) as (h, w) of the files. A query may appear with
    several prompts (multi-label), as in DINO's evaluation.
    """
    batch, num_queries, num_prompts = logits.shape
    scores, flat_index = logits.float().sigmoid().flatten(1).topk(
        min(top_k, num_queries * num_prompts), dim=1)
    query_index, prompt_index = flat_index // num_prompts, flat_index % num_prompts
    picked = boxes.float().gather(1, query_index[..., None].expand(-1, -1, 4))
    height, width = original_sizes.float().unbind(-1)
    scale = torch.stack([width, height, width, height], -1)[:, None, :]
    picked = box_convert(picked, "cxcywh", "xyxy") * scale
    return [Detections(boxes=picked[b], scores=scores[b], labels=prompt_index[b])
            for b in range(batch)]


# ----------------------------------------------------------------------------- checkpoints

def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda -> a device: auto is CUDA where torch sees one, else the CPU.
    SystemExit when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


# The checkpoints' (and prototype files') format: 2 since the model became Grounding DINO's
# module for module, 3 since the tiny preset's text encoder is a BERT. A file of another format
# holds weights this model cannot take.
CHECKPOINT_FORMAT = 3


def check_format(saved: dict, path: str | Path, kind: str) -> None:
    """ValueError naming `path` when it was written in another format than this code's."""
    found = saved.get("format", 1)
    if found != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a {kind} of format {found}, written by an earlier version "
                         f"of the detector; this version reads format {CHECKPOINT_FORMAT}: "
                         f"train again, or use the version that wrote it")


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint without executing pickled code (weights_only=True); SystemExit
    naming the file when it is unreadable or of another format (check_format)."""
    if not Path(path).is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or tampered file: name it, say why
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() or [""]
        reason = next((line for line in detail if "Unsupported global" in line), detail[0])
        reason = reason.split(". Please")[0]
        raise SystemExit(f"cannot load checkpoint {path}: it is truncated, corrupt or holds "
                         f"more than tensors and plain values ({type(error).__name__}: "
                         f"{reason.strip()[:200]})") from error
    if isinstance(checkpoint, dict) and "model" in checkpoint \
            and not is_original_grounding_dino(checkpoint):
        try:
            check_format(checkpoint, path, "checkpoint")
        except ValueError as error:
            raise SystemExit(str(error)) from error
    return checkpoint


def model_from_checkpoint(checkpoint: dict, **overrides) -> DINOR1:
    """Rebuild the detector a checkpoint was trained with and load its weights (strict).

    The backbone is built without ImageNet weights even when training started from them:
    the checkpoint's weights replace them anyway, and fetching them would fail offline."""
    config = DetectorConfig.from_saved(checkpoint["config"],
                                       **{"pretrained_backbone": False, **overrides})
    model = DINOR1(config)
    model.load_state_dict(checkpoint["model"])
    return model


# Settings that do not change the weights a checkpoint holds.
NOT_ARCHITECTURE = ("kernel", "pretrained_backbone", "pad_multiple", "select_invalid_tokens",
                    "fusion_drop_path")


def checkpoint_config_differences(saved: dict, config: DetectorConfig) -> str:
    """"name: saved there, current here" for every architecture setting that differs
    between a checkpoint's config and `config` (empty when the weights fit)."""
    theirs, ours = (architecture(c) for c in (DetectorConfig.from_saved(saved), config))
    return ", ".join(f"{k}: {theirs[k]!r} there, {v!r} here"
                     for k, v in ours.items() if theirs[k] != v)


def architecture(config: DetectorConfig) -> dict:
    """The settings that shape the weights, the decoder's sizes as it uses them."""
    settings = {k: v for k, v in asdict(config).items() if k not in NOT_ARCHITECTURE}
    settings.update(zip(("decoder_heads", "decoder_points", "decoder_ffn_dim"),
                        config.decoder_sizes()))
    return settings


# ------------------------------------------------------------------- Grounding DINO's names
# Hugging Face's GroundingDinoForObjectDetection parameter names -> this project's, as regular
# expressions tried in order (the first that matches renames). GD's separate query, key and
# value projections are packed into nn.MultiheadAttention's in_proj by `pack_attention`.

_ENCODER = r"model\.encoder\.layers\.(\d+)\."
_DECODER = r"model\.decoder\.layers\.(\d+)\."
_SWIN = r"model\.backbone\.conv_encoder\.model\."
# torchvision's Swin: features.0 is the patch embedding, stage s's blocks are features.(2s+1)
# and its patch merging features.(2s+2).
_SWIN_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2",
               "attention.self.relative_position_bias_table": "attn.relative_position_bias_table",
               "attention.self.query": "attn.qkv.query", "attention.self.key": "attn.qkv.key",
               "attention.self.value": "attn.qkv.value", "attention.output.dense": "attn.proj",
               "intermediate.dense": "mlp.0", "output.dense": "mlp.3"}
GROUNDING_DINO_NAMES = [
    (_SWIN + r"embeddings\.patch_embeddings\.projection\.", "backbone.body.features.0.0."),
    (_SWIN + r"embeddings\.norm\.", "backbone.body.features.0.2."),
    (_SWIN + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(" + "|".join(_SWIN_BLOCK).replace(".", r"\.")
     + r")(\.|$)", lambda m: f"backbone.body.features.{2 * int(m[1]) + 1}.{m[2]}."
                             f"{_SWIN_BLOCK[m[3]]}{m[4]}"),
    (_SWIN + r"encoder\.layers\.(\d+)\.downsample\.",
     lambda m: f"backbone.body.features.{2 * int(m[1]) + 2}."),
    (_SWIN + r"hidden_states_norms\.stage(\d)\.",
     lambda m: f"backbone.stage_norms.{int(m[1]) - 2}."),
    (r"model\.input_proj_vision\.", "backbone.projections."),
    (_ENCODER + r"fusion_layer\.layer_norm_vision\.", r"enhancer.\1.fusion_image_norm."),
    (_ENCODER + r"fusion_layer\.layer_norm_text\.", r"enhancer.\1.fusion_prompt_norm."),
    (_ENCODER + r"fusion_layer\.vision_param$", r"enhancer.\1.image_scale"),
    (_ENCODER + r"fusion_layer\.text_param$", r"enhancer.\1.prompt_scale"),
    (_ENCODER + r"fusion_layer\.attn\.vision_proj\.", r"enhancer.\1.fusion.image_query."),
    (_ENCODER + r"fusion_layer\.attn\.text_proj\.", r"enhancer.\1.fusion.prompt_key."),
    (_ENCODER + r"fusion_layer\.attn\.values_vision_proj\.", r"enhancer.\1.fusion.image_value."),
    (_ENCODER + r"fusion_layer\.attn\.values_text_proj\.", r"enhancer.\1.fusion.prompt_value."),
    (_ENCODER + r"fusion_layer\.attn\.out_vision_proj\.", r"enhancer.\1.fusion.image_output."),
    (_ENCODER + r"fusion_layer\.attn\.out_text_proj\.", r"enhancer.\1.fusion.prompt_output."),
    (_ENCODER + r"text_enhancer_layer\.self_attn\.(query|key|value)\.",
     r"enhancer.\1.prompt_self_attention.in_proj.\2."),
    (_ENCODER + r"text_enhancer_layer\.self_attn\.out_proj\.",
     r"enhancer.\1.prompt_self_attention.out_proj."),
    (_ENCODER + r"text_enhancer_layer\.layer_norm_before\.", r"enhancer.\1.prompt_norm."),
    (_ENCODER + r"text_enhancer_layer\.fc1\.", r"enhancer.\1.prompt_ffn.net.0."),
    (_ENCODER + r"text_enhancer_layer\.fc2\.", r"enhancer.\1.prompt_ffn.net.2."),
    (_ENCODER + r"text_enhancer_layer\.layer_norm_after\.", r"enhancer.\1.prompt_ffn.norm."),
    (_ENCODER + r"deformable_layer\.self_attn\.", r"enhancer.\1.image_self_attention."),
    (_ENCODER + r"deformable_layer\.self_attn_layer_norm\.", r"enhancer.\1.image_norm."),
    (_ENCODER + r"deformable_layer\.fc1\.", r"enhancer.\1.image_ffn.net.0."),
    (_ENCODER + r"deformable_layer\.fc2\.", r"enhancer.\1.image_ffn.net.2."),
    (_ENCODER + r"deformable_layer\.final_layer_norm\.", r"enhancer.\1.image_ffn.norm."),
    (_DECODER + r"self_attn\.(query|key|value)\.", r"decoder.layers.\1.self_attention.in_proj.\2."),
    (_DECODER + r"self_attn\.out_proj\.", r"decoder.layers.\1.self_attention.out_proj."),
    (_DECODER + r"self_attn_layer_norm\.", r"decoder.layers.\1.self_norm."),
    (_DECODER + r"encoder_attn_text\.(query|key|value)\.",
     r"decoder.layers.\1.prompt_attention.in_proj.\2."),
    (_DECODER + r"encoder_attn_text\.out_proj\.", r"decoder.layers.\1.prompt_attention.out_proj."),
    (_DECODER + r"encoder_attn_text_layer_norm\.", r"decoder.layers.\1.prompt_norm."),
    (_DECODER + r"encoder_attn\.", r"decoder.layers.\1.image_attention."),
    (_DECODER + r"encoder_attn_layer_norm\.", r"decoder.layers.\1.image_norm."),
    (_DECODER + r"fc1\.", r"decoder.layers.\1.ffn.net.0."),
    (_DECODER + r"fc2\.", r"decoder.layers.\1.ffn.net.2."),
    (_DECODER + r"final_layer_norm\.", r"decoder.layers.\1.ffn.norm."),
    (r"model\.decoder\.reference_points_head\.", r"decoder.query_pos_head."),
    (r"model\.decoder\.layer_norm\.", r"decoder.norm."),
    (r"bbox_embed\.0\.", r"decoder.box_head."),      # the other layers' are tied to it
    (r"model\.enc_output\.", r"encoder_output.0."),
    (r"model\.enc_output_norm\.", r"encoder_output.1."),
    (r"model\.encoder_output_bbox_embed\.", r"encoder_box_head."),
    (r"model\.query_position_embeddings\.", r"query_content."),
    (r"model\.level_embed$", r"backbone.level_embed"),
    (r"model\.text_backbone\.", r"text_encoder.bert."),
    (r"model\.text_projection\.", r"text_encoder.out."),
]
# Copies of the shared box head (GD ties every decoder layer's to the first).
GROUNDING_DINO_TIED = re.compile(r"(model\.decoder\.)?bbox_embed\.(\d+)\.(.*)")
# Left out by design: the final LayerNorm of Swin as a classifier and BERT's pooler, which GD
# never reads, and the position indices of Swin and BERT, which are computed, not learned.
GROUNDING_DINO_UNUSED = re.compile(_SWIN + r"(swin\.)?layernorm\.|.*relative_position_index$"
                                   r"|model\.text_backbone\.(pooler\.|embeddings\.position_ids$)")


class Renamed(NamedTuple):
    """A Grounding DINO state dict in this project's names (see rename_grounding_dino)."""
    tensors: dict[str, Tensor]
    unused: list[str]       # left out by design (GROUNDING_DINO_UNUSED, the tied copies)
    unknown: list[str]      # no rule knows them


def pack_attention(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """"X.in_proj.query.weight", ".key.", ".value." -> nn.MultiheadAttention's packed
    "X.in_proj_weight", and "X.qkv.query.weight" ... -> torchvision Swin's "X.qkv.weight"
    (the biases alike); other names pass through."""
    packed = {}
    for name, tensor in state.items():
        match = re.fullmatch(r"(.*)\.(in_proj|qkv)\.(query|key|value)\.(weight|bias)", name)
        if match is None:
            packed[name] = tensor
        elif match[3] == "query":
            prefix, packing, kind = match[1], match[2], match[4]
            parts = [state[f"{prefix}.{packing}.{part}.{kind}"]
                     for part in ("query", "key", "value")]
            target = f"{prefix}.in_proj_{kind}" if packing == "in_proj" else f"{prefix}.qkv.{kind}"
            packed[target] = torch.cat(parts)
    return packed


def rename_grounding_dino(state: dict[str, Tensor]) -> Renamed:
    """A Hugging Face Grounding DINO state dict (as save_pretrained writes it) in this
    project's names. The tied copies of the shared box head are checked against the first
    layer's and left out; ValueError if they differ (a model with a box head per layer)."""
    return rename_by_rules(state, GROUNDING_DINO_NAMES, GROUNDING_DINO_TIED,
                           GROUNDING_DINO_UNUSED)


def rename_by_rules(state: dict[str, Tensor], rules: list, tied_pattern: re.Pattern,
                    unused_pattern: re.Pattern) -> Renamed:
    """Rename by the first rule that matches; `tied_pattern` (groups: a prefix, the layer,
    the rest) finds the box heads tied to bbox_embed.0, `unused_pattern` what is left out."""
    renamed, unused, unknown = {}, [], []
    for name, tensor in state.items():
        tied = tied_pattern.fullmatch(name)
        if tied and (tied[1] or tied[2] != "0"):
            if not torch.equal(tensor, state[f"bbox_embed.0.{tied[3]}"]):
                raise ValueError(f"{name} differs from bbox_embed.0.{tied[3]}: this model "
                                 "shares one box head across decoder layers, as GD does")
            unused.append(name)
            continue
        if unused_pattern.match(name):
            unused.append(name)
            continue
        for pattern, replacement in rules:    # the first rule that matches
            new_name, found = re.subn("^" + pattern, replacement, name)
            if found:
                renamed[new_name] = tensor
                break
        else:
            unknown.append(name)
    return Renamed(pack_attention(renamed), unused, unknown)


# ------------------------------------------------------------------- loading Grounding DINO
# A Hugging Face Grounding DINO folder becomes this detector, in either form: the hub's
# (config.json, model.safetensors, vocab.txt, preprocessor_config.json, as `huggingface-cli
# download IDEA-Research/grounding-dino-tiny` writes it) or the one transformers 5 saves
# (tokenizer.json and processor_config.json in place of the last two). Every tensor is mapped
# or listed by name; the visual prompt encoder, L_contra's temperature and the denoising
# queries' projection, which GD lacks, start fresh and are named as such.

# GD's settings that this detector computes only one way: key -> the value it must have
# (Hugging Face's defaults).
GROUNDING_DINO_FIXED = dict(two_stage=True, embedding_init_target=True, query_dim=4,
                            decoder_bbox_embed_share=True, two_stage_bbox_embed_share=False,
                            activation_function="relu", position_embedding_type="sine",
                            use_timm_backbone=False)
GROUNDING_DINO_FRESH = ("prompt_encoder.", "logit_scale", "dn_content.")


def grounding_dino_config(folder: str | Path) -> DetectorConfig:
    """The detector a Grounding DINO folder describes: its config.json (an absent key takes
    Hugging Face's default) and its image processor's sizes (GD's 800 and 1333 when there are
    none, see image_processor_settings); the rest from the swin_t preset. ValueError naming
    the file and the first setting this detector does not compute. Of the training-only regularisers, the fusion's
    drop path is read (and BERT's dropout from text_config); the transformer's dropout is not
    computed (GD's own training used none) and Swin has torchvision's stochastic depth 0.2."""
    folder = Path(folder)
    path = required_file(folder, "config.json")
    settings = json.loads(path.read_text())
    if settings.get("model_type") != "grounding-dino":
        raise ValueError(f"{path} describes a {settings.get('model_type')!r} model, not "
                         f"Grounding DINO (model_type 'grounding-dino')")
    for key, value in GROUNDING_DINO_FIXED.items():
        if settings.get(key, value) != value:
            raise ValueError(f"{path}: {key} {settings[key]!r} is not supported, only {value!r}")
    swin = settings.get("backbone_config") or {}
    if swin.get("model_type", "swin") != "swin" or swin.get("out_indices", [2, 3, 4]) != [2, 3, 4]:
        raise ValueError(f"{path}: the backbone must be a Swin read at stages 2-4, got "
                         f"{swin.get('model_type')!r} at {swin.get('out_indices')}")
    size = image_processor_settings(folder).get("size", {})
    return replace(
        PRESETS["swin_t"], hidden_dim=settings.get("d_model", 256),
        num_heads=settings.get("encoder_attention_heads", 8),
        num_levels=settings.get("num_feature_levels", 4),
        num_points=settings.get("encoder_n_points", 4),
        num_encoder_layers=settings.get("encoder_layers", 6),
        num_decoder_layers=settings.get("decoder_layers", 6),
        ffn_dim=settings.get("encoder_ffn_dim", 2048),
        decoder_heads=settings.get("decoder_attention_heads", 8),
        decoder_points=settings.get("decoder_n_points", 4),
        decoder_ffn_dim=settings.get("decoder_ffn_dim", 2048),
        num_queries=settings.get("num_queries", 900),
        position_temperature=float(settings.get("positional_embedding_temperature", 20)),
        swin_embed_dim=swin.get("embed_dim", 96),
        swin_depths=tuple(swin.get("depths", (2, 2, 6, 2))),
        swin_heads=tuple(swin.get("num_heads", (3, 6, 12, 24))),
        swin_window=swin.get("window_size", 7),
        fusion_drop_path=float(settings.get("fusion_droppath", 0.1)),
        text_encoder=str(folder), image_size=size.get("shortest_edge", 800),
        max_size=size.get("longest_edge", 1333), pad_multiple=1)


def image_processor_settings(folder: Path) -> dict:
    """A folder's image processor settings: the hub's preprocessor_config.json, or the
    "image_processor" of the processor_config.json that transformers 5 saves; {} with neither."""
    if (folder / "preprocessor_config.json").is_file():
        return json.loads((folder / "preprocessor_config.json").read_text())
    if (folder / "processor_config.json").is_file():
        return json.loads((folder / "processor_config.json").read_text()).get("image_processor", {})
    return {}


class GroundingDinoWeights(NamedTuple):
    """What load_grounding_dino_weights did."""
    loaded: int            # tensors taken from the folder
    fresh: list[str]       # this detector's modules that GD lacks, left as initialised
    unused: list[str]      # the folder's names left out by design (see rename_grounding_dino)


def load_grounding_dino_weights(model: DINOR1, folder: str | Path) -> GroundingDinoWeights:
    """Load a Grounding DINO folder's weights into `model` (built from grounding_dino_config).
    ValueError naming the weights file and the first name that no rule maps, that the model
    lacks, or whose shape differs."""
    folder = Path(folder)
    state = read_hf_state(folder)
    source = next(folder / name for name in ("model.safetensors", "pytorch_model.bin")
                  if (folder / name).is_file())
    return load_renamed(model, rename_grounding_dino(state), source)


def load_renamed(model: DINOR1, renamed: Renamed, source: Path) -> GroundingDinoWeights:
    """Load Grounding DINO's renamed tensors into `model`: ValueError naming `source` and the
    first name that no rule maps, that the model lacks, or whose shape differs."""
    if renamed.unknown:
        raise ValueError(f"{source}: {len(renamed.unknown)} tensors no rule maps, the first "
                         f"{renamed.unknown[0]!r}")
    ours = model.state_dict()
    computed = {name: ours[name] for name in ours if name.endswith("relative_position_index")}
    for name, tensor in renamed.tensors.items():
        if name not in ours:
            raise ValueError(f"{source}: {name!r} has no place in this detector")
        if tensor.shape != ours[name].shape:
            raise ValueError(f"{source}: {name!r} is {tuple(tensor.shape)} there, "
                             f"{tuple(ours[name].shape)} here")
    absent = [name for name in ours if name not in renamed.tensors and name not in computed
              and not name.startswith(GROUNDING_DINO_FRESH)]
    if absent:
        raise ValueError(f"{source}: {len(absent)} of this detector's tensors are missing, "
                         f"the first {absent[0]!r}")
    model.load_state_dict({**ours, **renamed.tensors}, strict=True)
    fresh = sorted({name.split(".")[0] for name in ours if name.startswith(GROUNDING_DINO_FRESH)})
    return GroundingDinoWeights(len(renamed.tensors), fresh, renamed.unused)


# The original release's checkpoint (groundingdino_swint_ogc.pth: {"model": state dict}, names
# perhaps prefixed "module.") in this project's names, as regular expressions tried in order.
# Its Swin packs q, k and v as torchvision's does, and its attention layers are
# nn.MultiheadAttention, so nothing needs packing.
_ORIGINAL_ENCODER = r"transformer\.encoder\."
_ORIGINAL_DECODER = r"transformer\.decoder\.layers\.(\d+)\."
_ORIGINAL_SWIN_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv",
                        "attn.proj": "attn.proj", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
                        "attn.relative_position_bias_table": "attn.relative_position_bias_table"}
ORIGINAL_GROUNDING_DINO_NAMES = [
    (r"backbone\.0\.patch_embed\.proj\.", "backbone.body.features.0.0."),
    (r"backbone\.0\.patch_embed\.norm\.", "backbone.body.features.0.2."),
    (r"backbone\.0\.layers\.(\d+)\.blocks\.(\d+)\.("
     + "|".join(_ORIGINAL_SWIN_BLOCK).replace(".", r"\.") + r")(\.|$)",
     lambda m: f"backbone.body.features.{2 * int(m[1]) + 1}.{m[2]}."
               f"{_ORIGINAL_SWIN_BLOCK[m[3]]}{m[4]}"),
    (r"backbone\.0\.layers\.(\d+)\.downsample\.",
     lambda m: f"backbone.body.features.{2 * int(m[1]) + 2}."),
    (r"backbone\.0\.norm(\d)\.", lambda m: f"backbone.stage_norms.{int(m[1]) - 1}."),
    (_ORIGINAL_ENCODER + r"layers\.(\d+)\.self_attn\.", r"enhancer.\1.image_self_attention."),
    (_ORIGINAL_ENCODER + r"layers\.(\d+)\.norm1\.", r"enhancer.\1.image_norm."),
    (_ORIGINAL_ENCODER + r"layers\.(\d+)\.linear1\.", r"enhancer.\1.image_ffn.net.0."),
    (_ORIGINAL_ENCODER + r"layers\.(\d+)\.linear2\.", r"enhancer.\1.image_ffn.net.2."),
    (_ORIGINAL_ENCODER + r"layers\.(\d+)\.norm2\.", r"enhancer.\1.image_ffn.norm."),
    (_ORIGINAL_ENCODER + r"text_layers\.(\d+)\.self_attn\.",
     r"enhancer.\1.prompt_self_attention."),
    (_ORIGINAL_ENCODER + r"text_layers\.(\d+)\.norm1\.", r"enhancer.\1.prompt_norm."),
    (_ORIGINAL_ENCODER + r"text_layers\.(\d+)\.linear1\.", r"enhancer.\1.prompt_ffn.net.0."),
    (_ORIGINAL_ENCODER + r"text_layers\.(\d+)\.linear2\.", r"enhancer.\1.prompt_ffn.net.2."),
    (_ORIGINAL_ENCODER + r"text_layers\.(\d+)\.norm2\.", r"enhancer.\1.prompt_ffn.norm."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.gamma_v$", r"enhancer.\1.image_scale"),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.gamma_l$", r"enhancer.\1.prompt_scale"),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.layer_norm_v\.",
     r"enhancer.\1.fusion_image_norm."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.layer_norm_l\.",
     r"enhancer.\1.fusion_prompt_norm."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.attn\.v_proj\.",
     r"enhancer.\1.fusion.image_query."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.attn\.l_proj\.",
     r"enhancer.\1.fusion.prompt_key."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.attn\.values_v_proj\.",
     r"enhancer.\1.fusion.image_value."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.attn\.values_l_proj\.",
     r"enhancer.\1.fusion.prompt_value."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.attn\.out_v_proj\.",
     r"enhancer.\1.fusion.image_output."),
    (_ORIGINAL_ENCODER + r"fusion_layers\.(\d+)\.attn\.out_l_proj\.",
     r"enhancer.\1.fusion.prompt_output."),
    (_ORIGINAL_DECODER + r"cross_attn\.", r"decoder.layers.\1.image_attention."),
    (_ORIGINAL_DECODER + r"norm1\.", r"decoder.layers.\1.image_norm."),
    (_ORIGINAL_DECODER + r"ca_text\.", r"decoder.layers.\1.prompt_attention."),
    (_ORIGINAL_DECODER + r"catext_norm\.", r"decoder.layers.\1.prompt_norm."),
    (_ORIGINAL_DECODER + r"self_attn\.", r"decoder.layers.\1.self_attention."),
    (_ORIGINAL_DECODER + r"norm2\.", r"decoder.layers.\1.self_norm."),
    (_ORIGINAL_DECODER + r"linear1\.", r"decoder.layers.\1.ffn.net.0."),
    (_ORIGINAL_DECODER + r"linear2\.", r"decoder.layers.\1.ffn.net.2."),
    (_ORIGINAL_DECODER + r"norm3\.", r"decoder.layers.\1.ffn.norm."),
    (r"transformer\.decoder\.ref_point_head\.", "decoder.query_pos_head."),
    (r"transformer\.decoder\.norm\.", "decoder.norm."),
    (r"bbox_embed\.0\.", "decoder.box_head."),      # the other layers' are tied to it
    (r"transformer\.enc_output\.", "encoder_output.0."),
    (r"transformer\.enc_output_norm\.", "encoder_output.1."),
    (r"transformer\.enc_out_bbox_embed\.", "encoder_box_head."),
    (r"transformer\.tgt_embed\.", "query_content."),
    (r"transformer\.level_embed$", "backbone.level_embed"),
    (r"input_proj\.", "backbone.projections."),
    (r"bert\.", "text_encoder.bert."),
    (r"feat_map\.", "text_encoder.out."),
]
ORIGINAL_TIED = re.compile(r"(transformer\.decoder\.)?bbox_embed\.(\d+)\.(.*)")
ORIGINAL_UNUSED = re.compile(r".*relative_position_index$|.*attn_mask$|bert\.pooler\."
                             r"|bert\.embeddings\.position_ids$")


def is_original_grounding_dino(checkpoint) -> bool:
    """Whether a loaded checkpoint is the original release's ({"model": its state dict})."""
    return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and any(name.removeprefix("module.") == "transformer.tgt_embed.weight"
                    for name in checkpoint["model"]))


def rename_original_grounding_dino(state: dict[str, Tensor]) -> Renamed:
    """The original release's state dict in this project's names (see rename_grounding_dino
    for the tied box heads)."""
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    return rename_by_rules(state, ORIGINAL_GROUNDING_DINO_NAMES, ORIGINAL_TIED, ORIGINAL_UNUSED)


def load_original_grounding_dino_weights(model: DINOR1, path: str | Path,
                                         checkpoint: dict) -> GroundingDinoWeights:
    """Load the original release's checkpoint (loaded from `path`) into `model`, which must be
    its Swin-T with BERT (`--model swin_t --text-encoder path/to/bert-base-uncased`: the
    checkpoint holds no vocabulary). ValueError naming the file otherwise."""
    if model.config.backbone != "swin" or not isinstance(model.text_encoder, BertTextEncoder):
        raise ValueError(f"{path} is the original Grounding DINO checkpoint: start from it with "
                         f"--model swin_t --text-encoder path/to/bert-base-uncased (the folder "
                         f"of its config.json and vocab.txt or tokenizer.json)")
    return load_renamed(model, rename_original_grounding_dino(checkpoint["model"]), Path(path))


def load_grounding_dino(folder: str | Path, **overrides) -> tuple[DINOR1, GroundingDinoWeights]:
    """A Grounding DINO folder -> this detector with its weights (see grounding_dino_config
    and load_grounding_dino_weights); keyword overrides replace DetectorConfig fields that do
    not change the weights (the kernel)."""
    model = DINOR1(replace(grounding_dino_config(folder), **overrides))
    return model, load_grounding_dino_weights(model, folder)


UNTRAINED_VISUAL_PROMPTS = (
    "{path} is Grounding DINO as published: its visual prompt encoder is untrained, so "
    "only text prompts mean anything; fine-tune it first (train_grqo.py --init {path})")


def load_detector(path: str | Path, **overrides) -> tuple[DINOR1, dict]:
    """What evaluate.py and predict.py take as --ckpt: a checkpoint of this project, or a
    Grounding DINO folder. Returns the detector and the arguments it was trained with (empty
    for a folder). SystemExit naming the path when it cannot be loaded."""
    if Path(path).is_dir():
        try:
            return load_grounding_dino(path, **overrides)[0], {}
        except (OSError, ValueError) as error:
            raise SystemExit(f"cannot load {path}: {error}") from error
    checkpoint = load_checkpoint(str(path))
    return model_from_checkpoint(checkpoint, **overrides), checkpoint.get("args", {})
