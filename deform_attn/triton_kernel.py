"""Multi-scale deformable attention as Triton kernels: forward and backward.

Same convention and shapes as `deform_attn/reference.py` (the specification):

    value               (B, S, heads, D)        float32, bfloat16 or float16
    spatial_shapes      (L, 2) int64            (H_l, W_l), read inside the kernel; keep
    level_start_index   (L,) int64              both on value's device (else copied there)
    sampling_locations  (B, Q, heads, L, P, 2)  (x, y) in [0, 1], computed in float32
    attention_weights   (B, Q, heads, L, P)     any of the three float types
    output              (B, Q, heads * D)       value's dtype

Parallelisation: one program per (block of BLOCK_QUERIES queries, batch * head). A
program loops over the L * P samples of its queries and works on a
(BLOCK_QUERIES, BLOCK_DIM) tile, so each bilinear tap is a gather of D contiguous
channels per query (one value row of one head), and the output tile is written once.
BLOCK_DIM is the next power of two of D, masked, so any D works. The level shapes are
loaded from device tensors, so nothing synchronises with the host.

The backward recomputes the four taps of every sample instead of saving them (the forward
saves only its inputs). The gradients of the locations and of the weights belong to one
program each and are stored directly; the value gradient is scattered with fp32 atomic
adds into a zeroed fp32 buffer, then cast to value's dtype. All sums are in fp32.
"""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _program_tile(num_queries, num_heads, value_length, row_stride, HEAD_DIM: tl.constexpr,
                  BLOCK_QUERIES: tl.constexpr, BLOCK_DIM: tl.constexpr):
    """The (query block, batch * head) tile of this program.

    Returns the query and channel masks, the channels, the offset of this (batch, head)
    in value (int64: it spans the batch; offsets inside one batch item fit in int32), and
    the (B, Q, heads) row of each query, which indexes locations, weights and output.
    """
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = batch_head % num_heads
    queries = tl.program_id(0) * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
    channels = tl.arange(0, BLOCK_DIM)
    value_offset = batch * value_length * row_stride + head * HEAD_DIM
    query_rows = (batch * num_queries + queries) * num_heads + head  # (BLOCK_QUERIES,)
    return queries < num_queries, channels < HEAD_DIM, channels, value_offset, query_rows


@triton.jit
def _level_geometry(spatial_shapes_pointer, level_start_pointer, level):
    """(height, width, start in S) of one level, loaded from the device tensors."""
    height = tl.load(spatial_shapes_pointer + 2 * level).to(tl.int32)
    width = tl.load(spatial_shapes_pointer + 2 * level + 1).to(tl.int32)
    return height, width, tl.load(level_start_pointer + level).to(tl.int32)


@triton.jit
def _tap_geometry(locations_pointer, sample_index, query_mask, height, width):
    """Pixel coordinates of one sample per query: top-left tap and fractional offsets.

    Pixel = location * size - 0.5 (grid_sample, align_corners=False). The coordinate is
    clamped to [-2, size + 1] only so that the float-to-int conversion stays in range:
    beyond that all four taps are outside the map, so the sample and its gradients are
    zero either way.
    """
    location_x = tl.load(locations_pointer + 2 * sample_index, mask=query_mask, other=0.0)
    location_y = tl.load(locations_pointer + 2 * sample_index + 1, mask=query_mask, other=0.0)
    width_float = width.to(tl.float32)
    height_float = height.to(tl.float32)
    pixel_x = tl.minimum(tl.maximum(location_x * width_float - 0.5, -2.0), width_float + 1.0)
    pixel_y = tl.minimum(tl.maximum(location_y * height_float - 0.5, -2.0), height_float + 1.0)
    left = tl.floor(pixel_x)
    top = tl.floor(pixel_y)
    return left.to(tl.int32), top.to(tl.int32), pixel_x - left, pixel_y - top


@triton.jit
def _tap(column, row, height, width, level_start, row_stride, query_mask, channels,
         channel_mask):
    """Offsets into a head's value rows of the tap (row, column), and where it is inside.

    Taps outside the map are masked out: they read zero (padding_mode="zeros") and
    receive no gradient.
    """
    inside = query_mask & (column >= 0) & (column < width) & (row >= 0) & (row < height)
    offsets = (level_start + row * width + column)[:, None] * row_stride + channels[None, :]
    return offsets, inside[:, None] & channel_mask[None, :]


@triton.jit
def _forward_kernel(
    value_pointer, spatial_shapes_pointer, level_start_pointer, locations_pointer,
    weights_pointer, output_pointer, num_queries, num_heads, value_length, row_stride,
    HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_QUERIES: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    """output tile (BLOCK_QUERIES, D) of one (query block, batch * head) program.

    row_stride = heads * D is an argument rather than computed here so that Triton
    specialises on its divisibility by 16 and vectorises the gathers along D.
    """
    query_mask, channel_mask, channels, value_offset, query_rows = _program_tile(
        num_queries, num_heads, value_length, row_stride, HEAD_DIM, BLOCK_QUERIES, BLOCK_DIM)
    value_base = value_pointer + value_offset
    accumulator = tl.zeros((BLOCK_QUERIES, BLOCK_DIM), dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height, width, level_start = _level_geometry(
            spatial_shapes_pointer, level_start_pointer, level)
        for point in range(NUM_POINTS):
            sample_index = query_rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            left, top, fraction_x, fraction_y = _tap_geometry(
                locations_pointer, sample_index, query_mask, height, width)
            weight = tl.load(weights_pointer + sample_index, mask=query_mask, other=0.0)
            weight = weight.to(tl.float32)
            for corner in tl.static_range(4):
                column = left + corner % 2
                row = top + corner // 2
                offsets, inside = _tap(column, row, height, width, level_start, row_stride,
                                       query_mask, channels, channel_mask)
                tap_value = tl.load(value_base + offsets, mask=inside, other=0.0)
                along_x = fraction_x if corner % 2 == 1 else 1.0 - fraction_x
                along_y = fraction_y if corner // 2 == 1 else 1.0 - fraction_y
                accumulator += (weight * along_x * along_y)[:, None] * tap_value.to(tl.float32)

    output_offsets = query_rows[:, None] * HEAD_DIM + channels[None, :]
    tl.store(output_pointer + output_offsets,
             accumulator.to(output_pointer.dtype.element_ty),
             mask=query_mask[:, None] & channel_mask[None, :])


@triton.jit
def _backward_kernel(
    value_pointer, spatial_shapes_pointer, level_start_pointer, locations_pointer,
    weights_pointer, grad_output_pointer, grad_value_pointer, grad_locations_pointer,
    grad_weights_pointer, num_queries, num_heads, value_length, row_stride,
    HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_QUERIES: tl.constexpr, BLOCK_DIM: tl.constexpr,
):
    """Gradients for the samples of one (query block, batch * head) program.

    Same decomposition as the forward; grad_value is an fp32 buffer laid out like value.
    """
    query_mask, channel_mask, channels, value_offset, query_rows = _program_tile(
        num_queries, num_heads, value_length, row_stride, HEAD_DIM, BLOCK_QUERIES, BLOCK_DIM)
    value_base = value_pointer + value_offset
    grad_value_base = grad_value_pointer + value_offset  # same layout as value
    output_offsets = query_rows[:, None] * HEAD_DIM + channels[None, :]
    grad_output = tl.load(grad_output_pointer + output_offsets,
                          mask=query_mask[:, None] & channel_mask[None, :], other=0.0)
    grad_output = grad_output.to(tl.float32)  # (BLOCK_QUERIES, BLOCK_DIM)

    for level in range(NUM_LEVELS):
        height, width, level_start = _level_geometry(
            spatial_shapes_pointer, level_start_pointer, level)
        for point in range(NUM_POINTS):
            sample_index = query_rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            left, top, fraction_x, fraction_y = _tap_geometry(
                locations_pointer, sample_index, query_mask, height, width)
            weight = tl.load(weights_pointer + sample_index, mask=query_mask, other=0.0)
            weight = weight.to(tl.float32)
            # Per query: <grad_output, sample>, and <grad_output, d sample / d pixel x or y>.
            grad_dot_sample = tl.zeros((BLOCK_QUERIES,), dtype=tl.float32)
            grad_dot_sample_dx = tl.zeros((BLOCK_QUERIES,), dtype=tl.float32)
            grad_dot_sample_dy = tl.zeros((BLOCK_QUERIES,), dtype=tl.float32)
            for corner in tl.static_range(4):
                column = left + corner % 2
                row = top + corner // 2
                offsets, inside = _tap(column, row, height, width, level_start, row_stride,
                                       query_mask, channels, channel_mask)
                tap_value = tl.load(value_base + offsets, mask=inside, other=0.0)
                grad_dot_tap = tl.sum(grad_output * tap_value.to(tl.float32), axis=1)
                # Bilinear weight of this tap along each axis, and its derivative with
                # respect to the pixel coordinate on that axis (+1 or -1).
                along_x = fraction_x if corner % 2 == 1 else 1.0 - fraction_x
                along_y = fraction_y if corner // 2 == 1 else 1.0 - fraction_y
                sign_x = 1.0 if corner % 2 == 1 else -1.0
                sign_y = 1.0 if corner // 2 == 1 else -1.0
                grad_dot_sample += along_x * along_y * grad_dot_tap
                grad_dot_sample_dx += sign_x * along_y * grad_dot_tap
                grad_dot_sample_dy += sign_y * along_x * grad_dot_tap
                tl.atomic_add(grad_value_base + offsets,
                              (weight * along_x * along_y)[:, None] * grad_output,
                              mask=inside, sem="relaxed")

            tl.store(grad_weights_pointer + sample_index,
                     grad_dot_sample.to(grad_weights_pointer.dtype.element_ty), mask=query_mask)
            # pixel = location * size - 0.5, hence the factor size.
            grad_x = weight * width.to(tl.float32) * grad_dot_sample_dx
            grad_y = weight * height.to(tl.float32) * grad_dot_sample_dy
            tl.store(grad_locations_pointer + 2 * sample_index, grad_x, mask=query_mask)
            tl.store(grad_locations_pointer + 2 * sample_index + 1, grad_y, mask=query_mask)


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one (queries x channels) tile, split over NUM_WARPS * 32 threads: for D = 32
# the forward takes 32 queries and the backward, which also holds a gradient tile, 16.
# With these, ptxas reports about 56-64 registers per thread on sm_90 (2048-element tiles
# need over 130), leaving room for many programs per SM to hide the gather latency.
# Chosen from the compiled code, not from timings: they are untuned.
FORWARD_TILE_ELEMENTS = 1024
BACKWARD_TILE_ELEMENTS = 512
NUM_WARPS = 4


def _launch_geometry(value, sampling_locations, tile_elements):
    """Grid and block sizes for a (query block, batch * head) launch."""
    batch_size, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    block_dim = triton.next_power_of_2(head_dim)
    block_queries = max(1, tile_elements // block_dim)  # both powers of two
    grid = (triton.cdiv(num_queries, block_queries), batch_size * num_heads)
    return grid, dict(HEAD_DIM=head_dim, NUM_LEVELS=sampling_locations.shape[3],
                      NUM_POINTS=sampling_locations.shape[4], BLOCK_QUERIES=block_queries,
                      BLOCK_DIM=block_dim, num_warps=NUM_WARPS)


def _on_device_of(tensor):
    """Launch on the tensor's GPU rather than the current one (several GPUs per process)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class _MultiScaleDeformableAttention(torch.autograd.Function):
    """Autograd wrapper; expects contiguous inputs with float32 locations."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        batch_size, value_length, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        output = value.new_empty(batch_size, num_queries, num_heads * head_dim)
        grid, meta = _launch_geometry(value, sampling_locations, FORWARD_TILE_ELEMENTS)
        if output.numel() > 0:
            with _on_device_of(value):
                _forward_kernel[grid](
                    value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, output, num_queries, num_heads, value_length,
                    num_heads * head_dim, **meta)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: raise, don't guess
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors)
        _, value_length, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        # Atomic adds accumulate in fp32 whatever value's dtype; cast once at the end.
        grad_value = torch.zeros_like(value, dtype=torch.float32)
        # Every location and weight belongs to one program, which writes its gradient.
        grad_locations = torch.empty_like(sampling_locations)
        grad_weights = torch.empty_like(attention_weights)
        grid, meta = _launch_geometry(value, sampling_locations, BACKWARD_TILE_ELEMENTS)
        if grad_output.numel() > 0:
            with _on_device_of(value):
                _backward_kernel[grid](
                    value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, grad_output.contiguous(), grad_value, grad_locations,
                    grad_weights, num_queries, num_heads, value_length, num_heads * head_dim,
                    **meta)
        return grad_value.to(value.dtype), None, None, grad_locations, grad_weights


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, level_shapes=None):
    """Multi-scale deformable attention with the Triton kernels; shapes in the module docstring.

    Accepts non-contiguous inputs (they are made contiguous) and locations of any float
    dtype (computed in float32; autograd casts their gradient back). level_shapes is not
    needed: the kernels read spatial_shapes on the device.
    """
    for name, tensor in (("value", value), ("attention_weights", attention_weights)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the triton backend takes {name} in float32, bfloat16 or "
                            f"float16, got {tensor.dtype}; use backend='torch' instead")
    return _MultiScaleDeformableAttention.apply(
        value.contiguous(),
        spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous(),
        level_start_index.to(device=value.device, dtype=torch.int64).contiguous(),
        sampling_locations.to(torch.float32).contiguous(),
        attention_weights.contiguous())
