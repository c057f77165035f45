"""Grounding DINO compatibility, module by module: this project's modules against Hugging
Face transformers' GroundingDino (the oracle, a test-only dependency) on tiny random
configurations, every weight perturbed where a module has any."""

import pytest
import torch

from model import PRESETS, build_model, sine_positions

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
        features = model.backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    height, width = features.spatial_shapes[0].tolist()            # level 0, no padding
    expected = sine_positions(torch.ones(1, height, width), model.config.hidden_dim, 20.0)
    expected = expected.flatten(1, 2) + model.backbone.level_embed[0]
    torch.testing.assert_close(features.pos[:, :height * width], expected)
