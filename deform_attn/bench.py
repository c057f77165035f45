"""Benchmark multi-scale deformable attention: backend x dtype x (forward, forward+backward).

    python -m deform_attn.bench                          # full shapes on CUDA, reduced on CPU
    python deform_attn/bench.py --shape decoder --backends triton --dtypes bf16 --batch 2
    python -m deform_attn.bench --json results.json      # also write the rows as JSON

Shapes are those of Grounding DINO / DINO-R1 with Swin-T at 800x1333 (feature maps at
strides 8, 16, 32, 64: levels 100x167, 50x84, 25x42, 13x21, S = 22,223), 8 heads, D = 32,
L = 4, P = 4:
    encoder   self-attention over the image: Q = S = 22,223
    decoder   cross-attention of the 900 queries: Q = 900, same value
    reduced   the encoder shape for an image 8x smaller (100x167, S = Q = 380), for CPUs

Columns: the median over --repeats calls after --warmup calls (CUDA events on GPU,
time.perf_counter on CPU); GB/s = compulsory bytes / median time, where the compulsory
bytes are the floor any implementation must move:
    forward            value, locations and weights read once, output written once;
    forward+backward   that, plus the backward's floor: grad_output, value, locations and
                       weights read once, their three gradients written once;
and the peak of torch.cuda.max_memory_allocated during the timed calls, inputs included
(n/a on CPU).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python deform_attn/bench.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deform_attn import ms_deform_attn  # noqa: E402

NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
FEATURE_STRIDES = (8, 16, 32, 64)  # one level per stride, as in the Swin-T neck
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("forward", "forward+backward")


@dataclass(frozen=True)
class BenchShape:
    """An input image size and a number of queries (None: one per value position)."""
    image_height: int
    image_width: int
    num_queries: int | None

    def level_shapes(self):
        """(H, W) of each level: the image size divided by the stride, rounded up."""
        return [(math.ceil(self.image_height / stride), math.ceil(self.image_width / stride))
                for stride in FEATURE_STRIDES]


SHAPES = {
    "encoder": BenchShape(800, 1333, None),
    "decoder": BenchShape(800, 1333, 900),
    "reduced": BenchShape(100, 167, None),
}


def make_inputs(shape, batch_size, dtype, device, requires_grad):
    """Random inputs: uniform locations in [0, 1], weights softmaxed over L * P."""
    generator = torch.Generator().manual_seed(0)
    level_shapes = torch.tensor(shape.level_shapes(), dtype=torch.int64)
    level_sizes = level_shapes.prod(dim=1)
    level_start_index = torch.cat([level_sizes.new_zeros(1), level_sizes.cumsum(0)[:-1]])
    value_length = int(level_sizes.sum())
    num_queries = shape.num_queries or value_length
    num_levels = len(level_shapes)
    value = torch.randn(batch_size, value_length, NUM_HEADS, HEAD_DIM, generator=generator)
    locations = torch.rand(batch_size, num_queries, NUM_HEADS, num_levels, NUM_POINTS, 2,
                           generator=generator)
    logits = torch.randn(batch_size, num_queries, NUM_HEADS, num_levels * NUM_POINTS,
                         generator=generator)
    weights = logits.softmax(-1).view(*logits.shape[:-1], num_levels, NUM_POINTS)
    return dict(
        value=value.to(device, dtype).requires_grad_(requires_grad),
        spatial_shapes=level_shapes.to(device),
        level_start_index=level_start_index.to(device),
        sampling_locations=locations.to(device).requires_grad_(requires_grad),
        attention_weights=weights.to(device, dtype).requires_grad_(requires_grad))


def compulsory_bytes(inputs, pass_name):
    """The bytes any implementation must move; see the module docstring."""
    differentiable = [inputs["value"], inputs["sampling_locations"],
                      inputs["attention_weights"]]
    input_bytes = sum(tensor.numel() * tensor.element_size() for tensor in differentiable)
    value = inputs["value"]
    output_bytes = value.element_size() * value.shape[0] * value.shape[2] * value.shape[3] * (
        inputs["sampling_locations"].shape[1])
    forward_bytes = input_bytes + output_bytes
    if pass_name == "forward":
        return forward_bytes
    # backward: read grad_output and the inputs, write one gradient per input.
    return forward_bytes + output_bytes + 2 * input_bytes


def median_seconds(function, device, warmup, repeats):
    """Median wall time of function() over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        function()
    durations = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            durations.append(start.elapsed_time(end) / 1000)
        else:
            start_time = time.perf_counter()
            function()
            durations.append(time.perf_counter() - start_time)
    return statistics.median(durations)


def measure(shape_name, batch_size, backend, dtype_name, pass_name, device, arguments):
    """One table row: times one pass of one backend on one shape."""
    with_backward = pass_name == "forward+backward"
    inputs = make_inputs(SHAPES[shape_name], batch_size, DTYPES[dtype_name], device,
                         requires_grad=with_backward)
    differentiable = [inputs["value"], inputs["sampling_locations"],
                      inputs["attention_weights"]]
    grad_output = None

    def run_pass():
        nonlocal grad_output
        output = ms_deform_attn(**inputs, backend=backend)
        if with_backward:
            if grad_output is None:
                grad_output = torch.randn_like(output)
            # autograd.grad rather than backward(): no accumulation into .grad between calls
            torch.autograd.grad(output, differentiable, grad_output)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(run_pass, device, arguments.warmup, arguments.repeats)
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
            if device.type == "cuda" else "n/a")
    return dict(shape=shape_name, batch=batch_size, backend=backend, dtype=dtype_name,
                pass_name=pass_name, queries=inputs["sampling_locations"].shape[1],
                median_ms=seconds * 1000,
                gigabytes_per_second=compulsory_bytes(inputs, pass_name) / seconds / 1e9,
                peak_mib=peak)


def markdown_table(rows):
    """The rows as a markdown table."""
    lines = ["| shape | Q | batch | backend | dtype | pass | median ms | GB/s | peak MiB |",
             "|---|---:|---:|---|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['queries']} | {row['batch']} | {row['backend']} "
                     f"| {row['dtype']} | {row['pass_name']} | {row['median_ms']:.3f} "
                     f"| {row['gigabytes_per_second']:.2f} | {row['peak_mib']} |")
    return "\n".join(lines)


def parse_arguments(argv):
    """Command-line settings; the defaults depend on whether CUDA is present."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES),
                        help="default: encoder decoder on CUDA, reduced on CPU")
    parser.add_argument("--backends", nargs="+", choices=("torch", "triton"),
                        help="default: torch triton on CUDA, torch on CPU")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="default: fp32 bf16 fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, help="default: 20 on CUDA, 5 on CPU")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    arguments = parser.parse_args(argv)
    on_cuda = arguments.device == "cuda" or (
        arguments.device == "auto" and torch.cuda.is_available())
    arguments.device = torch.device("cuda" if on_cuda else "cpu")
    arguments.shape = arguments.shape or (["encoder", "decoder"] if on_cuda else ["reduced"])
    arguments.backends = arguments.backends or (["torch", "triton"] if on_cuda else ["torch"])
    arguments.dtypes = arguments.dtypes or (["fp32", "bf16", "fp16"] if on_cuda else ["fp32"])
    arguments.repeats = arguments.repeats or (20 if on_cuda else 5)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not on_cuda and "triton" in arguments.backends and not interpreted:
        parser.error("the triton backend needs CUDA (or TRITON_INTERPRET=1, very slowly)")
    return arguments


def main(argv=None):
    arguments = parse_arguments(argv)
    device_name = (torch.cuda.get_device_name(arguments.device)
                   if arguments.device.type == "cuda" else "CPU")
    print(f"multi-scale deformable attention on {device_name}, torch {torch.__version__}: "
          f"{NUM_HEADS} heads, D = {HEAD_DIM}, L = {len(FEATURE_STRIDES)}, P = {NUM_POINTS}, "
          f"median of {arguments.repeats}")
    rows = [measure(shape_name, batch_size, backend, dtype_name, pass_name,
                    arguments.device, arguments)
            for shape_name in arguments.shape for batch_size in arguments.batch
            for pass_name in arguments.passes for dtype_name in arguments.dtypes
            for backend in arguments.backends]
    print(markdown_table(rows))
    if arguments.json:
        arguments.json.write_text(json.dumps(
            dict(device=device_name, torch=torch.__version__, rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
