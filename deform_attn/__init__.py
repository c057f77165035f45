"""Multi-scale deformable attention (Deformable DETR): one entry point, two backends.

    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend="auto", level_shapes=None) -> output

    value               (B, S, heads, D)        S = sum of H_l * W_l, levels flattened
                                                row-major and concatenated
    spatial_shapes      (L, 2) int64            (H_l, W_l) of each level
    level_start_index   (L,) int64              offset of level l in S
    sampling_locations  (B, Q, heads, L, P, 2)  (x, y) in [0, 1]; pixel = loc * size - 0.5
    attention_weights   (B, Q, heads, L, P)
    output              (B, Q, heads * D)       value's dtype
    level_shapes        optional: spatial_shapes as host integers [(H_l, W_l), ...], when
                        the caller holds them; the torch backend then reads no device data
                        (on CUDA, reading spatial_shapes makes the host wait for the GPU)

Sampling is bilinear with zero padding outside the map, exactly grid_sample with
align_corners=False (see deform_attn/reference.py, the specification).

Backends:
    "torch"   deform_attn/reference.py, grid_sample per level; runs on any device.
    "triton"  deform_attn/triton_kernel.py, fused forward and backward with fp32 accumulation,
              for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1, as the tests do).
    "auto"    triton for CUDA tensors when triton imports, else torch.

Triton is optional: a failed import is reported once per process (a warning) and "auto"
falls back to torch, while an explicit "triton" raises. An error raised inside a kernel
propagates; nothing retries on the other backend.
"""

import functools
import os
import warnings

from .reference import ms_deform_attn_reference

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def _import_triton_backend():
    """(the triton_kernel module, None) or (None, why it failed); tried once per process."""
    try:
        from . import triton_kernel
    # Any failure, not only ImportError: a broken triton install must not break "auto".
    except Exception as error:  # noqa: BLE001 - reported here, re-raised for "triton"
        reason = f"{type(error).__name__}: {error}"
        warnings.warn(f"triton is unavailable ({reason}); multi-scale deformable attention "
                      f"uses the PyTorch reference", RuntimeWarning, stacklevel=3)
        return None, reason
    return triton_kernel, None


def _interpreter_enabled():
    """True when Triton runs kernels in its CPU interpreter, which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
    """Raise ValueError unless the shapes agree (without reading any device data)."""
    if value.dim() != 4 or sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"expected value (B, S, heads, D) and sampling_locations "
                         f"(B, Q, heads, L, P, 2), got {tuple(value.shape)} and "
                         f"{tuple(sampling_locations.shape)}")
    batch_size, _, num_heads, _ = value.shape
    num_levels = sampling_locations.shape[3]
    if sampling_locations.shape[0] != batch_size or sampling_locations.shape[2] != num_heads:
        raise ValueError(f"value {tuple(value.shape)} and sampling_locations "
                         f"{tuple(sampling_locations.shape)} disagree on batch or heads")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} must be "
                         f"sampling_locations' shape without the last axis "
                         f"{tuple(sampling_locations.shape[:-1])}")
    if spatial_shapes.shape != (num_levels, 2) or level_start_index.shape != (num_levels,):
        raise ValueError(f"expected spatial_shapes ({num_levels}, 2) and level_start_index "
                         f"({num_levels},), got {tuple(spatial_shapes.shape)} and "
                         f"{tuple(level_start_index.shape)}")


def _select_implementation(backend, value):
    """The function that runs `backend` on tensors like `value`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not value.is_cuda):
        return ms_deform_attn_reference
    if not value.is_cuda and not _interpreter_enabled():
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {value.device} "
                           f"(CPU tensors run only under TRITON_INTERPRET=1); "
                           f"use backend='torch' on CPU")
    triton_backend, reason = _import_triton_backend()
    if triton_backend is None:
        if backend == "auto":
            return ms_deform_attn_reference
        raise RuntimeError(f"backend='triton' was requested but triton could not be "
                           f"imported ({reason}); install triton or use backend='torch'")
    return triton_backend.ms_deform_attn_triton


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend="auto", level_shapes=None):
    """Multi-scale deformable attention; shapes and backends in the module docstring."""
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights)
    if level_shapes is not None and len(level_shapes) != spatial_shapes.shape[0]:
        raise ValueError(f"level_shapes has {len(level_shapes)} levels, spatial_shapes "
                         f"{spatial_shapes.shape[0]}")
    implementation = _select_implementation(backend, value)
    return implementation(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights, level_shapes=level_shapes)
