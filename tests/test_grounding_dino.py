"""Grounding DINO compatibility, module by module: this project's modules against Hugging
Face transformers' GroundingDino (the oracle, a test-only dependency) on tiny random
configurations, every weight perturbed where a module has any."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from checkpoints import grounding_dino_config, rename_grounding_dino
from model import (PRESETS, Backbone, Decoder, DetectorConfig, EnhancerLayer, build_model,
                   caption_phrases, one_token_per_class, scale_reference, sine_encoding,
                   sine_positions, token_anchors, token_centres)

transformers = pytest.importorskip("transformers")
grounding_dino = pytest.importorskip("transformers.models.grounding_dino.modeling_grounding_dino")


def padded_mask(batch: int = 2, height: int = 7, width: int = 9) -> torch.Tensor:
    """(B, H, W) 1 = image, 0 = padding: the second image is padded right and below."""
    not_mask = torch.ones(batch, height, width)
    not_mask[1, height - 2:] = 0
    not_mask[1, :, width - 3:] = 0
    return not_mask


@pytest.mark.parametrize("temperature", [20.0, 10000.0])
def test_image_positions_equal_grounding_dinos(temperature):
    config = transformers.GroundingDinoConfig(d_model=64,
                                              positional_embedding_temperature=int(temperature))
    oracle = grounding_dino.GroundingDinoSinePositionEmbedding(config)
    not_mask = padded_mask()
    expected = oracle(torch.zeros(2, 3, 7, 9), not_mask.long()).permute(0, 2, 3, 1)
    ours = sine_positions(not_mask, 64, temperature)
    valid = not_mask.bool()            # padding pixels' positions are never read
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)


def test_the_backbone_positions_its_tokens_at_the_configured_temperature():
    assert PRESETS["swin_t"].position_temperature == transformers.GroundingDinoConfig(
    ).positional_embedding_temperature == 20
    model = build_model("tiny", kernel="torch", position_temperature=20.0).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96),
                                  torch.zeros(1, 64, 96, dtype=torch.bool))
    height, width = features.spatial_shapes[0].tolist()            # level 0, no padding
    expected = sine_positions(torch.ones(1, height, width), model.config.hidden_dim, 20.0)
    expected = expected.flatten(1, 2) + model.backbone.level_embed[0]
    torch.testing.assert_close(features.pos[:, :height * width], expected)


# ----------------------------------------------------------------------------- module by module

def oracle_config(**overrides) -> "transformers.GroundingDinoConfig":
    """GD at the tiny preset's sizes: d 64, 4 heads, FFN 256, 4 levels of 4 points."""
    sizes = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=256, decoder_ffn_dim=256, encoder_layers=2, decoder_layers=3,
                 num_feature_levels=4, encoder_n_points=4, decoder_n_points=4, num_queries=7)
    return transformers.GroundingDinoConfig(**{**sizes, **overrides})


def perturbed(module: nn.Module) -> nn.Module:
    """Every weight moved at random (GD zero-initialises several layers, which would hide a
    wrong mapping), in eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return module.eval()


def load_renamed(ours: nn.Module, oracle: nn.Module, oracle_prefix: str, our_prefix: str):
    """Load the oracle module's weights into ours through rename_grounding_dino, strictly."""
    state = {oracle_prefix + name: tensor for name, tensor in oracle.state_dict().items()}
    renamed, _, unknown = rename_grounding_dino(state)
    assert unknown == []
    ours.load_state_dict({name.removeprefix(our_prefix): tensor
                          for name, tensor in renamed.items()}, strict=True)
    return ours.eval()


def padded_features():
    """Real multi-scale features of a padded batch: the second image is padded right and below."""
    torch.manual_seed(0)
    backbone = build_model("tiny", kernel="torch").backbone.eval()
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 80:], mask[1, :, 96:] = True, True
    with torch.no_grad():
        return backbone(torch.randn(2, 3, 96, 128), mask)


def two_captions(dim: int):
    """Two captions as GD's token ids ([CLS] 101, [SEP] 102, "." 1012), the second padded, as
    Phrases (GD's sub-sentence mask and phrase-local positions, see caption_phrases)."""
    input_ids = torch.tensor([[101, 2005, 2006, 1012, 2007, 1012, 102],
                              [101, 2008, 1012, 102, 0, 0, 0]])
    phrases = caption_phrases(input_ids, input_ids == 0, SPECIAL_IDS, dim)
    return phrases, phrases.position_ids


SPECIAL_IDS = torch.tensor([101, 102, 1012, 1029])    # [CLS], [SEP], ".", "?" (GD hard-codes)


def test_caption_phrases_equal_grounding_dinos_sub_sentence_masks():
    """Phrases with and without a closing ".", "?", padding, a caption filling the sequence."""
    input_ids = torch.tensor([[101, 2005, 2006, 1012, 2007, 1012, 102, 0, 0],
                              [101, 2008, 1029, 2009, 2010, 2011, 102, 0, 0],
                              [101, 2008, 1012, 2002, 1012, 2003, 2004, 1012, 102]])
    attention, position_ids = grounding_dino.generate_masks_with_special_tokens_and_transfer_map(
        input_ids, SPECIAL_IDS)
    phrases = caption_phrases(input_ids, input_ids == 0, SPECIAL_IDS, 64)
    assert torch.equal(phrases.attention, attention)
    assert torch.equal(phrases.position_ids, position_ids)
    assert phrases.position_ids[2].tolist() == [0, 0, 1, 0, 1, 0, 1, 2, 0]
    torch.testing.assert_close(phrases.pos[2, 2], sine_encoding(torch.ones(1), 64))


def test_the_enhancer_layer_equals_grounding_dinos_encoder_layer():
    """Bi-directional fusion, text self-attention within phrases with phrase-local positions,
    deformable image self-attention: GD's encoder layer on a padded batch."""
    config = oracle_config()
    oracle = perturbed(grounding_dino.GroundingDinoEncoderLayer(config))
    ours = load_renamed(EnhancerLayer(DetectorConfig(kernel="torch")), oracle,
                        "model.encoder.layers.0.", "enhancer.0.")
    features = padded_features()
    phrases, position_ids = two_captions(64)
    prompts = torch.randn(2, 7, 64)
    shapes = [tuple(shape) for shape in features.spatial_shapes.tolist()]
    reference = grounding_dino.GroundingDinoEncoder.get_reference_points(
        shapes, features.valid_ratios, "cpu")
    torch.testing.assert_close(scale_reference(token_centres(features), features.valid_ratios),
                               reference)
    with torch.no_grad():
        (image, text), _ = oracle(
            vision_features=features.tokens, vision_position_embedding=features.pos,
            spatial_shapes=features.spatial_shapes, spatial_shapes_list=shapes,
            level_start_index=features.level_start_index,
            key_padding_mask=features.padding_mask, reference_points=reference,
            text_features=prompts, text_attention_mask=phrases.padding,
            text_self_attention_masks=~phrases.attention, text_position_ids=position_ids)
        our_image, our_text = ours(features.tokens, prompts, phrases, features, reference)
    torch.testing.assert_close(our_image, image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(our_text, text, atol=1e-4, rtol=1e-4)


def test_the_fusions_drop_path_drops_each_samples_update_in_training_only(tmp_path):
    """fusion_drop_path 1 drops the fusion's update of every sample, image side and prompt
    side, in training: the layer then computes as with zero layer scales; at 0.5 each sample's
    update on each side is dropped or kept (scaled up) on its own; evaluation drops nothing.
    GD's rate is read from a folder's config.json (default 0.1)."""
    features, (phrases, _) = padded_features(), two_captions(64)
    prompts = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(0))
    reference = scale_reference(token_centres(features), features.valid_ratios)

    def run(drop_path: float, scale: float, training: bool, draw: int = 0):
        """The layer's (image, prompts)."""
        torch.manual_seed(0)
        layer = EnhancerLayer(DetectorConfig(kernel="torch", fusion_drop_path=drop_path))
        layer.image_scale.data.fill_(scale)
        layer.prompt_scale.data.fill_(scale)
        torch.manual_seed(draw)                             # the drop path's draw
        with torch.no_grad():
            return layer.train(training)(features.tokens, prompts, phrases, features, reference)

    fused, unfused, doubled = run(0.0, 1.0, True), run(0.0, 0.0, True), run(0.0, 2.0, True)
    for side in (0, 1):                                 # image, prompts
        assert not torch.allclose(fused[side], unfused[side])
        torch.testing.assert_close(run(1.0, 1.0, True)[side], unfused[side])
        torch.testing.assert_close(run(1.0, 1.0, False)[side], fused[side])
    fates = set()
    for draw in range(8):
        outputs = run(0.5, 1.0, True, draw)
        for side in (0, 1):
            dropped = tuple(torch.allclose(sample, unfused[side][i])
                            for i, sample in enumerate(outputs[side]))
            assert all(gone or torch.allclose(sample, doubled[side][i], atol=1e-5)
                       for i, (gone, sample) in enumerate(zip(dropped, outputs[side])))
            fates.add((side, dropped))
    for side in (0, 1):                                 # samples apart, not the batch at once
        assert (side, (True, False)) in fates or (side, (False, True)) in fates
    (tmp_path / "config.json").write_text('{"model_type": "grounding-dino"}')
    assert grounding_dino_config(tmp_path).fusion_drop_path == 0.1 == \
        PRESETS["swin_t"].fusion_drop_path
    (tmp_path / "config.json").write_text('{"model_type": "grounding-dino", '
                                          '"fusion_droppath": 0.3}')
    assert grounding_dino_config(tmp_path).fusion_drop_path == 0.3


def test_the_decoder_equals_grounding_dinos_with_its_shared_box_head():
    """Query positions from the reference boxes, the layers, the references refined from the
    layers' outputs and the boxes reported from their normed outputs (as
    GroundingDinoForObjectDetection reads them)."""
    config = oracle_config()
    oracle = grounding_dino.GroundingDinoDecoder(config)
    box_head = grounding_dino.GroundingDinoMLPPredictionHead(64, 64, 4, 3)
    oracle.bbox_embed = nn.ModuleList([box_head] * config.decoder_layers)
    perturbed(oracle)
    state = {**{f"model.decoder.{k}": v for k, v in oracle.state_dict().items()
                if not k.startswith("bbox_embed.")},
             **{f"bbox_embed.0.{k}": v for k, v in box_head.state_dict().items()}}
    ours = Decoder(DetectorConfig(kernel="torch")).eval()
    renamed, _, unknown = rename_grounding_dino(state)
    assert unknown == []
    ours.load_state_dict({k.removeprefix("decoder."): v for k, v in renamed.items()}, strict=True)
    features = padded_features()
    memory, queries = torch.randn_like(features.tokens), torch.randn(2, 7, 64)
    reference = torch.rand(2, 7, 4) * 0.8 + 0.1
    prompts, prompt_padding = torch.randn(2, 5, 64), torch.zeros(2, 5, dtype=torch.bool)
    prompt_padding[1, 3:] = True
    shapes = [tuple(shape) for shape in features.spatial_shapes.tolist()]
    with torch.no_grad():
        out = oracle(inputs_embeds=queries, vision_encoder_hidden_states=memory,
                     vision_encoder_attention_mask=~features.padding_mask,
                     text_encoder_hidden_states=prompts,
                     text_encoder_attention_mask=prompt_padding, reference_points=reference,
                     spatial_shapes=features.spatial_shapes, spatial_shapes_list=shapes,
                     level_start_index=features.level_start_index,
                     valid_ratios=features.valid_ratios)
        inputs = torch.cat([reference[:, None], out.intermediate_reference_points[:, :-1]], 1)
        boxes = (box_head(out.intermediate_hidden_states)
                 + torch.special.logit(inputs, eps=1e-5)).sigmoid()
        hidden, our_boxes = ours(queries, reference, features, memory, prompts, prompt_padding,
                                 None)
    torch.testing.assert_close(hidden.transpose(0, 1), out.intermediate_hidden_states,
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(our_boxes.transpose(0, 1), boxes, atol=1e-5, rtol=1e-4)


def test_proposals_and_token_scores_equal_grounding_dinos():
    """The encoder output layer on masked tokens, anchors (+inf where not valid, padding
    included), GD's dot-product class head and the top-k over each token's best logit."""
    config = oracle_config(num_queries=50)
    tiny = build_model("tiny", kernel="torch", class_head="dot", select_invalid_tokens=True)
    holder = nn.Module()
    holder.enc_output, holder.enc_output_norm = nn.Linear(64, 64), nn.LayerNorm(64)
    perturbed(holder)
    state = {f"model.{k}": v for k, v in holder.state_dict().items()}
    renamed = rename_grounding_dino(state).tensors
    tiny.encoder_output.load_state_dict({k.removeprefix("encoder_output."): v
                                         for k, v in renamed.items()})
    features = padded_features()
    memory, prompts = torch.randn_like(features.tokens), torch.randn(2, 5, 64)
    prompt_padding = torch.zeros(2, 5, dtype=torch.bool)
    prompt_padding[1, 3:] = True
    shapes = [tuple(shape) for shape in features.spatial_shapes.tolist()]
    with torch.no_grad():
        proposals_of = grounding_dino.GroundingDinoModel.generate_encoder_output_proposals
        object_query, proposals = proposals_of(holder, memory, features.padding_mask, shapes)
        logits = grounding_dino.GroundingDinoContrastiveEmbedding(config)(
            object_query, prompts, ~prompt_padding)
        anchors, valid = token_anchors(features)
        proposal_features, token_logits, objectness = tiny.score_tokens(
            memory, valid, prompts, prompt_padding)
    assert features.padding_mask.any() and not valid[features.padding_mask].any()
    torch.testing.assert_close(anchors, proposals)
    torch.testing.assert_close(proposal_features, object_query, atol=1e-5, rtol=1e-5)
    real = ~prompt_padding[:, None, :].expand_as(token_logits)
    torch.testing.assert_close(token_logits[real], logits[..., :5][real], atol=1e-4, rtol=1e-4)
    # 200 of 256 tokens, more than the padded image has proposals: GD ranks the rest by score
    theirs = logits.max(-1).values.topk(200).indices
    tiny.config.num_queries = 200
    assert torch.equal(tiny.select_queries(objectness, valid).indices, theirs)


def saved_state_file(folder) -> dict:
    """The tensors of a folder's model.safetensors: name -> tensor."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def saved_state(oracle: nn.Module, folder) -> dict:
    """What the oracle's save_pretrained writes (the hub's names): name -> tensor."""
    oracle.save_pretrained(folder)
    return saved_state_file(folder)


def test_the_swin_backbone_and_neck_equal_grounding_dinos(tmp_path):
    """A small Swin (every weight perturbed) through GD's backbone: the patch embedding padded
    to a multiple of 4, a LayerNorm per used stage, the neck's 1x1 and stride-2 levels with
    GroupNorm(32), sine positions plus level embeddings; a padded batch whose size is not a
    multiple of 4. The weights go through save_pretrained's file and rename_grounding_dino."""
    swin = transformers.SwinConfig(embed_dim=24, depths=[1, 2, 1, 2], num_heads=[2, 2, 4, 4],
                                   window_size=7, out_features=["stage2", "stage3", "stage4"])
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37)
    detector = perturbed(grounding_dino.GroundingDinoForObjectDetection(
        oracle_config(backbone_config=swin, text_config=bert)))
    ours = Backbone(DetectorConfig(backbone="swin", swin_embed_dim=24, swin_depths=(1, 2, 1, 2),
                                   swin_heads=(2, 2, 4, 4), position_temperature=20.0))
    renamed, unused, unknown = rename_grounding_dino(saved_state(detector, tmp_path))
    assert sorted(unused) == ["model.backbone.conv_encoder.model.swin.layernorm.bias",
                              "model.backbone.conv_encoder.model.swin.layernorm.weight"]
    assert unknown == []
    oracle = detector.model
    indices = {k: v for k, v in ours.state_dict().items() if k.endswith("relative_position_index")}
    ours.load_state_dict({**indices, **{k.removeprefix("backbone."): v for k, v in renamed.items()
                                        if k.startswith("backbone.")}}, strict=True)
    ours.eval()
    torch.manual_seed(0)
    images, mask = torch.randn(2, 3, 230, 262), torch.zeros(2, 230, 262, dtype=torch.bool)
    mask[1, 190:], mask[1, :, 203:] = True, True
    with torch.no_grad():
        features = ours(images, mask)
        maps, positions = oracle.backbone(images, (~mask).long())
        sources = [projection(source) for projection, (source, _) in
                   zip(oracle.input_proj_vision, maps)]
        sources.append(oracle.input_proj_vision[3](maps[-1][0]))
        masks = [level_mask for _, level_mask in maps]
        masks.append(torch.nn.functional.interpolate((~mask)[None].float(),
                                                     size=sources[-1].shape[-2:]).bool()[0])
        positions.append(oracle.backbone.position_embedding(sources[-1], masks[-1]))
    tokens = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
    pos = torch.cat([p.flatten(2).transpose(1, 2) + oracle.level_embed[level]
                     for level, p in enumerate(positions)], 1)
    assert torch.equal(features.padding_mask, ~torch.cat([m.flatten(1) for m in masks], 1))
    torch.testing.assert_close(features.tokens, tokens, atol=1e-4, rtol=1e-4)
    valid = ~features.padding_mask            # padding pixels' positions are never read
    torch.testing.assert_close(features.pos[valid], pos[valid], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- loading a folder

def tiny_vocabulary() -> list[str]:
    """bert-base-uncased's special ids (GD hard-codes 101, 102, 1012, 1029) and a few words."""
    tokens = [f"[unused{i}]" for i in range(2100)]
    for index, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]",
                         1012: ".", 1029: "?"}.items():
        tokens[index] = token
    words = ["cat", "dog", "remote", "control", "a", "photo", "of", "##s", "couch"]
    tokens[2000:2000 + len(words)] = words
    return tokens


def tiny_grounding_dino(seed: int = 0, **overrides):
    """A random tiny GD with a Swin and a BERT, every weight perturbed, in eval mode."""
    torch.manual_seed(seed)
    swin = transformers.SwinConfig(embed_dim=24, depths=[1, 2, 1, 2], num_heads=[2, 2, 4, 4],
                                   window_size=7, out_features=["stage2", "stage3", "stage4"])
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=37, vocab_size=2100)
    return perturbed(grounding_dino.GroundingDinoForObjectDetection(oracle_config(
        backbone_config=swin, text_config=bert, num_queries=20, **overrides)))


def save_tiny_grounding_dino(folder, seed: int = 0, **overrides):
    """A random tiny GD (tiny_grounding_dino) as save_pretrained writes it, with vocab.txt
    and the public folder's preprocessor_config.json. Returns the oracle."""
    oracle = tiny_grounding_dino(seed, **overrides)
    oracle.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(tiny_vocabulary()) + "\n")
    (folder / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 800, "longest_edge": 1333}, "resample": 2}')
    return oracle


def test_a_grounding_dino_folder_loads_every_tensor_by_name(tmp_path):
    from checkpoints import load_grounding_dino

    oracle = save_tiny_grounding_dino(tmp_path)
    model, report = load_grounding_dino(tmp_path, kernel="torch")
    config = model.config
    sizes = (config.hidden_dim, config.num_heads, config.ffn_dim, config.num_queries)
    assert sizes == (64, 4, 256, 20)
    assert (config.swin_embed_dim, config.swin_depths, config.swin_heads) == (24, (1, 2, 1, 2),
                                                                              (2, 2, 4, 4))
    assert (config.image_size, config.max_size, config.class_head) == (800, 1333, "dot")
    assert report.fresh == ["dn_content", "logit_scale", "prompt_encoder"]
    assert len(report.unused) == 2 and report.loaded == len(
        [k for k in model.state_dict() if not k.startswith(("dn_content", "logit_scale",
                                                            "prompt_encoder"))
         and not k.endswith("relative_position_index")])
    ours = model.state_dict()
    theirs = oracle.state_dict()
    for our_name, their_name in [
            ("decoder.box_head.layers.2.weight", "bbox_embed.0.layers.2.weight"),
            ("enhancer.1.fusion.prompt_value.weight",
             "model.encoder.layers.1.fusion_layer.attn.values_text_proj.weight"),
            ("text_encoder.out.bias", "model.text_projection.bias"),
            ("text_encoder.bert.encoder.layer.0.output.dense.weight",
             "model.text_backbone.encoder.layer.0.output.dense.weight")]:
        assert torch.equal(ours[our_name], theirs[their_name]), our_name


def test_a_bad_grounding_dino_folder_is_refused_with_the_file_and_the_first_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from checkpoints import load_grounding_dino

    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'config.json'} is missing"):
        load_grounding_dino(tmp_path)
    save_tiny_grounding_dino(tmp_path)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="describes a 'bert' model, not Grounding DINO"):
        load_grounding_dino(tmp_path / "bert")
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    name = "model.encoder.layers.0.fusion_layer.attn.vision_proj.weight"
    save_file({**state, name: state[name][:, :10].contiguous()}, str(weights))
    with pytest.raises(ValueError, match=rf"model.safetensors: 'enhancer.0.fusion.image_query"
                                         rf".weight' is \(128, 10\) there, \(128, 64\) here"):
        load_grounding_dino(tmp_path)
    save_file({**state, "model.something_new.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match="1 tensors no rule maps, the first "
                                         "'model.something_new.weight'"):
        load_grounding_dino(tmp_path)
    del state["model.enc_output.bias"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="missing, the first 'encoder_output.0.bias'"):
        load_grounding_dino(tmp_path)


def test_from_the_text_features_on_the_detector_equals_grounding_dino_end_to_end(tmp_path):
    """A GD folder loaded here, given GD's per-token text features (from this project's BERT
    with GD's sub-sentence mask and positions, then text_projection) and GD's phrases, gives
    GD's logits per token and boxes on a padded batch of a size not a multiple of 4."""
    from checkpoints import load_grounding_dino

    oracle = save_tiny_grounding_dino(tmp_path).eval()
    model, _ = load_grounding_dino(tmp_path, kernel="torch")
    model.eval()
    input_ids = torch.tensor([[101, 2000, 1012, 2001, 1012, 2003, 2004, 1012, 102],
                              [101, 2008, 1012, 102, 0, 0, 0, 0, 0]])
    attention_mask = (input_ids != 0).long()
    torch.manual_seed(0)
    images, mask = torch.randn(2, 3, 230, 262), torch.zeros(2, 230, 262, dtype=torch.bool)
    mask[1, 190:], mask[1, :, 203:] = True, True
    with torch.no_grad():
        expected = oracle(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask,
                          pixel_mask=(~mask).long())
        text, phrases = model.text_encoder.encode_ids(input_ids, attention_mask == 0)
        tokens = one_token_per_class(text, phrases.padding)._replace(phrases=phrases)
        output = model(images, mask, tokens)
    real = attention_mask.bool()[:, None, :].expand(-1, 20, -1)
    torch.testing.assert_close(output.logits[-1][real], expected.logits[..., :9][real],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=1e-4)


def test_fine_tuning_starts_from_a_grounding_dino_folder_and_evaluate_reads_it(shapes, tmp_path):
    """train_sft.py --init FOLDER, a folder as transformers 5 saves it: its model and weights
    (its processor's sizes), visual prompts learned from fresh; evaluate.py --ckpt takes the
    folder and the result."""
    import evaluate
    import train_sft
    from conftest import run_args

    folder = tmp_path / "gd"
    oracle = save_grounding_dino_as_transformers_does(folder, image_sizes=(128, 171))
    with pytest.raises(SystemExit, match="brings its own backbone and text encoder: drop "
                                         "--model"):
        train_sft.main(run_args(shapes, tmp_path / "run", "--init", str(folder),
                                "--model", "tiny"))
    tuned = train_sft.main(run_args(shapes, tmp_path / "run", "--init", str(folder),
                                    "--max-steps", "1", "--kernel", "torch"))
    assert tuned.config.num_queries == 20 and tuned.config.image_size == 128
    # The next stage starts from that checkpoint, which brings its own (GD-sized) model.
    chained = train_sft.main(run_args(shapes, tmp_path / "next", "--init",
                                      str(tmp_path / "run" / "last.pt"), "--max-steps", "1"))
    assert chained.config == replace(tuned.config, kernel="auto")
    with pytest.raises(SystemExit, match="last.pt is a checkpoint, which brings its own "
                                         "backbone and text encoder: drop --text-encoder"):
        train_sft.main(run_args(shapes, tmp_path / "next", "--init",
                                str(tmp_path / "run" / "last.pt"), "--text-encoder", "generated"))
    before = oracle.state_dict()["model.level_embed"]
    after = tuned.state_dict()["backbone.level_embed"]
    assert not torch.equal(before, after) and torch.allclose(before, after, atol=1e-3)
    tuned_metrics = evaluate.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--data",
                                   str(shapes), "--split", "val", "--kernel", "torch"])
    assert tuned_metrics["prompt"] == "generic" and 0.0 <= tuned_metrics["AP"] <= 1.0
    published = evaluate.main(["--ckpt", str(folder), "--data", str(shapes), "--split", "val",
                               "--kernel", "torch"])
    assert published["prompt"] == "text" and 0.0 <= published["AP"] <= 1.0
    with pytest.raises(SystemExit, match="its visual prompt encoder is untrained"):
        evaluate.main(["--ckpt", str(folder), "--data", str(shapes), "--prompt", "generic"])


def test_class_names_read_as_a_caption_give_grounding_dinos_class_scores(tmp_path):
    """predict.py's and evaluate.py's text path on a GD folder: class names become the caption
    "[CLS] cat . dog . remote control . [SEP]" in this project's tokenizer and BERT; each
    class's score is the mean of GD's token probabilities over its tokens."""
    from checkpoints import load_grounding_dino

    oracle = save_tiny_grounding_dino(tmp_path).eval()
    model, _ = load_grounding_dino(tmp_path, kernel="torch")
    model.eval()
    input_ids = torch.tensor([[101, 2000, 1012, 2001, 1012, 2002, 2003, 1012, 102]] * 2)
    torch.manual_seed(0)
    images, mask = torch.randn(2, 3, 230, 262), torch.zeros(2, 230, 262, dtype=torch.bool)
    mask[1, 190:], mask[1, :, 203:] = True, True
    with torch.no_grad():
        expected = oracle(pixel_values=images, input_ids=input_ids,
                          attention_mask=torch.ones_like(input_ids), pixel_mask=(~mask).long())
        output = model(images, mask, ["cat", "dog", "remote control"])
    probabilities = expected.logits.sigmoid()
    by_class = torch.stack([probabilities[..., 1], probabilities[..., 3],
                            probabilities[..., 5:7].mean(-1)], -1)
    torch.testing.assert_close(output.logits[-1].sigmoid(), by_class, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(output.boxes[-1], expected.pred_boxes, atol=1e-4, rtol=1e-4)


PUBLIC_PREPROCESSOR = (
    '{"do_normalize": true, "do_pad": true, "do_rescale": true, "do_resize": true, '
    '"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], '
    '"image_processor_type": "GroundingDinoImageProcessor", "resample": 2, '
    '"rescale_factor": 0.00392156862745098, "size": {"longest_edge": 1333, "shortest_edge": 800}}')


def test_predict_py_on_photos_gives_grounding_dinos_detections(tmp_path):
    """`python predict.py --ckpt FOLDER --text ...` on scikit-image's photos, with a tiny GD of
    a config no other test uses (one encoder layer, two decoder layers) in the hub's form
    (vocab.txt, the public preprocessor_config.json), against transformers' PIL image
    processor (GroundingDinoImageProcessorPil, whose resize is GD's own), BertTokenizer and
    model: the same (name, score, box) within 2e-3 and 1.5 px."""
    import predict

    folder = tmp_path / "gd"
    oracle = save_tiny_grounding_dino(folder, seed=3, encoder_layers=1, decoder_layers=2).eval()
    (folder / "preprocessor_config.json").write_text(PUBLIC_PREPROCESSOR)
    processor = transformers.GroundingDinoImageProcessorPil.from_pretrained(str(folder))
    tokenizer = transformers.BertTokenizer(vocab=str(folder / "vocab.txt"))
    pictures = photos(tmp_path, "astronaut", "coffee", "chelsea")
    assert_predict_gives_transformers_detections(folder, oracle, processor, tokenizer, pictures)
    with pytest.raises(SystemExit, match="its visual prompt encoder is untrained"):
        predict.main(["--ckpt", str(folder), "--image", str(pictures[0]), "--box", "1,1,20,20"])


def save_grounding_dino_as_transformers_does(folder, image_sizes=(800, 1333), seed=0,
                                             **overrides):
    """A random tiny GD (tiny_grounding_dino) saved as transformers 5 saves a model and its
    processor (GroundingDinoImageProcessorPil, BertTokenizer): config.json, model.safetensors,
    processor_config.json, tokenizer.json, tokenizer_config.json; nothing added by hand.
    Returns the oracle."""
    oracle = tiny_grounding_dino(seed, **overrides)
    oracle.save_pretrained(folder)
    vocab = folder.parent / "vocab-source.txt"
    vocab.write_text("\n".join(tiny_vocabulary()) + "\n")
    shortest, longest = image_sizes
    transformers.GroundingDinoProcessor(
        image_processor=transformers.GroundingDinoImageProcessorPil(
            size={"shortest_edge": shortest, "longest_edge": longest}),
        tokenizer=transformers.BertTokenizer(vocab=str(vocab))).save_pretrained(folder)
    assert not (folder / "vocab.txt").exists() and not (folder / "preprocessor_config.json").exists()
    return oracle


def test_a_folder_saved_by_todays_transformers_gives_its_detections(tmp_path):
    """The form transformers 5 saves (tokenizer.json, processor_config.json), of a config whose
    decoder has its own FFN width, heads and sampling points: predict.py --ckpt FOLDER gives
    the detections of transformers' processor and model loaded from the same folder."""
    from checkpoints import grounding_dino_config

    folder = tmp_path / "gd"
    oracle = save_grounding_dino_as_transformers_does(
        folder, image_sizes=(480, 640), seed=5, decoder_ffn_dim=96, decoder_attention_heads=2,
        decoder_n_points=3).eval()
    config = grounding_dino_config(folder)
    assert (config.ffn_dim, config.decoder_sizes(), config.image_size, config.max_size) == (
        256, (2, 3, 96), 480, 640)
    # GD's own resize (PIL, bilinear); transformers' default processor resizes with torchvision
    image_processor = transformers.GroundingDinoImageProcessorPil.from_pretrained(str(folder))
    assert image_processor.size == {"shortest_edge": 480, "longest_edge": 640}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert_predict_gives_transformers_detections(folder, oracle, image_processor, tokenizer,
                                                 photos(tmp_path, "coffee"))


def photos(folder, *names: str) -> list:
    """scikit-image's photos, saved as PNG files in `folder`."""
    import skimage.data
    from PIL import Image

    paths = [folder / f"{name}.png" for name in names]
    for name, path in zip(names, paths):
        Image.fromarray(getattr(skimage.data, name)()).save(path)
    return paths


def assert_predict_gives_transformers_detections(folder, oracle, image_processor, tokenizer,
                                                 pictures, names=("cat", "dog", "photo")):
    """predict.py --ckpt FOLDER --text NAME... keeps the 30 best (name, score, box) of each
    picture; each of the oracle's 30 best (its token probabilities at the names' tokens) is
    among them within 2e-3 in score and 1.5 px in every box coordinate."""
    from PIL import Image

    import predict

    text = tokenizer(" . ".join(names) + " .", return_tensors="pt")
    positions = [text.input_ids[0].tolist().index(tokenizer.convert_tokens_to_ids(name))
                 for name in names]
    ours = predict.main(["--ckpt", str(folder), *sum((["--image", str(p)] for p in pictures), []),
                         *sum((["--text", name] for name in names), []), "--threshold", "0",
                         "--top-k", "30", "--out", str(folder.parent / "out"), "--device", "cpu"])
    for picture in pictures:
        image = Image.open(picture).convert("RGB")
        inputs = image_processor(images=image, return_tensors="pt")
        with torch.no_grad():
            output = oracle(pixel_values=inputs.pixel_values, pixel_mask=inputs.pixel_mask,
                            input_ids=text.input_ids, attention_mask=text.attention_mask)
        scores = output.logits[0].sigmoid()[:, positions].flatten()           # (Q * K,)
        top = scores.topk(30)
        boxes = output.pred_boxes[0][top.indices // len(names)]
        boxes = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], 1)  # x, y, w, h
        boxes = boxes * torch.tensor([image.width, image.height] * 2)
        found = [d for d in ours if d["file_name"] == str(picture)]
        assert len(found) == 30
        for score, index, box in zip(top.values.tolist(), top.indices.tolist(), boxes.tolist()):
            name = names[index % len(names)]
            match = [d for d in found if d["name"] == name and abs(d["score"] - score) < 2e-3
                     and max(abs(a - b) for a, b in zip(d["bbox"], box)) < 1.5]
            assert match, (picture.name, name, score, box)


def test_long_lists_of_names_split_into_captions_of_at_most_256_tokens(tmp_path):
    from checkpoints import load_grounding_dino

    save_tiny_grounding_dino(tmp_path)
    model, _ = load_grounding_dino(tmp_path, kernel="torch")
    names = ["remote control", "cat"] * 60            # 3 and 2 tokens with their ".": 300 + 2
    with pytest.raises(ValueError, match="302 tokens, more than Grounding DINO's 256"):
        model.text_encoder.caption_ids(names)
    for max_names, first_end in ((200, 101), (40, 40)):     # 2 + 5 * 50 + 3 = 255 tokens
        ranges = model.text_encoder.caption_chunks(names, max_names)
        assert ranges[0] == (0, first_end) and ranges[-1][1] == len(names)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for start, end in ranges:
            assert len(model.text_encoder.caption_ids(names[start:end])[0]) <= 256


# The public conversion script's renames (IDEA's release -> transformers), inverted, to write a
# checkpoint with the original release's names from a random transformers model: the real
# groundingdino_swint_ogc.pth cannot be downloaded here.
TO_ORIGINAL = [
    (r"model\.backbone\.conv_encoder\.model\.embeddings\.patch_embeddings\.projection\.",
     "backbone.0.patch_embed.proj."),
    (r"model\.backbone\.conv_encoder\.model\.embeddings\.norm\.", "backbone.0.patch_embed.norm."),
    (r"model\.backbone\.conv_encoder\.model\.hidden_states_norms\.stage(\d)\.",
     lambda m: f"backbone.0.norm{int(m[1]) - 1}."),
    (r"model\.backbone\.conv_encoder\.model\.encoder\.layers\.", "backbone.0.layers."),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)layernorm_before", r"\1norm1"),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)layernorm_after", r"\1norm2"),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)attention\.self\.(query|key|value)",
     r"\1attn.qkv.\2"),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)attention\.self\.", r"\1attn."),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)attention\.output\.dense", r"\1attn.proj"),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)intermediate\.dense", r"\1mlp.fc1"),
    (r"(backbone\.0\.layers\.\d+\.blocks\.\d+\.)output\.dense", r"\1mlp.fc2"),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.self_attn_layer_norm",
     r"transformer.encoder.layers.\1.norm1"),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.final_layer_norm",
     r"transformer.encoder.layers.\1.norm2"),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.fc",
     r"transformer.encoder.layers.\1.linear"),
    (r"model\.encoder\.layers\.(\d+)\.deformable_layer\.", r"transformer.encoder.layers.\1."),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.self_attn\.(query|key|value)",
     r"transformer.encoder.text_layers.\1.self_attn.in_proj.\2"),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_before",
     r"transformer.encoder.text_layers.\1.norm1"),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.layer_norm_after",
     r"transformer.encoder.text_layers.\1.norm2"),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.fc",
     r"transformer.encoder.text_layers.\1.linear"),
    (r"model\.encoder\.layers\.(\d+)\.text_enhancer_layer\.",
     r"transformer.encoder.text_layers.\1."),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.vision_param",
     r"transformer.encoder.fusion_layers.\1.gamma_v"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.text_param",
     r"transformer.encoder.fusion_layers.\1.gamma_l"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_vision",
     r"transformer.encoder.fusion_layers.\1.layer_norm_v"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.layer_norm_text",
     r"transformer.encoder.fusion_layers.\1.layer_norm_l"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(values_|out_)?vision_proj",
     r"transformer.encoder.fusion_layers.\1.attn.\2v_proj"),
    (r"model\.encoder\.layers\.(\d+)\.fusion_layer\.attn\.(values_|out_)?text_proj",
     r"transformer.encoder.fusion_layers.\1.attn.\2l_proj"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.(query|key|value)",
     r"transformer.decoder.layers.\1.ca_text.in_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text_layer_norm",
     r"transformer.decoder.layers.\1.catext_norm"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_text\.",
     r"transformer.decoder.layers.\1.ca_text."),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm",
     r"transformer.decoder.layers.\1.norm1"),
    (r"model\.decoder\.layers\.(\d+)\.encoder_attn\.",
     r"transformer.decoder.layers.\1.cross_attn."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.(query|key|value)",
     r"transformer.decoder.layers.\1.self_attn.in_proj.\2"),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm",
     r"transformer.decoder.layers.\1.norm2"),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm", r"transformer.decoder.layers.\1.norm3"),
    (r"model\.decoder\.layers\.(\d+)\.fc", r"transformer.decoder.layers.\1.linear"),
    (r"model\.decoder\.layers\.", "transformer.decoder.layers."),
    (r"model\.text_backbone\.", "bert."), (r"model\.input_proj_vision\.", "input_proj."),
    (r"model\.text_projection\.", "feat_map."),
    (r"model\.decoder\.reference_points_head\.", "transformer.decoder.ref_point_head."),
    (r"model\.decoder\.layer_norm\.", "transformer.decoder.norm."),
    (r"model\.enc_output", "transformer.enc_output"),
    (r"model\.encoder_output_bbox_embed\.", "transformer.enc_out_bbox_embed."),
    (r"model\.level_embed", "transformer.level_embed"),
    (r"model\.query_position_embeddings\.", "transformer.tgt_embed."),
]


def original_state(state: dict) -> dict:
    """transformers' names -> the original release's: renamed, q/k/v packed again, the box
    head tied into every decoder layer as the release saves it, "module." in front."""
    import re

    renamed = {}
    for name, tensor in state.items():
        if name.startswith("model.backbone.conv_encoder.model.swin.layernorm"):
            continue
        for pattern, replacement in TO_ORIGINAL:
            name = re.sub("^" + pattern if pattern.startswith("model") else pattern, replacement,
                          name)
        renamed[name] = tensor
    packed = {}
    for name, tensor in renamed.items():
        match = re.fullmatch(r"(.*)\.(qkv|in_proj)\.(query|key|value)\.(weight|bias)", name)
        if match is None:
            packed[name] = tensor
        elif match[3] == "query":
            prefix, packing, kind = match[1], match[2], match[4]
            parts = [renamed[f"{prefix}.{packing}.{p}.{kind}"] for p in ("query", "key", "value")]
            target = f"{prefix}.qkv.{kind}" if packing == "qkv" else f"{prefix}.in_proj_{kind}"
            packed[target] = torch.cat(parts)
    for name in [n for n in packed if n.startswith("bbox_embed.0.")]:
        for layer in range(2):
            packed[f"transformer.decoder.bbox_embed.{layer}.{name[13:]}"] = packed[name]
        packed[f"bbox_embed.1.{name[13:]}"] = packed[name]
    return {f"module.{name}": tensor for name, tensor in packed.items()}


def test_the_original_release_checkpoint_loads_as_its_hub_folder_does(shapes, tmp_path):
    """A checkpoint with the original release's names (written from a random transformers
    model by the inverse of the public conversion's renames) loads into the same weights as
    the hub folder of that model; the model must be Swin with BERT, else one line says how."""
    from checkpoints import (grounding_dino_config, load_checkpoint, load_grounding_dino,
                             load_original_grounding_dino_weights)
    from model import DINOR1

    folder = tmp_path / "gd"
    save_tiny_grounding_dino(folder, decoder_layers=2)
    state = saved_state_file(folder)
    torch.save({"model": original_state(state)}, tmp_path / "groundingdino.pth")
    expected, _ = load_grounding_dino(folder, kernel="torch")
    checkpoint = load_checkpoint(str(tmp_path / "groundingdino.pth"))
    model = DINOR1(grounding_dino_config(folder))
    loaded = load_original_grounding_dino_weights(model, tmp_path / "groundingdino.pth", checkpoint)
    assert loaded.fresh == ["dn_content", "logit_scale", "prompt_encoder"]
    fresh = ("dn_content", "logit_scale", "prompt_encoder")
    for name, tensor in expected.state_dict().items():
        if not name.startswith(fresh):
            assert torch.equal(model.state_dict()[name], tensor), name
    import train_sft
    from conftest import run_args

    with pytest.raises(SystemExit, match="groundingdino.pth is the original Grounding DINO "
                                         "checkpoint: start from it with --model swin_t"):
        train_sft.main(run_args(shapes, tmp_path / "run", "--init",
                                str(tmp_path / "groundingdino.pth")))


def test_a_checkpoint_from_before_the_drop_path_gets_its_presets_rate(tmp_path):
    """A config saved before fusion_drop_path existed takes its preset's rate (a Swin model:
    swin_t's 0.1; tiny: 0), in --init / --resume (train_sft.build_detector) as in
    model_from_checkpoint; a saved rate is kept."""
    import argparse
    from dataclasses import asdict

    import train_sft
    from checkpoints import CHECKPOINT_FORMAT

    small_swin = DetectorConfig(backbone="swin", swin_embed_dim=8, swin_depths=(1, 1, 1, 1),
                                swin_heads=(1, 1, 1, 1), kernel="torch")
    for config, rate in ((small_swin, 0.1), (DetectorConfig(kernel="torch"), 0.0)):
        saved = {k: v for k, v in asdict(config).items() if k != "fusion_drop_path"}
        torch.save({"format": CHECKPOINT_FORMAT, "config": saved, "model": {}}, tmp_path / "c.pt")
        args = argparse.Namespace(model_from=str(tmp_path / "c.pt"), kernel="torch",
                                  dn_label_noise=None)
        assert train_sft.build_detector(args).config.fusion_drop_path == rate
        assert DetectorConfig.from_saved({**saved, "fusion_drop_path": 0.3}).fusion_drop_path \
            == 0.3
