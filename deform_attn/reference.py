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
from einops import rearrange


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, level_shapes=None):
    """Multi-scale deformable attention with one `grid_sample` per level.

    Shapes as in the module docstring. Differentiable with respect to value,
    sampling_locations and attention_weights. Half-precision inputs are computed in
    float32 (like the Triton kernel's accumulation) and the output is cast back to
    value's dtype; float64 stays float64 so that gradcheck is meaningful. level_shapes:
    spatial_shapes as host integers when the caller holds them (then no device data is read;
    the levels are taken to be concatenated in order, as level_start_index says).
    """
    batch_size = value.shape[0]
    compute_dtype = torch.promote_types(value.dtype, torch.float32)
    # grid_sample wants the levels as separate images, so the shapes must be host integers.
    if level_shapes is None:
        level_shapes, level_starts = spatial_shapes.tolist(), level_start_index.tolist()
    else:
        sizes = [height * width for height, width in level_shapes]
        level_starts = [sum(sizes[:level]) for level in range(len(sizes))]

    # grid_sample's grid lives in [-1, 1]; with align_corners=False, -1 and 1 are the outer
    # edges, which is the same as location * size - 0.5 in pixels.
    sampling_grids = 2 * sampling_locations.to(compute_dtype) - 1
    samples_per_level = []
    for level, ((height, width), start) in enumerate(zip(level_shapes, level_starts)):
        level_value = rearrange(value[:, start:start + height * width].to(compute_dtype),
                                "b (y x) m d -> (b m) d y x", y=height, x=width)
        level_grid = rearrange(sampling_grids[:, :, :, level], "b q m p xy -> (b m) q p xy")
        samples_per_level.append(F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros",
            align_corners=False))  # (B*heads, D, Q, P)

    samples = torch.stack(samples_per_level, dim=-2).flatten(-2)  # (B*heads, D, Q, L*P)
    weights = rearrange(attention_weights.to(compute_dtype), "b q m l p -> (b m) 1 q (l p)")
    output = (samples * weights).sum(-1)  # (B*heads, D, Q)
    output = rearrange(output, "(b m) d q -> b q (m d)", b=batch_size)
    return output.to(value.dtype).contiguous()
