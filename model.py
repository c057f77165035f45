"""The DINO-R1 detector: Grounding DINO with a visual prompt encoder and prompt-guided query
selection (METHOD.md section 2). Its parts come first, in the order the data flows through
them, and the detector that joins them last:

    settings              DetectorConfig and PRESETS: the `tiny`, `swin_t` and `r50` scales
    small parts           sine encodings, MLP, FeedForward, attend
    backbone              Backbone: multi-scale image features (METHOD 2.1), ImageFeatures
    deformable attention  MultiScaleDeformableAttention, through deform_attn.ms_deform_attn
    prompts               PromptTokens: visual prompts (VisualPromptEncoder, 2.2) and class
                          names (BertTextEncoder, 2.3) as one token sequence; L_contra (2.4)
    enhancer              EnhancerLayer: image <-> prompt fusion (2.6)
    query selection       token anchors, SimilarityHead, class_logits, Selection (2.7, 2.9)
    decoder               Decoder: cross-modality decoder, box refinement (2.8)
    denoising queries     build_denoising_queries (2.10)
    detector              DINOR1: encode and forward; build_model
    inference             postprocess: the top (query, prompt) pairs as boxes

BERT and its tokenizer are in bert.py, the Hungarian matcher and the SFT losses in losses.py,
checkpoints and Grounding DINO's weights in checkpoints.py.

Letters, the same in the docstrings of every file but deform_attn/ (which has its own):
    B  images in a batch               S  image tokens, all levels together
    L  feature levels                  d  the width (hidden_dim)
    T  prompt tokens                   K  prompts, one per class
    W  the most tokens of one class    E  exemplar boxes (visual prompts before selection)
    Q  selected (matching) queries     N  decoder queries: N_dn denoising ones, then the Q
    M  ground-truth boxes of an image  R  an attention's queries (S, N or exemplar slots)
    h  attention heads                 D  detections
Conventions:
- boxes are normalised (cx, cy, w, h) in [0, 1], relative to the *unpadded* image;
- masks are True where something is padding (image pixels, tokens or prompts);
- a visual prompt is one token, a class name in a Grounding DINO caption a phrase of tokens;
  class logits (B, Q, K) are read from the per-token logits (B, Q, T) by class_logits.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d, box_convert, stochastic_depth

from bert import Bert, BertConfig, WordPieceTokenizer, generated_vocabulary, load_bert
from bert import read_tokenizer, required_file
from deform_attn import ms_deform_attn

if TYPE_CHECKING:       # only for annotations: the detector does not depend on data.py
    from data import Target, VisualInstructions


# ------------------------------------------------------------------------------ settings

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
    num_queries: int = 100              # Q, the selected tokens
    num_dn_queries: int = 40            # denoising queries, N_dn at most (METHOD 2.10)
    dn_label_noise: float = 0.25        # probability of a wrong prompt on a DN query
    dn_box_noise: float = 1.0           # lambda of DINO's box noise
    text_encoder: str = "generated"     # "generated" (a small BERT, vocabulary made in code)
                                        # or a local BERT folder (see load_bert)
    text_layers: int = 2
    image_size: int = 128               # short side at evaluation
    max_size: int = 171                 # long side cap
    kernel: str = "auto"                # deformable attention backend: auto | torch | triton
    position_temperature: float = 10000.0   # of the image tokens' sine positions (GD: 20)
    class_head: str = "scaled"          # "dot" (GD) | "scaled" (the release's; see SimilarityHead)
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


# --------------------------------------------------------------------------- small parts

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
    safe_mask[:, 0] &= ~all_padding               # a mask, not an index: nothing waits
    out = attention(query, key, value, key_padding_mask=safe_mask, attn_mask=attn_mask,
                    need_weights=False)[0]
    return out * (~all_padding)[:, None, None].to(out.dtype)


# ------------------------------------------------------------------------------ backbone

@dataclass
class ImageFeatures:
    """Multi-scale image tokens, flattened level after level (S = sum of H_l * W_l)."""
    tokens: Tensor             # (B, S, d)
    pos: Tensor                # (B, S, d) sine position + level embedding
    padding_mask: Tensor       # (B, S) True = padding
    spatial_shapes: Tensor     # (L, 2) long, (H_l, W_l)
    level_start_index: Tensor  # (L,) long
    valid_ratios: Tensor       # (B, L, 2) (w, h) fraction of each level that is not padding
    level_shapes: list[tuple[int, int]]  # spatial_shapes on the host: read without a wait


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
            valid_ratios=torch.stack(ratios, 1), level_shapes=shapes)


# ------------------------------------------------------------------ deformable attention

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
        """query (B, R, d); reference (B, R, L, 2) points or (B, R, L, 4) boxes, normalised
        to the padded feature map (already multiplied by valid ratios); value (B, S, d)
        defaults to features.tokens. Returns (B, R, d)."""
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
                             locations, weights.to(value.dtype), backend=self.kernel,
                             level_shapes=features.level_shapes)
        return self.output_proj(out)


def scale_reference(boxes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Boxes or points normalised to the unpadded image (B, R, 4|2) -> per level, normalised
    to each padded feature map: (B, R, L, 4|2)."""
    ratios = valid_ratios if boxes.shape[-1] == 2 else torch.cat([valid_ratios] * 2, -1)
    return boxes[:, :, None] * ratios[:, None]


# ------------------------------------------------------------------------------- prompts

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
    class_tokens: Tensor | None       # (B, K, W) long, the tokens of each class; None: token k
                                      # is class k (T = K)
    class_token_padding: Tensor | None  # (B, K, W) True = no token in that slot


def one_token_per_class(prompts: Tensor, prompt_mask: Tensor | None = None) -> PromptTokens:
    """Ready-made class vectors (B, K, d) as prompts, one token each, as one set
    (visual_phrases); prompt_mask (B, K) True = padding (None: none is)."""
    if prompt_mask is None:
        prompt_mask = torch.zeros(prompts.shape[:2], dtype=torch.bool, device=prompts.device)
    return PromptTokens(prompts, visual_phrases(prompt_mask, prompts.shape[-1]), prompts,
                        prompt_mask, None, None)


def expand_prompts(prompts: PromptTokens, batch: int) -> PromptTokens:
    """Prompts of a batch of one, shown to every image of a batch of `batch` (no copy)."""
    def expand(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.expand(batch, *x.shape[1:])
    return PromptTokens(expand(prompts.tokens), Phrases(*map(expand, prompts.phrases)),
                        *map(expand, prompts[2:]))


MAX_TEXT_TOKENS = 256      # Grounding DINO's max_text_len


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
        self.register_buffer("delimiters", self.delimiter_ids(tokenizer), persistent=False)

    @staticmethod
    def delimiter_ids(tokenizer: WordPieceTokenizer) -> Tensor:
        """The ids that end a caption's phrases (caption_phrases): [CLS], [SEP], "." and "?"."""
        return torch.tensor([tokenizer.ids[token] for token in ("[CLS]", "[SEP]", ".", "?")
                             if token in tokenizer.ids])

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
        device = self.delimiters.device
        ids, spans = self.caption_ids(names)
        tokens, phrases = self.encode_ids(torch.tensor([ids], device=device))
        width = max(end - start for start, end in spans)
        slots = torch.arange(width, device=device)
        starts, ends = (torch.tensor(part, device=device) for part in zip(*spans))
        class_tokens = (starts[:, None] + slots).clamp(max=len(ids) - 1)[None]    # (1, K, W)
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

    def forward(self, features: ImageFeatures, image_index: Tensor, boxes: Tensor,
                max_per_image: int | None = None) -> Tensor:
        """image_index (E,) long: the image each box is on; boxes (E, 4) cxcywh. -> (E, d).
        max_per_image: the most boxes on one image, or more, when the caller knows it on the
        host (training's VisualInstructions do); else it is read from image_index, which
        makes the host wait for the device (as flash attention's max_seqlen arguments)."""
        batch, d = features.tokens.shape[0], self.query.shape[0]
        if boxes.shape[0] == 0:
            return features.tokens.new_zeros(0, d)
        # Lay the exemplars out as (B, slots) so each one reads the features of its own image:
        # slot = how many boxes of its image come before it.
        on_image = (image_index[:, None] == torch.arange(batch, device=image_index.device)
                    ).long()                                   # (E, B); F.one_hot reads max
        slot = (on_image.cumsum(0) * on_image).sum(1) - 1                     # (E,)
        num_slots = max_per_image if max_per_image is not None else int(on_image.sum(0).max())
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
    """METHOD 2.4: visual (E, d) exemplar embeddings with labels (E,) in 0..K-1, text (K, d).

    Returns (K, K) logits between each class's mean visual embedding and every class's text
    embedding; the symmetric InfoNCE over them (SetCriterion) is L_contra.
    """
    num_classes = text.shape[0]
    sums = visual.new_zeros(num_classes, visual.shape[1]).index_add(0, labels, visual)
    counts = sums.new_zeros(num_classes).index_add(0, labels, sums.new_ones(len(labels)))
    means = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
    return logit_scale.exp().clamp(max=100) * means @ F.normalize(text, dim=-1).T


# ------------------------------------------------------------------------------ enhancer

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
        logits = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5      # (B, h, S, T)
        # Logits within 50000 of their maximum, as GD keeps them for half precision (GD
        # shifts by the global maximum and clamps twice; the softmax is the same).
        logits = (logits - logits.amax((-2, -1), keepdim=True)).clamp(min=-50000)
        lowest = torch.finfo(logits.dtype).min
        to_prompts = logits.masked_fill(prompt_padding[:, None, None, :], lowest).softmax(-1)
        to_image = logits.transpose(-1, -2).masked_fill(
            image_padding[:, None, None, :], lowest).softmax(-1)                # (B, h, T, S)
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
                self.prompt_self_attention.num_heads, dim=0)      # (B * heads, T, T)
            prompts = self.prompt_norm(prompts + attend(
                self.prompt_self_attention, positioned, positioned, prompts, attn_mask=elsewhere))
            prompts = self.prompt_ffn(prompts)
        attended = self.image_self_attention(image + features.pos, reference_points, features,
                                             value=image)
        image = self.image_ffn(self.image_norm(image + attended))
        return image, prompts

    def fusion_drop_path(self, x: Tensor) -> Tensor:
        """x (B, S, d) or (B, T, d): one side's fusion update. In training each sample's is
        dropped with probability fusion_drop_path, the kept ones scaled up to match, as GD's
        DropPath does (the image side and the prompt side draw apart)."""
        return stochastic_depth(x, self.fusion_drop_rate, "row", self.training)


def token_centres(features: ImageFeatures) -> Tensor:
    """The centre of every token, normalised to its level's unpadded extent: (B, S, 2)."""
    centres = []
    for level, (height, width) in enumerate(features.level_shapes):
        y, x = torch.meshgrid(torch.arange(height, device=features.tokens.device) + 0.5,
                              torch.arange(width, device=features.tokens.device) + 0.5,
                              indexing="ij")
        ratios = features.valid_ratios[:, level]                               # (B, 2) (w, h)
        x = x.flatten()[None] / (ratios[:, None, 0] * width)
        y = y.flatten()[None] / (ratios[:, None, 1] * height)
        centres.append(torch.stack([x, y], -1))
    return torch.cat(centres, 1)


# ----------------------------------------------------------------------- query selection

def token_anchors(features: ImageFeatures) -> tuple[Tensor, Tensor]:
    """One anchor box per token (METHOD 2.7): at its centre, side 0.05 * 2^level. Returns the
    anchors in inverse-sigmoid space (B, S, 4) and which are valid (B, S): an image token whose
    anchor lies inside (0.01, 0.99). Invalid ones are +inf, a box at (1, 1, 1, 1) (as in GD)."""
    centres = token_centres(features)
    sides = [torch.full((h * w,), 0.05 * 2 ** level, device=centres.device)
             for level, (h, w) in enumerate(features.level_shapes)]
    sides = torch.cat(sides)[None, :, None].expand(centres.shape[0], -1, 2)
    anchors = torch.cat([centres, sides], -1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~features.padding_mask
    return torch.log(anchors / (1 - anchors)).masked_fill(~valid[..., None], math.inf), valid


class SimilarityHead(nn.Module):
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


def class_logits(token_logits: Tensor, prompts: PromptTokens) -> Tensor:
    """Per-token logits (..., B, Q, T) -> per-class logits (..., B, Q, K): the logit of the mean
    of the sigmoids over each class's tokens (Grounding DINO's COCO rule; a one-token class
    keeps its token's logit), computed in log space. Padding classes get -1e4."""
    if prompts.class_tokens is None:
        return token_logits
    num_classes, width = prompts.class_tokens.shape[1:]
    index = prompts.class_tokens.flatten(1)[:, None, :]                      # (B, 1, K * W)
    gathered = token_logits.gather(-1, index.expand(*token_logits.shape[:-1], -1))
    gathered = gathered.unflatten(-1, (num_classes, width))                 # (..., B, Q, K, W)
    padding = prompts.class_token_padding[:, None]                          # (B, 1, K, W)
    positive = F.logsigmoid(gathered).masked_fill(padding, -math.inf).logsumexp(-1)
    negative = F.logsigmoid(-gathered).masked_fill(padding, -math.inf).logsumexp(-1)
    return torch.where(prompts.class_mask[:, None], -1e4, positive - negative)


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


@dataclass
class Selection:
    """Prompt-guided query selection (METHOD 2.7); queries in rank order (see select_queries)."""
    indices: Tensor             # (B, Q) long, token index into the S encoder tokens
    objectness_logits: Tensor   # (B, Q) s_i; O_i = sigmoid(s_i)


def gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """tokens (B, S, C), indices (B, Q) -> (B, Q, C)."""
    return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


# ------------------------------------------------------------------------------- decoder

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
        """queries, query_pos (B, N, d); reference (B, N, L, 4); attn_mask (N, N) True =
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
        """queries (B, N, d), reference (B, N, 4) cxcywh. Returns hidden states
        (layers, B, N, d), normed, and boxes (layers, B, N, 4)."""
        hidden, boxes = [], []
        for layer in self.layers:
            scaled = scale_reference(reference, features.valid_ratios)           # (B, N, L, 4)
            sine = sine_encoding(scaled[:, :, 0, [1, 0, 2, 3]], queries.shape[-1] // 2)
            queries = layer(queries, self.query_pos_head(sine).to(queries.dtype), scaled,
                            features, memory, prompts, prompt_mask, attn_mask)
            normed = self.norm(queries)
            previous = inverse_sigmoid(reference)
            hidden.append(normed)
            boxes.append((self.box_head(normed).float() + previous).sigmoid())
            reference = (self.box_head(queries).float() + previous).sigmoid().detach()
        return torch.stack(hidden), torch.stack(boxes)


# --------------------------------------------------------------------- denoising queries
# As in DINO: noised copies of the ground-truth boxes are fed to the decoder beside the
# matching queries and must be recovered without matching; an attention mask keeps them from
# leaking into the matching queries.

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


@dataclass
class DenoisingTargets:
    """Where the denoising (DN) queries sit and what they must recover (METHOD 2.10)."""
    labels: Tensor     # (B, N_dn) long, prompt index each DN query should predict
    boxes: Tensor      # (B, N_dn, 4) ground-truth cxcywh each positive should recover
    positive: Tensor   # (B, N_dn) bool, True = a positive (box and class targets)
    valid: Tensor      # (B, N_dn) bool, False = a padding slot (no loss at all)
    num_groups: int    # each group holds one positive and one negative per ground truth


class DenoisingQueries(NamedTuple):
    """What `build_denoising_queries` adds to the decoder's input, N_dn queries."""
    prompts: Tensor                # (B, N_dn, d) the (possibly wrong) prompt of each DN query
    reference: Tensor              # (B, N_dn, 4) noised boxes, cxcywh
    attn_mask: Tensor              # (N, N) bool, N = N_dn + Q; True = may not attend
    targets: DenoisingTargets


def build_denoising_queries(targets: list["Target"], prompts: Tensor, num_matching: int,
                            config: DetectorConfig, generator: torch.Generator | None = None
                            ) -> DenoisingQueries | None:
    """Denoising queries for a batch (DINO's contrastive denoising: positive and negative
    copies); None when there is nothing to denoise.

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


# ------------------------------------------------------------------------------ detector

@dataclass
class Encoded:
    """The encoder side of one forward pass: everything before the decoder."""
    features: ImageFeatures
    prompts: PromptTokens      # as given or sampled, before the enhancer (T tokens, K classes)
    exemplars: Tensor | None   # (E, d) every exemplar's embedding (with instructions only)
    memory: Tensor             # (B, S, d) enhanced image tokens
    enhanced: Tensor           # (B, T, d) enhanced prompt tokens
    anchors: Tensor            # (B, S, 4) each token's anchor box, inverse sigmoid (+inf:
                               # not a valid proposal, see token_anchors)
    proposal_features: Tensor  # (B, S, d) the memory after the encoder output layer, read
                               # by the encoder's class and box heads
    token_logits: Tensor       # (B, S, T) every image token against every prompt token
    token_objectness: Tensor   # (B, S) s_n = the max of token_logits (METHOD 2.7)


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


# The prompts DINOR1.encode and forward take: ready-made tokens, this batch's visual
# instructions, or class names (see DINOR1.encode).
Prompting = Union[PromptTokens, "VisualInstructions", list[str]]


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
        self.encoder_class_head = SimilarityHead(d, config.class_head)
        self.encoder_box_head = MLP(d, d, 4, 3)
        self.query_content = nn.Embedding(config.num_queries, d)
        self.dn_content = nn.Linear(d, d)
        self.decoder = Decoder(config)
        self.decoder_class_head = SimilarityHead(d, config.class_head)

    # -- prompts ------------------------------------------------------------------------

    def encode_exemplars(self, images: Tensor, mask: Tensor, image_index: Tensor,
                         boxes: Tensor) -> Tensor:
        """Visual prompt embeddings for exemplar boxes (cxcywh) on these images: (E, d), E
        boxes; one_token_per_class makes prompts of them (prototypes, predict.py's boxes)."""
        return self.prompt_encoder(self.backbone(images, mask), image_index, boxes)

    def prompt_tokens(self, features: ImageFeatures, prompts: Prompting
                      ) -> tuple[PromptTokens, Tensor | None]:
        """The K prompts every image of the batch reads, from any of the forms `encode`
        takes, and, for visual instructions, every exemplar's embedding (E, d) (else None).
        Visual instructions (METHOD 2.5): every exemplar is encoded from this pass's features,
        and one per class becomes the prompt of every image. Class names: Grounding DINO's
        caption ("cat . remote control .", see BertTextEncoder.caption)."""
        batch = features.tokens.shape[0]
        if isinstance(prompts, PromptTokens):
            return prompts, None
        if isinstance(prompts, list) and all(isinstance(name, str) for name in prompts):
            return expand_prompts(self.text_encoder.caption(prompts), batch), None
        if not all(hasattr(prompts, field) for field in ("image_index", "boxes", "selected")):
            raise TypeError(f"prompts must be PromptTokens (see one_token_per_class for class "
                            f"vectors), VisualInstructions or a list of class names, not "
                            f"{type(prompts).__name__}")
        embeddings = self.prompt_encoder(features, prompts.image_index, prompts.boxes,
                                         getattr(prompts, "max_per_image", None))
        chosen = embeddings[prompts.selected].expand(batch, -1, -1)
        return one_token_per_class(chosen), embeddings

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
        """METHOD 2.7: s_n = max_k (I'_n . v'_k) (+ scale and bias, see SimilarityHead) for
        every token. memory (B, S, d), prompts (B, T, d) enhanced, prompt_mask (B, T) True =
        padding; valid (B, S): tokens with a valid anchor (token_anchors).

        Returns the proposal features (B, S, d), token logits (B, S, T) and every token's
        objectness logit s_n (B, S). As in Grounding DINO, the tokens that are not valid enter
        the output layer as zeros, so they score a constant and can still be selected (their
        box is the corner (1, 1, 1, 1)); with no prompts at all every token scores 0.
        """
        proposal_features = self.encoder_output(memory.masked_fill(~valid[..., None], 0))
        logits = self.encoder_class_head(proposal_features, prompts, prompt_mask)
        if logits.shape[-1] > 0:
            token_objectness = logits.max(-1).values
        else:
            token_objectness = logits.new_zeros(logits.shape[:2])
        return proposal_features, logits, token_objectness.float()

    def select_queries(self, token_objectness: Tensor, valid: Tensor) -> Selection:
        """The top Q tokens by objectness logit s_n (B, S), in descending order (METHOD 2.7).
        valid (B, S): tokens with a valid anchor (token_anchors).

        Grounding DINO ranks every token, so padding and edge tokens, at their constant score,
        compete too (`select_invalid_tokens`, set for swin_t and GD's weights): harmless with
        900 of some 20,000 tokens. The tiny preset selects 100 of about 340, and in its
        multi-scale training batches a third of the tokens are padding: ranked with the rest
        they took half of the queries (docs/EXPERIMENTS.md). There invalid tokens are ranked
        after every valid one (selected only where an image has fewer valid tokens than
        queries), so the order is by score among the valid, then among the invalid."""
        ranked = token_objectness
        if not self.config.select_invalid_tokens:
            ranked = token_objectness.masked_fill(~valid, -math.inf)
        indices = ranked.topk(min(self.config.num_queries, ranked.shape[1]), dim=1).indices
        return Selection(indices=indices, objectness_logits=token_objectness.gather(1, indices))

    # -- the two passes ------------------------------------------------------------------

    def encode(self, images: Tensor, mask: Tensor, prompts: Prompting) -> Encoded:
        """Backbone, prompts, feature enhancer and token scores: all that comes before the
        decoder, which `forward` reads (`selected_objectness` runs its first part). images
        (B, 3, H, W), mask (B, H, W) True = padding. `prompts` is one of:
        - PromptTokens, ready-made: generic prototypes or exemplars' embeddings (see
          one_token_per_class), or a caption (BertTextEncoder.caption, expand_prompts);
        - VisualInstructions (training): exemplar boxes of this batch, encoded in this pass;
        - a list of K class names, read as one caption by the text encoder.
        The last two are encoded inside the pass because they read its backbone features,
        or, under DDP, must run inside `forward` (see prompt_tokens)."""
        features, tokens, exemplars, memory, enhanced = self.enhanced(images, mask, prompts)
        anchors, valid = token_anchors(features)
        proposal_features, token_logits, token_objectness = self.score_tokens(
            memory, valid, enhanced, tokens.phrases.padding)
        return Encoded(features, tokens, exemplars, memory, enhanced, anchors,
                       proposal_features, token_logits, token_objectness)

    def enhanced(self, images: Tensor, mask: Tensor, prompts: Prompting) -> tuple:
        """encode's first part: (features, PromptTokens, exemplars (E, d) or None, memory
        (B, S, d), enhanced prompt tokens (B, T, d))."""
        features = self.backbone(images, mask)
        tokens, exemplars = self.prompt_tokens(features, prompts)
        memory, enhanced = self.enhance(features, tokens.tokens, tokens.phrases)
        return features, tokens, exemplars, memory, enhanced

    def selected_objectness(self, images: Tensor, mask: Tensor, prompts: Prompting,
                            indices: Tensor) -> Tensor:
        """The light path for the GRQO reference model: the objectness logits s (B, Q) of the
        given token indices (B, Q), e.g. the ones the policy selected. `encode` up to the
        enhancer, then the scores of those tokens only; no decoder."""
        features, tokens, _, memory, enhanced = self.enhanced(images, mask, prompts)
        _, valid = token_anchors(features)
        return self.score_tokens(gather_tokens(memory, indices), valid.gather(1, indices),
                                 enhanced, tokens.phrases.padding)[2]

    def forward(self, images: Tensor, mask: Tensor, prompts: Prompting, *,
                dn_targets: list["Target"] | None = None,
                generator: torch.Generator | None = None) -> DetectorOutput:
        """images (B, 3, H, W) normalised, mask (B, H, W) True = padding; prompts as in
        `encode` (visual instructions also yield L_contra's logits). `dn_targets` (training
        only) adds denoising queries, their noise drawn from `generator`."""
        encoded = self.encode(images, mask, prompts)
        features, tokens = encoded.features, encoded.prompts
        token_padding = tokens.phrases.padding
        selection = self.select_queries(encoded.token_objectness,
                                        encoded.anchors.isfinite().all(-1))
        anchors = gather_tokens(encoded.anchors, selection.indices)
        proposals = gather_tokens(encoded.proposal_features, selection.indices)
        encoder_boxes = (self.encoder_box_head(proposals).float() + anchors).sigmoid()
        # "Mixed" query selection: learned content, positions from the selected proposals.
        queries = self.query_content.weight.expand(images.shape[0], -1, -1)
        queries = queries[:, :encoder_boxes.shape[1]]
        reference, attn_mask, denoising = encoder_boxes.detach(), None, None
        if self.training and dn_targets is not None:
            denoising = build_denoising_queries(dn_targets, tokens.classes, queries.shape[1],
                                                self.config, generator)
        if denoising is not None:
            queries = torch.cat([self.dn_content(denoising.prompts).to(queries.dtype), queries], 1)
            reference = torch.cat([denoising.reference, reference], 1)
            attn_mask = denoising.attn_mask
        hidden, boxes = self.decoder(queries, reference, features, encoded.memory,
                                     encoded.enhanced, token_padding, attn_mask)
        token_logits = self.decoder_class_head(hidden, encoded.enhanced, token_padding).float()
        logits = class_logits(token_logits, tokens)
        num_dn = 0 if denoising is None else denoising.reference.shape[1]
        encoder_token_logits = gather_tokens(encoded.token_logits, selection.indices).float()
        outside_logits, outside_mask = None, None
        if self.training:
            outside_logits, outside_mask = outside_token_logits(
                token_logits[:, :, num_dn:], encoder_token_logits, tokens)
        contrast = None
        if encoded.exemplars is not None:           # visual instructions
            contrast = contrastive_logits(encoded.exemplars, prompts.labels,
                                          self.text_encoder(prompts.class_names),
                                          self.logit_scale)
        return DetectorOutput(
            logits=logits[:, :, num_dn:], boxes=boxes[:, :, num_dn:],
            encoder_logits=class_logits(encoder_token_logits, tokens),
            encoder_boxes=encoder_boxes, selection=selection, prompt_mask=tokens.class_mask,
            dn_logits=logits[:, :, :num_dn] if num_dn else None,
            dn_boxes=boxes[:, :, :num_dn] if num_dn else None,
            dn_targets=None if denoising is None else denoising.targets,
            contrastive_logits=contrast, outside_logits=outside_logits,
            outside_mask=outside_mask)


def build_model(preset: str = "tiny", **overrides) -> "DINOR1":
    """The detector at a named scale; keyword overrides replace DetectorConfig fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return DINOR1(replace(PRESETS[preset], **overrides))


# ----------------------------------------------------------------------------- inference

@dataclass
class Detections:
    """One image's detections, in original image pixels."""
    boxes: Tensor    # (D, 4) xyxy, D detections
    scores: Tensor   # (D,)
    labels: Tensor   # (D,) long, prompt index


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
