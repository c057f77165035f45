"""Multi-scale deformable attention in plain PyTorch: the specification and the CPU path.

The convention is Deformable-DETR's (Zhu et al. 2021, `ms_deform_attn_core_pytorch` in the
release), which Grounding DINO and DINO-R1 inherit:

    value               (B, S, heads, D)        S = sum over levels of H_l * W_l, the
                                                levels flattened row-major and concatenated
    spatial_shapes      (L, 2) int64            (H_l, W_l) of each level
    level_start_index   (L,) int64              offset of level l in S
    sampling_locations  (B, Q, heads, L, P, 2)  (x, y), normalised: 0 and 1 are the outer
                                                edges of the feature map, not pixel centres
    attention_weights   (B, Q, heads, L, P)     usually a softmax over L * P
    output              (B, Q, heads * D)

    output[b, q, h*D:(h+1)*D] = sum over l, p of  attention_weights[b, q, h, l, p]
        * bilinear(level l of value[b, :, h], at sampling_locations[b, q, h, l, p])

Bilinear sampling is exactly `grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)`: pixel coordinate = location * size - 0.5, and the taps that fall
outside the map read zero.
"""

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    """Multi-scale deformable attention with one `grid_sample` per level.

    Shapes as in the module docstring. Differentiable with respect to value,
    sampling_locations and attention_weights. Half-precision inputs are computed in
    float32 (like the Triton kernel's accumulation) and the output is cast back to
    value's dtype; float64 stays float64 so that gradcheck is meaningful.
    """
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    # grid_sample wants the levels as separate images, so the shapes must be host integers.
    level_shapes = spatial_shapes.tolist()
    level_starts = level_start_index.tolist()

    # grid_sample's grid lives in [-1, 1]; with align_corners=False, -1 and 1 are the outer
    # edges, which is the same as location * size - 0.5 in pixels.
    sampling_grids = 2 * sampling_locations.to(compute_dtype) - 1
    samples_per_level = []
    for level, ((height, width), start) in enumerate(zip(level_shapes, level_starts)):
        # (B, H*W, heads, D) -> (B*heads, D, H, W)
        level_value = value[:, start:start + height * width].to(compute_dtype)
        level_value = level_value.permute(0, 2, 3, 1).reshape(
            batch_size * num_heads, head_dim, height, width)
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        level_grid = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples_per_level.append(F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros",
            align_corners=False))  # (B*heads, D, Q, P)

    samples = torch.stack(samples_per_level, dim=-2).flatten(-2)  # (B*heads, D, Q, L*P)
    # (B, Q, heads, L, P) -> (B*heads, 1, Q, L*P)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(
        batch_size * num_heads, 1, num_queries, num_levels * num_points)
    output = (samples * weights).sum(-1)  # (B*heads, D, Q)
    output = output.view(batch_size, num_heads * head_dim, num_queries).transpose(1, 2)
    return output.to(value.dtype).contiguous()
