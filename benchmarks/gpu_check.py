"""Checks that need an accelerator: the Triton kernel against the reference on CUDA, and the
`swin_t` training step with each deformable-attention backend.

    python benchmarks/gpu_check.py kernels             # correctness on CUDA, fp32 and bf16
    python benchmarks/gpu_check.py step --kernel torch triton
    python benchmarks/gpu_check.py step --device cpu --image 128 160 --steps 2   # dry run
    python benchmarks/gpu_check.py profile --kernel triton   # where a swin_t step's time goes
    python benchmarks/gpu_check.py same_weights        # against transformers, one GD's weights

`benchmarks/gpu_check.sh` runs these with deform_attn/bench.py and the tiny main job, and
prints the summary table last.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import Batch, Target, VisualInstructions  # noqa: E402
from deform_attn import ms_deform_attn  # noqa: E402
from losses import SetCriterion  # noqa: E402
from model import build_model  # noqa: E402


def random_attention_inputs(batch: int, num_queries: int, dtype, device, seed: int = 0):
    """Deformable-attention inputs at the Swin-T level shapes of a 200x333 image."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shapes = torch.tensor([[25, 42], [13, 21], [7, 11], [4, 6]], device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), 8, 32, generator=generator).to(device, dtype)
    locations = (torch.rand(batch, num_queries, 8, 4, 4, 2, generator=generator) * 1.2 - 0.1).to(device)
    weights = torch.rand(batch, num_queries, 8, 4, 4, generator=generator).to(device, dtype)
    return value, shapes, starts, locations, weights


def check_kernels(device: str = "cuda") -> list[dict]:
    """Triton against the torch reference, forward and the three gradients."""
    rows = []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        inputs = random_attention_inputs(2, 300, dtype, device)
        results = {}
        for backend in ("torch", "triton"):
            value, shapes, starts, locations, weights = [
                x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
            out = ms_deform_attn(value, shapes, starts, locations, weights, backend=backend)
            out.float().square().sum().backward()
            results[backend] = (out.float(), value.grad.float(), locations.grad.float(),
                                weights.grad.float())
        for name, reference, triton in zip(("output", "grad value", "grad locations",
                                            "grad weights"), results["torch"], results["triton"]):
            error = ((triton - reference).norm() / reference.norm().clamp(min=1e-12)).item()
            rows.append({"dtype": str(dtype).split(".")[-1], "tensor": name,
                         "relative_error": error, "ok": error <= tolerance})
    return rows


def synthetic_batch(height: int, width: int, device, num_classes: int = 10, per_image: int = 6,
                    seed: int = 0) -> tuple[Batch, VisualInstructions, list[Target]]:
    """Two images with random boxes of `num_classes` classes (for timing only)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(2):
        centres = torch.rand(per_image, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(per_image, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (per_image,), generator=generator)
        targets.append(Target(boxes=torch.cat([centres, sizes], 1), labels=labels, image_id=0,
                              orig_size=torch.tensor([height, width]),
                              size=torch.tensor([height, width])))
    padded = (-(-height // 32) * 32, -(-width // 32) * 32)
    images = torch.randn(2, 3, *padded, generator=generator)
    mask = torch.ones(2, *padded, dtype=torch.bool)
    mask[:, :height, :width] = False
    batch = Batch(images=images, mask=mask, targets=targets).to(device)
    classes = torch.cat([t.labels for t in batch.targets]).unique()
    prompt_targets = [Target(t.boxes, torch.searchsorted(classes, t.labels), t.image_id,
                             t.orig_size, t.size) for t in batch.targets]
    all_labels = torch.cat([t.labels for t in prompt_targets])
    selected = torch.stack([(all_labels == k).nonzero()[0, 0] for k in range(len(classes))])
    instructions = VisualInstructions(
        boxes=torch.cat([t.boxes for t in batch.targets]),
        image_index=torch.arange(2, device=device).repeat_interleave(per_image),
        labels=all_labels, selected=selected,
        class_names=[f"class {int(c)}" for c in classes])
    return batch, instructions, prompt_targets


def swin_t_training(kernel: str, device: str, height: int, width: int, amp: bool):
    """What a timed swin_t training step needs: (model in training mode, criterion, AdamW,
    the synthetic batch, its visual instructions and targets, the bf16 autocast context)."""
    torch.manual_seed(0)
    model = build_model("swin_t", kernel=kernel).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, instructions, targets = synthetic_batch(height, width, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda")
    return model, SetCriterion(), optimizer, batch, instructions, targets, autocast


def time_training_steps(kernel: str, device: str, height: int, width: int, steps: int,
                        warmup: int, amp: bool) -> dict:
    """Median seconds per swin_t training step (forward, losses, backward, AdamW step)."""
    model, criterion, optimizer, batch, instructions, targets, autocast = swin_t_training(
        kernel, device, height, width, amp)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            output = model(batch.images, batch.mask, instructions, dn_targets=targets)
            loss = criterion(output, targets, float(sum(len(t.labels) for t in targets)))["sft"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return {"kernel": kernel, "image": f"{height}x{width}", "batch": 2, "bf16": amp,
            "median_step_s": statistics.median(times), "peak_gib": peak,
            "loss_finite": bool(torch.isfinite(loss))}


PHASES = ("forward", "matching and losses", "backward", "optimizer")


def training_step(model, criterion, optimizer, batch, instructions, targets, autocast,
                  mark=lambda phase: None):
    """One SFT step (forward, losses with Hungarian matching, backward, AdamW). `mark(phase)`
    is called as each phase ends (a clock for the phases' wall times)."""
    with autocast:
        output = model(batch.images, batch.mask, instructions, dn_targets=targets)
        mark("forward")
        loss = criterion(output, targets, float(sum(len(t.labels) for t in targets)))["sft"]
        mark("matching and losses")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark("backward")
    optimizer.step()
    mark("optimizer")
    return loss


def profile_training_steps(kernel: str, device: str, height: int, width: int, steps: int,
                           warmup: int, amp: bool, rows: int = 10) -> dict:
    """Where a swin_t training step's time goes: the median wall time of each phase (the
    device synchronised at each phase's end, no profiler), then torch.profiler over `steps`
    steps: GPU kernel time and device operations a step, the top operations by self device time
    and by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    model, criterion, optimizer, batch, instructions, targets, autocast = swin_t_training(
        kernel, device, height, width, amp)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    phase_times = {phase: [] for phase in PHASES}
    clock = [0.0]

    def mark(phase):
        synchronize()
        now = time.perf_counter()
        phase_times[phase].append(now - clock[0])
        clock[0] = now
    for index in range(warmup + steps):
        synchronize()
        clock[0] = time.perf_counter()
        training_step(model, criterion, optimizer, batch, instructions, targets, autocast,
                      mark if index >= warmup else (lambda phase: None))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            training_step(model, criterion, optimizer, batch, instructions, targets, autocast)
        synchronize()
    device_events = [e for e in profiler.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA
                     and not e.name.startswith(("Optimizer.", "ProfilerStep"))]
    events = profiler.key_averages()
    device_key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return {"kernel": kernel, "image": f"{height}x{width}", "batch": 2, "bf16": amp,
            "steps": steps,
            "phase_median_s": {p: statistics.median(t) for p, t in phase_times.items()},
            "gpu_kernel_ms_per_step": sum(e.device_time for e in device_events) / 1e3 / steps,
            "device_operations_per_step": len(device_events) / steps,
            "by_device_time": events.table(sort_by=device_key, row_limit=rows),
            "by_cpu_time": events.table(sort_by="self_cpu_time_total", row_limit=rows)}


def huggingface_grounding_dino(tiny: bool = False):
    """Hugging Face's GroundingDinoForObjectDetection at Grounding DINO Swin-T's config (or a
    tiny one for a dry run), random weights, built offline. `transformers` is imported here
    only: it is the oracle, not a dependency."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection
    if not tiny:
        return GroundingDinoForObjectDetection(GroundingDinoConfig())
    config = GroundingDinoConfig(
        backbone_config={"model_type": "swin", "embed_dim": 24, "depths": [1, 1, 1, 1],
                         "num_heads": [1, 1, 1, 1], "out_features": ["stage2", "stage3", "stage4"]},
        text_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 64},
        d_model=64, encoder_layers=2, decoder_layers=2, num_queries=50,
        encoder_ffn_dim=128, decoder_ffn_dim=128)
    return GroundingDinoForObjectDetection(config)


def time_huggingface_steps(device: str, height: int, width: int, steps: int, warmup: int,
                           amp: bool, tiny: bool = False) -> dict:
    """Median seconds of HF's Grounding DINO forward (eval, no gradient) and training step
    (forward with its own losses, backward, AdamW) on the batch `synthetic_batch` makes, with
    a caption of one word per class ("w0 . w1 . ... ."), token ids only (no tokenizer)."""
    torch.manual_seed(0)
    model = huggingface_grounding_dino(tiny).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, _, targets = synthetic_batch(height, width, device)
    num_classes = int(max(t.labels.max() for t in targets)) + 1
    words = torch.arange(num_classes) + 2000            # any ids outside the special ones
    caption = torch.stack([words, torch.full_like(words, 1012)], 1).flatten()   # "w ." per class
    ids = torch.cat([torch.tensor([101]), caption, torch.tensor([102])]).repeat(2, 1).to(device)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids), "pixel_mask": (~batch.mask).long()}
    labels = [{"class_labels": t.labels, "boxes": t.boxes} for t in targets]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda")
    result = {"model": "transformers GroundingDino", "image": f"{height}x{width}", "batch": 2,
              "bf16": amp}
    losses = []

    def forward():
        with torch.no_grad(), autocast:
            model(batch.images, **text)

    def step():
        with autocast:
            losses.append(model(batch.images, **text, labels=labels).loss)
        optimizer.zero_grad(set_to_none=True)
        losses[-1].backward()
        optimizer.step()

    for phase, action in (("forward", forward), ("step", step)):
        model.train(phase == "step")
        result[f"median_{phase}_s"] = median_seconds(action, steps, warmup, device)
    result["loss_finite"] = bool(torch.isfinite(losses[-1]))
    return result


def median_seconds(action, steps: int, warmup: int, device: str) -> float:
    """Median wall seconds of `action()` over `steps` calls after `warmup` untimed ones,
    synchronising CUDA around each."""
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for index in range(warmup + steps):
        synchronize()
        started = time.perf_counter()
        action()
        synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def save_grounding_dino(folder: Path, tiny: bool) -> None:
    """HF's Grounding DINO (random weights) as a hub folder: save_pretrained, a vocab.txt
    with bert-base-uncased's special ids, the public preprocessor sizes."""
    oracle = huggingface_grounding_dino(tiny)
    oracle.save_pretrained(folder)
    tokens = [f"[unused{i}]" for i in range(oracle.config.text_config.vocab_size)]
    for index, token in {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 1012: "."}.items():
        tokens[index] = token
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    (folder / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 800, "longest_edge": 1333}}')


def same_weights_check(kernel: str, device: str, height: int, width: int, steps: int,
                       warmup: int, tiny: bool = False, forward_only: bool = False) -> dict:
    """One Grounding DINO's weights in transformers and here (load_grounding_dino), in fp32
    without TF32 on a padded batch: how far the encoder's states, the token scores, the
    per-token logits and the boxes differ, and how much of the top-k selection agrees in order
    (random weights give near-ties whose order can swap, which moves those queries' outputs).
    Then (unless steps is 0) median seconds of a bf16 forward and of a step (forward, the sum
    of the logits of real tokens and of the boxes as the loss, backward, AdamW) for each.
    This project's side runs its own BERT over the caption with GD's sub-sentence mask
    (caption_phrases), then the detector on those token features."""
    import inspect
    import tempfile

    from transformers.models.grounding_dino import modeling_grounding_dino as gd

    from checkpoints import load_grounding_dino
    from model import caption_phrases

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        save_grounding_dino(Path(folder), tiny)
        oracle = gd.GroundingDinoForObjectDetection.from_pretrained(folder).to(device)
        ours = load_grounding_dino(folder, kernel=kernel)[0].to(device)
    batch, _, _ = synthetic_batch(height, width, device)
    words = torch.arange(10) + 2000
    caption = torch.stack([words, torch.full_like(words, 1012)], 1).flatten()
    ids = torch.cat([torch.tensor([101]), caption, torch.tensor([102])]).repeat(2, 1).to(device)
    phrases = caption_phrases(ids, ids == 0, torch.tensor([101, 102, 1012, 1029], device=device),
                              ours.config.hidden_dim)
    # transformers before 5.24 gave each phrase's closing "." position 0 where GD counts on
    # (1 in "cat ."): such an oracle gets GD's masks and positions (caption_phrases, which the
    # tests hold against transformers 5.24).
    patched = len(inspect.signature(gd.generate_masks_with_special_tokens_and_transfer_map
                                    ).parameters) == 1
    original_masks = gd.generate_masks_with_special_tokens_and_transfer_map
    if patched:
        gd.generate_masks_with_special_tokens_and_transfer_map = lambda input_ids: (
            phrases.attention, phrases.position_ids)
    try:
        return compare_and_time(oracle, ours, batch, ids, steps, warmup, device, patched,
                                forward_only)
    finally:
        gd.generate_masks_with_special_tokens_and_transfer_map = original_masks


def max_abs(differences: torch.Tensor) -> float:
    """The largest absolute difference, NaN when there is nothing to compare."""
    return differences.abs().max().item() if differences.numel() else math.nan


def compare_and_time(oracle, ours, batch, ids, steps: int, warmup: int, device: str,
                     patched: bool, forward_only: bool) -> dict:
    """same_weights_check's measurements (see there)."""
    from model import one_token_per_class

    pixel_mask = (~batch.mask).long()

    def my_tokens():        # this project's BERT over the caption, GD's masks, text_projection
        text, phrases = ours.text_encoder.encode_ids(ids)
        return one_token_per_class(text, phrases.padding)._replace(phrases=phrases)

    def theirs():
        output = oracle(pixel_values=batch.images, input_ids=ids,
                        attention_mask=torch.ones_like(ids), pixel_mask=pixel_mask)
        return output.logits[..., :ids.shape[1]], output.pred_boxes

    def mine():
        output = ours(batch.images, batch.mask, my_tokens())
        return output.logits[-1], output.boxes[-1]

    oracle.eval(), ours.eval()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        full = oracle(pixel_values=batch.images, input_ids=ids,
                      attention_mask=torch.ones_like(ids), pixel_mask=pixel_mask)
        encoded = ours.encode(batch.images, batch.mask, my_tokens())
        (their_logits, their_boxes), (my_logits, my_boxes) = theirs(), mine()
    their_scores = full.enc_outputs_class[..., :ids.shape[1]].max(-1).values
    their_selection = their_scores.topk(ours.config.num_queries, dim=1).indices
    my_selection = ours.select_queries(encoded.token_objectness,
                                       encoded.anchors.isfinite().all(-1)).indices
    same = my_selection == their_selection                                  # (B, Q)
    torch.backends.cudnn.allow_tf32 = True            # PyTorch's default, for the timings
    result = {"image": "x".join(map(str, batch.images.shape[-2:])), "batch": 2,
              "tokens": ids.shape[1],
              "transformers": __import__("transformers").__version__,
              "oracle_masks_from_caption_phrases": patched,
              "memory_max_abs_diff_fp32": (encoded.memory - full.encoder_last_hidden_state_vision
                                           ).abs().max().item(),
              "text_max_abs_diff_fp32": (encoded.enhanced - full.encoder_last_hidden_state_text
                                         ).abs().max().item(),
              "token_scores_max_abs_diff_fp32": (encoded.token_objectness - their_scores
                                                 ).abs().max().item(),
              "same_selection_in_order": same.float().mean().item(),
              # Tokens whose scores tie within the rounding above may trade places; such a
              # pair's queries are compared with each other's, so the heads compare where the
              # same token sits at the same place.
              "selection_places_differing": int((my_selection != their_selection).sum()),
              "score_gap_where_differing": (their_scores.gather(1, their_selection)
                                            - their_scores.gather(1, my_selection)
                                            ).abs().max().item(),
              "logits_max_abs_diff_fp32": max_abs((my_logits - their_logits)[same]),
              "boxes_max_abs_diff_fp32": max_abs((my_boxes - their_boxes)[same]),
              "logits_scale": their_logits.abs().max().item()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    timed = [("transformers", oracle, theirs), ("ours", ours, mine)] if steps else []
    for name, model, run in timed:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def forward():
            with torch.no_grad(), autocast:
                run()

        def step():
            with autocast:
                logits, boxes = run()
            loss = logits.float().clamp(min=-100).sum() + boxes.float().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        phases = [("forward", forward)] + ([] if forward_only else [("step", step)])
        for phase, action in phases:
            model.train(phase == "step")
            result[f"{name}_median_{phase}_s"] = median_seconds(action, steps, warmup, device)
    return result


def time_forward(kernel: str, device: str, height: int, width: int, steps: int, warmup: int,
                 amp: bool) -> float:
    """Median seconds of this project's swin_t forward (eval, no gradient)."""
    torch.manual_seed(0)
    model = build_model("swin_t", kernel=kernel).to(device).eval()
    batch, instructions, _ = synthetic_batch(height, width, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device == "cuda")
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for index in range(warmup + steps):
        synchronize()
        started = time.perf_counter()
        with torch.no_grad(), autocast:
            model(batch.images, batch.mask, instructions)
        synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["kernels", "step", "profile", "huggingface",
                                          "same_weights"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernel", nargs="+", default=["torch", "triton"])
    parser.add_argument("--image", type=int, nargs=2, default=[800, 1333])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--forward-only", action="store_true",
                        help="same_weights: time the forward only (on a CPU, say)")
    parser.add_argument("--tiny-huggingface", action="store_true",
                        help="a tiny HF config (a dry run of the huggingface check on a CPU)")
    args = parser.parse_args(argv)
    if args.check == "kernels":
        rows = check_kernels(args.device)
        for row in rows:
            print(f"{row['dtype']:9s} {row['tensor']:15s} rel.err {row['relative_error']:.2e} "
                  f"{'ok' if row['ok'] else 'FAIL'}")
    elif args.check == "huggingface":
        rows = [time_huggingface_steps(args.device, *args.image, args.steps, args.warmup,
                                       not args.no_amp, args.tiny_huggingface)]
        if not args.tiny_huggingface:
            rows += [{"model": f"this project's swin_t ({kernel})", "image": rows[0]["image"],
                      "median_forward_s": time_forward(kernel, args.device, *args.image,
                                                       args.steps, args.warmup, not args.no_amp)}
                     for kernel in args.kernel]
        for row in rows:
            print(json.dumps(row))
    elif args.check == "same_weights":
        rows = [same_weights_check(kernel, args.device, *args.image, args.steps, args.warmup,
                                   args.tiny_huggingface, args.forward_only)
                for kernel in args.kernel]
        for row in rows:
            print(json.dumps(row))
    elif args.check == "profile":
        rows = [profile_training_steps(kernel, args.device, *args.image, args.steps, args.warmup,
                                       not args.no_amp) for kernel in args.kernel]
        for row in rows:
            total = sum(row["phase_median_s"].values())
            print(f"== {row['kernel']}: a step {total * 1e3:.1f} ms (sum of phase medians), GPU "
                  f"kernels {row['gpu_kernel_ms_per_step']:.1f} ms a step, "
                  f"{row['device_operations_per_step']:.0f} device operations a step")
            for name, seconds in row["phase_median_s"].items():
                print(f"   phase {name:22s} {seconds * 1e3:8.1f} ms")
            print(row["by_device_time"])
            print(row["by_cpu_time"])
    else:
        rows = [time_training_steps(kernel, args.device, *args.image, args.steps, args.warmup,
                                    not args.no_amp) for kernel in args.kernel]
        for row in rows:
            print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
