"""Tests of deform_attn/: multi-scale deformable attention.

- the PyTorch reference against a float64 implementation with explicit bilinear loops,
  and torch.autograd.gradcheck of the reference;
- the Triton kernel (forward and the three gradients) against the reference, run by
  Triton's CPU interpreter. Triton reads TRITON_INTERPRET when a kernel is defined, and
  other test files may import triton first, so these tests (named test_interpreted_*)
  run in a subprocess that sets it: test_triton_kernel_under_interpreter. Running this
  file with TRITON_INTERPRET=1 runs them directly;
- the backend dispatch (auto on CPU, explicit triton without the interpreter, a failed
  triton import) and deform_attn/bench.py on a tiny shape.

Shapes are tiny on purpose: the interpreter costs milliseconds per operation per program.
"""

import itertools
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import deform_attn
from deform_attn import bench, ms_deform_attn
from deform_attn.reference import ms_deform_attn_reference

REPOSITORY = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs with TRITON_INTERPRET=1 in the subprocess of "
                            "test_triton_kernel_under_interpreter")

# Several levels of different sizes, including 1x1; D = 6 is not a power of two.
MIXED_CASE = dict(batch_size=2, level_shapes=[(3, 4), (2, 3), (1, 1)], num_heads=2,
                  head_dim=6, num_queries=5, num_points=2)
# Enough queries for several query blocks per (batch, head) in both Triton kernels
# (32 per block forward and 16 backward for D = 32), the last one partial.
MULTI_BLOCK_CASE = dict(batch_size=1, level_shapes=[(3, 4)], num_heads=1, head_dim=32,
                        num_queries=40, num_points=1)


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|, computed in float64."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def make_inputs(batch_size, level_shapes, num_heads, head_dim, num_queries, num_points,
                dtype=torch.float32, non_contiguous=False, seed=0):
    """Random inputs in the Deformable-DETR convention (see deform_attn/__init__.py).

    Locations lie in [-0.3, 1.3], some exactly 0 or 1 (the outer edges), some far outside
    (every tap padded). With non_contiguous, each input is a transposed or sliced view.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    level_sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cat([level_sizes.new_zeros(1), level_sizes.cumsum(0)[:-1]])
    value_length, num_levels = int(level_sizes.sum()), len(level_shapes)
    sample_shape = (batch_size, num_queries, num_heads, num_levels, num_points)

    value = torch.randn(batch_size, num_heads, value_length, head_dim, generator=generator)
    locations = torch.rand(*sample_shape, 4, generator=generator) * 1.6 - 0.3
    flat_locations = locations.view(-1)
    flat_locations[::7], flat_locations[3::7], flat_locations[5::13] = 0.0, 1.0, -2.5
    flat_locations[9::17] = 4.0
    weights = torch.rand(batch_size, num_heads, num_queries, num_levels, num_points,
                         generator=generator)
    inputs = dict(value=value.transpose(1, 2), spatial_shapes=spatial_shapes,
                  level_start_index=level_start_index, sampling_locations=locations[..., ::2],
                  attention_weights=weights.transpose(1, 2))
    if not non_contiguous:
        inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}
    inputs["value"] = inputs["value"].to(dtype)
    inputs["attention_weights"] = inputs["attention_weights"].to(dtype)
    return inputs


def loop_implementation(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights):
    """The definition, written out with explicit bilinear loops in float64 numpy."""
    value = value.double().numpy()
    locations = sampling_locations.double().numpy()
    weights = attention_weights.double().numpy()
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    output = np.zeros((batch_size, num_queries, num_heads, head_dim))
    for batch, query, head, level, point in itertools.product(
            range(batch_size), range(num_queries), range(num_heads), range(num_levels),
            range(num_points)):
        height, width = spatial_shapes[level].tolist()
        start = int(level_start_index[level])
        location_x, location_y = locations[batch, query, head, level, point]
        pixel_x, pixel_y = location_x * width - 0.5, location_y * height - 0.5
        left, top = math.floor(pixel_x), math.floor(pixel_y)
        for row, column in itertools.product((top, top + 1), (left, left + 1)):
            if 0 <= row < height and 0 <= column < width:
                tap_weight = (1 - abs(pixel_x - column)) * (1 - abs(pixel_y - row))
                output[batch, query, head] += (
                    weights[batch, query, head, level, point] * tap_weight
                    * value[batch, start + row * width + column, head])
    return torch.from_numpy(output.reshape(batch_size, num_queries, num_heads * head_dim))


def output_and_gradients(function, inputs, grad_seed=1):
    """function(**inputs) and the gradients of <output, random> wrt the three float inputs."""
    differentiable = ["value", "sampling_locations", "attention_weights"]
    inputs = {name: tensor.detach().requires_grad_(name in differentiable)
              for name, tensor in inputs.items()}
    output = function(**inputs)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(grad_seed))
    gradients = torch.autograd.grad(output, [inputs[name] for name in differentiable],
                                    grad_output.to(output.dtype))
    return output, gradients


@pytest.mark.parametrize("non_contiguous", [False, True])
def test_reference_matches_loop_implementation(non_contiguous):
    inputs = make_inputs(**MIXED_CASE, non_contiguous=non_contiguous)
    expected = loop_implementation(**inputs)
    output = ms_deform_attn_reference(**inputs)
    assert output.shape == expected.shape and output.dtype == torch.float32
    assert relative_error(output, expected) <= 1e-5


def test_level_shapes_from_the_host_give_the_same_output_without_reading_the_device(
        monkeypatch):
    inputs = make_inputs(**MIXED_CASE)
    expected = ms_deform_attn(**inputs)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda tensor: pytest.fail("read the device"))
    output = ms_deform_attn(**inputs, level_shapes=MIXED_CASE["level_shapes"])
    assert torch.equal(output, expected)
    with pytest.raises(ValueError, match="level_shapes has 2 levels"):
        ms_deform_attn(**inputs, level_shapes=MIXED_CASE["level_shapes"][:2])


def test_reference_gradcheck_in_float64():
    inputs = make_inputs(batch_size=2, level_shapes=[(2, 3), (1, 1)], num_heads=1,
                         head_dim=3, num_queries=2, num_points=2, dtype=torch.float64)
    value, locations, weights = (
        inputs[name].double().requires_grad_()
        for name in ("value", "sampling_locations", "attention_weights"))

    def attention(value, locations, weights):
        return ms_deform_attn_reference(value, inputs["spatial_shapes"],
                                        inputs["level_start_index"], locations, weights)

    assert torch.autograd.gradcheck(attention, (value, locations, weights))


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    calls = []

    def recording_reference(*arguments, level_shapes=None):
        calls.append(len(arguments))
        return ms_deform_attn_reference(*arguments)

    def no_triton_import():
        raise AssertionError("auto must not try triton for CPU tensors")

    monkeypatch.setattr(deform_attn, "ms_deform_attn_reference", recording_reference)
    monkeypatch.setattr(deform_attn, "_import_triton_backend", no_triton_import)
    inputs = make_inputs(**MIXED_CASE)
    output = ms_deform_attn(**inputs)  # backend="auto"
    assert calls == [5]
    assert torch.equal(output, ms_deform_attn_reference(**inputs))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ms_deform_attn(**make_inputs(**MIXED_CASE), backend="triton")


def test_unknown_backend_and_mismatched_shapes_raise():
    inputs = make_inputs(**MIXED_CASE)
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(**inputs, backend="cuda")
    inputs["attention_weights"] = inputs["attention_weights"][..., :1]
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(**inputs)


@pytest.fixture
def broken_triton_import(monkeypatch):
    """Make `from . import triton_kernel` fail, and forget the cached import result."""
    monkeypatch.setitem(sys.modules, "deform_attn.triton_kernel", None)  # None: ImportError
    monkeypatch.delattr(deform_attn, "triton_kernel", raising=False)
    deform_attn._import_triton_backend.cache_clear()
    yield
    deform_attn._import_triton_backend.cache_clear()


def test_failed_triton_import_is_reported_once(broken_triton_import, monkeypatch):
    cuda_like_value = types.SimpleNamespace(is_cuda=True, device="cuda:0")
    with pytest.warns(RuntimeWarning, match="triton is unavailable") as warnings_seen:
        assert deform_attn._select_implementation("auto", cuda_like_value) is (
            deform_attn.ms_deform_attn_reference)
        assert deform_attn._select_implementation("auto", cuda_like_value) is (
            deform_attn.ms_deform_attn_reference)
    assert len(warnings_seen) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that only the failed import is wrong
    with pytest.raises(RuntimeError, match="triton could not be imported"):
        ms_deform_attn(**make_inputs(**MIXED_CASE), backend="triton")


@needs_interpreter
@pytest.mark.parametrize("case, non_contiguous", [
    (MIXED_CASE, False), (MIXED_CASE, True), (MULTI_BLOCK_CASE, False)])
def test_interpreted_triton_matches_reference_in_float32(case, non_contiguous):
    inputs = make_inputs(**case, non_contiguous=non_contiguous)
    expected_output, expected_gradients = output_and_gradients(ms_deform_attn_reference, inputs)
    output, gradients = output_and_gradients(
        lambda **tensors: ms_deform_attn(**tensors, backend="triton"), inputs)
    assert output.dtype == torch.float32
    assert relative_error(output, expected_output) <= 1e-4
    for name, gradient, expected in zip(("value", "locations", "weights"), gradients,
                                        expected_gradients):
        assert relative_error(gradient, expected) <= 1e-4, name


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_triton_half_precision(dtype):
    # The reference also computes in float32 from the same rounded inputs, so the two
    # differ by the final rounding to dtype only.
    inputs = make_inputs(**MIXED_CASE, dtype=dtype)
    expected_output, expected_gradients = output_and_gradients(ms_deform_attn_reference, inputs)
    output, gradients = output_and_gradients(
        lambda **tensors: ms_deform_attn(**tensors, backend="triton"), inputs)
    assert output.dtype == dtype
    assert [gradient.dtype for gradient in gradients] == [dtype, torch.float32, dtype]
    assert relative_error(output, expected_output) <= 1e-2
    for name, gradient, expected in zip(("value", "locations", "weights"), gradients,
                                        expected_gradients):
        assert relative_error(gradient, expected) <= 1e-2, name


@pytest.mark.skipif(INTERPRETED, reason="this process already runs the interpreter")
def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "interpreted"],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert " passed" in completed.stdout and "skipped" not in completed.stdout


def test_bench_runs_on_cpu(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    rows = bench.main(["--device", "cpu", "--shape", "reduced", "--batch", "1",
                       "--repeats", "2", "--warmup", "1", "--json", str(json_path)])
    assert [row["pass_name"] for row in rows] == ["forward", "forward+backward"]
    assert all(row["median_ms"] > 0 and row["gigabytes_per_second"] > 0 for row in rows)
    assert "| shape |" in capsys.readouterr().out
    assert json_path.exists()


def test_bench_runs_as_a_script():
    completed = subprocess.run(
        [sys.executable, "deform_attn/bench.py", "--device", "cpu", "--shape", "reduced",
         "--batch", "1", "--passes", "forward", "--repeats", "1", "--warmup", "0"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "| reduced | 380 | 1 | torch | fp32 | forward |" in completed.stdout
