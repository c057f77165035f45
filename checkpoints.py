"""Weights in and out: this project's checkpoints (format, loading without pickled code,
rebuilding the detector they hold), and Grounding DINO's public weights (a Hugging Face folder
in either of its forms, or the original release's .pth) in this project's names.
"""

import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from bert import read_hf_state, required_file
from model import PRESETS, BertTextEncoder, DetectorConfig, DINOR1


# ------------------------------------------------------------ this project's checkpoints

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


def is_original_grounding_dino(checkpoint) -> bool:
    """Whether a loaded checkpoint is the original release's ({"model": its state dict})."""
    return (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and any(name.removeprefix("module.") == "transformer.tgt_embed.weight"
                    for name in checkpoint["model"]))


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


# ---------------------------------------------------------------- Grounding DINO's names
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


# ---------------------------------------------------------- the original release's names

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


def rename_original_grounding_dino(state: dict[str, Tensor]) -> Renamed:
    """The original release's state dict in this project's names (see rename_grounding_dino
    for the tied box heads)."""
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    return rename_by_rules(state, ORIGINAL_GROUNDING_DINO_NAMES, ORIGINAL_TIED, ORIGINAL_UNUSED)


# ---------------------------------------------------------------- loading Grounding DINO
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
    the file and the first setting this detector does not compute. Of the training-only
    regularisers, the fusion's drop path is read (and BERT's dropout from text_config); the
    transformer's dropout is not computed (GD's own training used none) and Swin has
    torchvision's stochastic depth 0.2."""
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
