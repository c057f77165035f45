"""Supervised fine-tuning (SFT), the baseline of METHOD.md section 3, and the training loop
that train_grqo.py reuses.

    python train_sft.py                          # tiny preset on the embedded shapes data
    python train_sft.py --data coco --model swin_t --amp bf16
    torchrun --nproc_per_node 8 train_sft.py --data coco --model swin_t --amp bf16

Read top to bottom: settings (argparse); set-up (processes, model, data, optimiser, a
resumed state); the objective; `train_one_epoch` and the driver `train`; then the helpers
the loop leans on: reproducibility, checkpoints, fault handling, the final evaluation.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import IO, Callable, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from checkpoints import (CHECKPOINT_FORMAT, checkpoint_config_differences, grounding_dino_config,
                         is_original_grounding_dino, load_checkpoint, load_grounding_dino_weights,
                         load_original_grounding_dino_weights, resolve_device)
from data import (Batch, DataError, ReplaceUnreadable, TextPrompts, VisualInstructions,
                  build_dataset, collate, resolve_data_root, sample_prompts,
                  sample_text_prompts, split_files)
from losses import HungarianMatcher, SetCriterion
from model import DINOR1, MAX_TEXT_TOKENS, PRESETS, DetectorConfig

# Training defaults per model preset (any of them can be overridden on the command line).
TRAIN_DEFAULTS = {
    "tiny": dict(epochs=12, batch_size=8, lr=2e-3, lr_drop=10, warmup_steps=100),
    "swin_t": dict(epochs=12, batch_size=2, lr=1e-4, lr_drop=11, warmup_steps=1000),
    "r50": dict(epochs=12, batch_size=2, lr=1e-4, lr_drop=11, warmup_steps=1000),
}


# ----------------------------------------------------------------------------- settings

def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def make_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="shapes",
                        help="shapes | shapes:DOMAIN | coco | a COCO-format folder")
    parser.add_argument("--model", choices=sorted(PRESETS),
                        help="default tiny; with --init FOLDER (Grounding DINO) the folder's")
    parser.add_argument("--epochs", type=int, help="default: per preset (tiny 12)")
    parser.add_argument("--batch-size", type=int, help="per process; default per preset")
    parser.add_argument("--lr", type=float, help="default: per preset (tiny 2e-3)")
    parser.add_argument("--lr-drop", type=int, help="epoch at which the lr drops 10x")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--clip-grad", type=float, default=0.1, help="max gradient norm")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in total")
    parser.add_argument("--out", default=None, help="run folder (default runs/<script>)")
    parser.add_argument("--resume", help="a checkpoint (last.pt) to continue exactly")
    parser.add_argument("--init", help="start from these weights (new optimiser): a checkpoint "
                        "of this project, a Grounding DINO folder (config.json, "
                        "model.safetensors, vocab.txt or tokenizer.json), or the original "
                        "groundingdino_swint_ogc.pth (with --model swin_t --text-encoder "
                        "path/to/bert-base-uncased)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16"],
                        help="bf16 autocast (CUDA only)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                        help="deformable-attention backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    parser.add_argument("--novel", help="comma-separated novel class names (else split.json)")
    parser.add_argument("--pretrained-backbone", action="store_true",
                        help="start the backbone from torchvision's ImageNet weights")
    parser.add_argument("--text-encoder",
                        help="generated (default: a small BERT, its vocabulary made in code) "
                             "or a local BERT folder")
    parser.add_argument("--freeze", action="append", default=[], choices=["backbone", "text"],
                        help="keep the backbone (Swin, its stage norms) or the text encoder "
                             "as they start (repeatable)")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also write last.pt every this many steps (0: every epoch only)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip (and count) a step whose loss is NaN or Inf instead of "
                             "stopping the run")
    parser.add_argument("--match-cost", default="focal", choices=HungarianMatcher.CLASS_COSTS,
                        help="class part of the Hungarian matching cost: focal (DINO-style) or "
                             "binary_focal (the release's, METHOD section 4)")
    parser.add_argument("--contrastive-weight", type=float, default=1.0,
                        help="weight of L_contra (the release uses 100, METHOD section 4)")
    parser.add_argument("--dn-label-noise", type=fraction, default=None,
                        help="share of DN queries given a wrong prompt (default: per preset, "
                             "0.25; the release uses 0.5)")
    parser.add_argument("--prompts", default="visual", choices=["visual", "text", "both"],
                        help="what a step prompts with: visual instructions (METHOD 2.5), "
                             "class names (the batch's and other base classes, as Grounding "
                             "DINO fine-tunes), or either at random, one per step")
    parser.add_argument("--eval-split", default="val", help="split evaluated at the end")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    return parser


def finish_args(args: argparse.Namespace, script: str) -> argparse.Namespace:
    """Fill preset-dependent defaults. The model comes from --model, else from what --init or
    --resume names (args.model_from): a Grounding DINO folder (training defaults swin_t's) or
    a checkpoint of this project (its own settings). SystemExit if --model,
    --pretrained-backbone or --text-encoder asks for another than such a source brings."""
    args.model_from, saved_model = None, None
    if args.init and Path(args.init).is_dir():
        args.model_from, saved_model = args.init, "swin_t"
    elif args.model is None and Path(args.resume or args.init or "").is_file():
        saved = load_checkpoint(args.resume or args.init)
        if isinstance(saved, dict) and {"config", "args"} <= saved.keys():
            args.model_from, saved_model = args.resume or args.init, saved["args"].get("model")
    if args.model_from:
        given = [flag for flag, value in (("--model", args.model), ("--text-encoder",
                 args.text_encoder), ("--pretrained-backbone", args.pretrained_backbone)) if value]
        if given:
            kind = "Grounding DINO folder" if Path(args.model_from).is_dir() else "checkpoint"
            raise SystemExit(f"{args.model_from} is a {kind}, which brings its own backbone "
                             f"and text encoder: drop {' and '.join(given)}")
        args.model = saved_model
    args.model = args.model or "tiny"
    args.text_encoder = args.text_encoder or "generated"
    for key, value in TRAIN_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = f"runs/{script}"
    return args


# ----------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """Everything the loop needs, built once by `set_up`."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    model: DINOR1                    # the detector: checkpoints, evaluation
    network: torch.nn.Module         # what a step calls: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    objective: "SFTObjective"
    samples: "SeededSamples"
    sampler: DistributedSampler
    prompt_sampler: "PromptSampler"
    steps_per_epoch: int
    total_steps: float               # math.inf without --max-steps
    out: Path
    log: IO | None                   # log.jsonl, open in the main process only
    amp: bool                        # bf16 autocast (CUDA only)
    step: int = 0                    # optimiser steps taken so far

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_up(args, objective: "SFTObjective") -> tuple[Run, int, int]:
    """Processes, model, data, optimiser and, with --resume, the saved state.
    Returns (run, first epoch, batches of that epoch already done)."""
    device, rank, world_size = setup_distributed(args.device)
    torch.manual_seed(args.seed)                          # the model's initial weights
    model = build_detector(args).to(device)
    freeze(model, args.freeze)
    dataset, samples, sampler, steps_per_epoch = training_data(args, model, rank, world_size)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, steps_per_epoch)
    epoch, step, first_batch = restore(args, model, optimizer, scheduler, objective)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            truncate_log(out / "log.jsonl", step)
        (out / "config.json").write_text(json.dumps(
            {"args": vars(args), "model": asdict(model.config), "world_size": world_size},
            indent=2))
    network = model
    if world_size > 1:
        # Text steps leave the visual prompt encoder without gradient, and it must not
        # hold DDP's reduction up.
        network = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.prompts != "visual")
    run = Run(args=args, device=device, rank=rank, world_size=world_size, model=model,
              network=network, optimizer=optimizer, scheduler=scheduler, objective=objective,
              samples=samples, sampler=sampler,
              prompt_sampler=PromptSampler(args.prompts, dataset.class_names,
                                           dataset.base_classes, model.text_encoder.name_tokens),
              steps_per_epoch=steps_per_epoch,
              total_steps=min(args.epochs * steps_per_epoch, args.max_steps or math.inf),
              out=out, log=open(out / "log.jsonl", "a") if rank == 0 else None,
              amp=args.amp == "bf16" and device.type == "cuda",
              step=step)
    return run, epoch, first_batch


def setup_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """Single process by default; under torchrun, one process per GPU (nccl) or CPU (gloo).
    Returns (device, rank, world_size)."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def build_detector(args) -> DINOR1:
    """The --model preset with the command line's backbone weights and text encoder, or the
    model args.model_from brings (see finish_args); the command line's kernel and, if given,
    DN label noise."""
    if args.model_from and Path(args.model_from).is_dir():
        try:
            config = replace(grounding_dino_config(args.model_from), kernel=args.kernel)
        except (OSError, ValueError) as error:
            raise SystemExit(f"cannot start from --init {args.model_from}: {error}") from error
    elif args.model_from:
        saved = load_checkpoint(args.model_from)["config"]
        config = DetectorConfig.from_saved(saved, kernel=args.kernel, pretrained_backbone=False)
    else:
        config = replace(PRESETS[args.model], kernel=args.kernel, text_encoder=args.text_encoder,
                         pretrained_backbone=args.pretrained_backbone)
    if args.dn_label_noise is not None:
        config = replace(config, dn_label_noise=args.dn_label_noise)
    return DINOR1(config)


def frozen_modules(model: DINOR1, parts: list[str]) -> list[torch.nn.Module]:
    """The modules --freeze names: "backbone" (the backbone network and Swin's stage norms,
    not the neck) and "text" (the text encoder)."""
    modules = {"backbone": [model.backbone.body, model.backbone.stage_norms],
               "text": [model.text_encoder]}
    return [module for part in parts for module in modules[part] if module is not None]


def freeze(model: DINOR1, parts: list[str]) -> None:
    """--freeze: these parts get no gradient and no optimiser state (and run in eval mode,
    see run_epoch), as users fine-tuning Grounding DINO on little data often keep them."""
    for module in frozen_modules(model, parts):
        module.requires_grad_(False)


def training_data(args, model: DINOR1, rank: int, world_size: int):
    """The train split, seeded per sample, sharded per process.
    Returns (dataset, samples, sampler, steps per epoch)."""
    novel = args.novel.split(",") if args.novel else None
    try:
        dataset = build_dataset(args.data, "train", train=True, novel=novel,
                                image_size=model.config.image_size, max_size=model.config.max_size)
    except DataError as error:
        raise SystemExit(f"cannot train on --data {args.data}: {error}") from error
    if len(dataset.instance_labels) == 0:
        raise SystemExit(f"{dataset.annotation_file} has no usable boxes to train on")
    if not args.no_eval:       # find a missing evaluation split now, not after training
        try:
            split_files(resolve_data_root(args.data), args.eval_split)
        except DataError as error:
            raise SystemExit(f"cannot evaluate at the end (--eval-split {args.eval_split}): "
                             f"{error}; pass --no-eval to train anyway") from error
    samples = SeededSamples(ReplaceUnreadable(dataset), args.seed)
    sampler = DistributedSampler(samples, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"the train split has {len(dataset)} images: fewer than one batch of "
                         f"{args.batch_size} per process")
    return dataset, samples, sampler, steps_per_epoch


def make_optimizer(model: DINOR1, args) -> torch.optim.AdamW:
    """AdamW; the backbone (and a pretrained BERT text encoder, as Grounding DINO fine-tunes
    it) at 0.1x the learning rate; no weight decay on norms, biases and embeddings
    (METHOD.md section 2, paper-scale settings). Fused on the CPU and CUDA (one kernel for
    every parameter, no per-parameter host reads), else the multi-tensor `foreach` form."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_backbone = name.startswith(("backbone.body.", "backbone.stage_norms.",
                                       "text_encoder.bert."))
        no_decay = (parameter.ndim < 2 or id(parameter) in embeddings
                    or "embed" in name.rsplit(".", 1)[-1])
        groups.setdefault((in_backbone, no_decay), []).append(parameter)
    return torch.optim.AdamW(
        [{"params": params, "lr": args.lr * (0.1 if in_backbone else 1.0),
          "weight_decay": 0.0 if no_decay else args.weight_decay}
         for (in_backbone, no_decay), params in sorted(groups.items())], lr=args.lr,
        **fused_or_foreach(next(model.parameters()).device))


def fused_or_foreach(device: torch.device) -> dict:
    """AdamW's fastest implementation on `device`: fused where torch has it, else foreach."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def make_scheduler(optimizer, args, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then a 10x step decay at epoch `lr_drop`."""
    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / max(args.warmup_steps, 1))
        return warmup * (0.1 if step >= args.lr_drop * steps_per_epoch else 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore(args, model: DINOR1, optimizer, scheduler, objective) -> tuple[int, int, int]:
    """--init loads weights only; --resume everything. Returns (epoch, step, batches of
    that epoch already done)."""
    if args.init and Path(args.init).is_dir():
        try:
            loaded = load_grounding_dino_weights(model, args.init)
        except (OSError, ValueError) as error:
            raise SystemExit(f"cannot start from --init {args.init}: {error}") from error
        print(f"--init {args.init}: {loaded.loaded} tensors of Grounding DINO; starting fresh: "
              f"{', '.join(loaded.fresh)}; left out by design: {len(loaded.unused)}")
    elif args.init and is_original_grounding_dino(checkpoint := load_checkpoint(args.init)):
        try:
            loaded = load_original_grounding_dino_weights(model, args.init, checkpoint)
        except ValueError as error:
            raise SystemExit(f"cannot start from --init {args.init}: {error}") from error
        print(f"--init {args.init}: {loaded.loaded} tensors of the original Grounding DINO; "
              f"starting fresh: {', '.join(loaded.fresh)}")
    elif args.init:
        model.load_state_dict(compatible_checkpoint(args.init, model, args)["model"])
    if not args.resume:
        return 0, 0, 0
    checkpoint = compatible_checkpoint(args.resume, model, args)
    model.load_state_dict(checkpoint["model"])
    saved = checkpoint["optimizer"]
    # A checkpoint from before the fused optimiser holds groups without it: take this
    # device's implementation (the moments are the same; their step counts move with it).
    implementation = {key: optimizer.param_groups[0][key] for key in ("fused", "foreach")}
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **implementation}
                                                         for group in saved["param_groups"]]})
    scheduler.load_state_dict(checkpoint["scheduler"])
    objective.load_state_dict(checkpoint["objective"], model)
    return checkpoint["epoch"], checkpoint["step"], checkpoint["batch_in_epoch"]


# ----------------------------------------------------------------------------- the objective

class SFTObjective:
    """L_SFT + L_contra (METHOD section 3). train_grqo.GRQOObjective extends it."""

    def __init__(self, match_cost: str = "focal", contrastive_weight: float = 1.0):
        self.criterion = SetCriterion(HungarianMatcher(class_cost=match_cost),
                                      contrastive_weight=contrastive_weight)

    def start_epoch(self, model: DINOR1, epoch: int) -> None:
        """Called before every epoch (GRQO refreshes its reference model here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: DINOR1) -> None:
        pass

    def __call__(self, network, batch: Batch, prompts: "VisualInstructions | TextPrompts",
                 targets: list, num_boxes: float, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the loss to minimise and named terms for logging. `network` is the
        detector, or its DDP wrapper under torchrun; `generator` draws the denoising noise."""
        output = network(batch.images, batch.mask, detector_prompts(prompts),
                         dn_targets=targets, generator=generator)
        terms = self.criterion(output, targets, num_boxes)
        return terms["sft"], terms


class PullToStart(SFTObjective):
    """SFT plus a plain L2 pull of the weights toward those the run started from (--init):
    (weight / 2) * sum ||w - w_start||^2 over the trained weights, the simplest trust region
    ("L2-SP", Li et al. 2018), against which GRQO's KL to a reference is measured
    (benchmarks/shift.py). The start is taken before the first step and saved in
    checkpoints, so a resumed run pulls toward the same weights."""

    def __init__(self, match_cost: str, contrastive_weight: float, weight: float):
        super().__init__(match_cost, contrastive_weight)
        self.weight, self.start = weight, None

    def start_epoch(self, model: DINOR1, epoch: int) -> None:
        if self.start is None:
            self.start = {name: value.detach().clone()
                          for name, value in model.named_parameters() if value.requires_grad}

    def state_dict(self) -> dict:
        return {} if self.start is None else {"start": self.start}

    def load_state_dict(self, state: dict, model: DINOR1) -> None:
        if "start" not in state:
            raise SystemExit("--resume: the checkpoint holds no start to pull toward (it was "
                             "not trained with --init-l2); resume it without --init-l2")
        device = next(model.parameters()).device
        self.start = {name: value.to(device) for name, value in state["start"].items()}

    def __call__(self, network, batch, prompts, targets, num_boxes, generator=None):
        loss, terms = super().__call__(network, batch, prompts, targets, num_boxes, generator)
        model = getattr(network, "module", network)                 # DDP's wrapped detector
        terms["pull"] = self.weight / 2 * sum(
            (value - self.start[name]).pow(2).sum()
            for name, value in model.named_parameters() if name in self.start)
        return loss + terms["pull"], terms


def detector_prompts(prompts: "VisualInstructions | TextPrompts"
                     ) -> "VisualInstructions | list[str]":
    """A step's prompts as the detector takes them (model.Prompting): visual instructions as
    they are, text prompts as their class names."""
    if isinstance(prompts, TextPrompts):
        return prompts.class_names
    return prompts


class PromptSampler:
    """What a training step prompts with (--prompts): visual instructions (METHOD 2.5),
    text prompts (the batch's classes and negatives from the base classes), or "both":
    either, by a coin flip per step, the same in every process. Called with a batch, the
    step's generator and the coin's; returns (prompts, targets with prompt indices as
    labels)."""

    def __init__(self, mode: str, class_names: list[str], base_classes: list[int],
                 name_tokens: Callable[[str], int]):
        """name_tokens: what a class name costs in a caption (BertTextEncoder.name_tokens)."""
        self.mode, self.class_names, self.base_classes = mode, class_names, base_classes
        self.name_tokens = name_tokens

    def __call__(self, batch: Batch, generator: torch.Generator, coin: torch.Generator):
        mode = self.mode
        if mode == "both":
            mode = "visual" if torch.rand((), generator=coin).item() < 0.5 else "text"
        if mode == "visual":
            return sample_prompts(batch, self.class_names, generator)
        return sample_text_prompts(batch, self.class_names, self.base_classes, generator,
                                   name_tokens=self.name_tokens,
                                   max_tokens=MAX_TEXT_TOKENS - 2)     # [CLS] and [SEP]


# ----------------------------------------------------------------------------- the loop

class EpochEnd(NamedTuple):
    """Where `train_one_epoch` stopped."""
    step: int                # optimiser steps taken in the run so far
    next_batch: int          # the batch index to continue from
    faults: "EpochFaults"


def train_one_epoch(network: torch.nn.Module, objective: SFTObjective,
                    optimizer: torch.optim.Optimizer, scheduler, batches, device: torch.device,
                    epoch: int, *, seed: int, rank: int, prompt_sampler: PromptSampler,
                    clip_grad: float, amp: bool = False, step: int = 0,
                    skip_nonfinite: bool = False, after_step=None) -> EpochEnd:
    """One pass over `batches`, an iterable of (batch index, Batch), with `network` in
    training mode, prompted as `prompt_sampler` samples. Every random draw of a step (the
    prompts, the denoising noise) comes from generators seeded from (seed, epoch, batch
    index, rank), so a step is the same whether the run was resumed or not. `step` counts
    the optimiser steps taken before; `after_step(step, batch_index, terms, seconds)` is
    called after each one and ends the epoch early by returning True. `amp`: bf16 autocast
    on CUDA."""
    faults = EpochFaults()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    next_batch = None
    for batch_index, batch in batches:
        next_batch = batch_index + 1
        started = time.perf_counter()
        # Prompts are sampled on the host, then everything moves: no read from the device.
        step_prompts, targets = prompt_sampler(
            batch, step_generator(seed, epoch, batch_index, rank, 1),
            step_generator(seed, epoch, batch_index, 2))          # the coin: no rank
        batch = batch.to(device, non_blocking=True)
        targets = [target.to(device, non_blocking=True) for target in targets]
        if isinstance(step_prompts, VisualInstructions):
            step_prompts = step_prompts.to(device, non_blocking=True)
        has_boxes, num_boxes = agree_before_step(any(len(t.labels) for t in targets),
                                                 targets, device)
        if not has_boxes:
            faults.without_boxes += 1       # no box: no visual prompt, nothing to recover
            continue
        with autocast:
            loss, terms = objective(network, batch, step_prompts, targets, num_boxes,
                                    step_generator(seed, epoch, batch_index, rank))
        if not finite_in_every_process(loss):
            message = f"non-finite loss at step {step + 1}: " + ", ".join(
                f"{name}={value.item():.4g}" for name, value in terms.items())
            if not skip_nonfinite:
                raise FloatingPointError(message)
            faults.skipped += 1
            if rank == 0:
                print(f"{message}: step skipped")
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), clip_grad)
        optimizer.step()
        scheduler.step()
        step += 1
        if after_step is not None and after_step(step, batch_index, terms,
                                                 time.perf_counter() - started):
            break
    return EpochEnd(step, next_batch, faults)


def run_epoch(run: Run, epoch: int, first_batch: int) -> None:
    """train_one_epoch over this process's shard of the train split, from batch
    `first_batch` (not 0 when resuming mid-epoch), with a progress bar, logging, --max-steps
    and --save-every; checkpoints at its end."""
    args = run.args
    run.sampler.set_epoch(epoch)
    run.samples.epoch = epoch
    if first_batch == 0:
        run.objective.start_epoch(run.model, epoch)
    run.model.train()
    for module in frozen_modules(run.model, args.freeze):     # no stochastic depth, no dropout
        module.eval()
    replaced_before = run.samples.num_replaced
    bar = tqdm(make_loader(run, first_batch), desc=f"epoch {epoch}", initial=first_batch,
               total=run.steps_per_epoch, disable=not run.is_main, dynamic_ncols=True)

    def after_step(step: int, batch_index: int, terms: dict, seconds: float) -> bool:
        run.step = step
        if step % args.log_every == 0 or step == run.total_steps:
            log_step(run, bar, epoch, terms, seconds)
        if step >= run.total_steps:
            return True                     # the checkpoint below saves this step
        if args.save_every and step % args.save_every == 0 \
                and batch_index + 1 < run.steps_per_epoch:
            save_run(run, epoch, batch_index + 1)
        return False

    try:
        end = train_one_epoch(
            run.network, run.objective, run.optimizer, run.scheduler,
            enumerate(bar, start=first_batch), run.device, epoch, seed=args.seed,
            rank=run.rank, prompt_sampler=run.prompt_sampler, clip_grad=args.clip_grad,
            amp=run.amp, step=run.step, skip_nonfinite=args.skip_nonfinite,
            after_step=after_step)
    except FloatingPointError as error:
        raise FloatingPointError(f"{error}; stopped, {run.out / 'last.pt'} is left as it was "
                                 f"(--skip-nonfinite skips such steps instead)") from None
    except DataError as error:          # a batch the data cannot serve, e.g. a caption's budget
        # From a loader worker, the message holds the worker's traceback: its last line says why.
        reason = str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]
        kept = run.out / "last.pt"
        raise SystemExit(f"training stopped after step {run.step}: {reason}"
                         + (f"; {kept} holds the last checkpoint" if kept.is_file() else "")
                         ) from error
    run.step = end.step
    end.faults.report(run.is_main, epoch, run.samples.num_replaced - replaced_before)
    next_batch = first_batch if end.next_batch is None else end.next_batch
    finished = next_batch >= run.steps_per_epoch
    save_run(run, epoch + 1 if finished else epoch, 0 if finished else next_batch)


def train(args, objective: SFTObjective) -> DINOR1:
    """Train, checkpoint every epoch, evaluate at the end; returns the trained model
    (the run folder is args.out)."""
    run, start_epoch, first_batch = set_up(args, objective)
    for epoch in range(start_epoch, args.epochs):
        if run.step >= run.total_steps:
            break
        run_epoch(run, epoch, first_batch)
        first_batch = 0
    if run.log:
        run.log.close()
    if run.is_main and not args.no_eval:
        final_evaluation(run.model, args, run.out, run.device)
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.model


def log_step(run: Run, bar: tqdm, epoch: int, terms: dict, seconds: float) -> None:
    """One line of log.jsonl (main process): losses, learning rate, time, memory."""
    if not run.is_main:
        return
    read = torch.stack([value.detach().float() for value in terms.values()]).tolist()  # one wait
    values = {name: round(value, 5) for name, value in zip(terms, read)}
    bar.set_postfix({name: f"{value:.3f}" for name, value in values.items()})
    run.log.write(json.dumps(dict(step=run.step, epoch=epoch,
                                  lr=run.scheduler.get_last_lr()[0], step_seconds=seconds,
                                  rss_mb=round(resident_memory_mb(), 1), **values)) + "\n")
    run.log.flush()


def resident_memory_mb() -> float:
    """This process's resident set size (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return 0.0


# ----------------------------------------------------------------------------- reproducible data
# Every random draw of a step comes from a generator seeded from (seed, epoch, batch or
# sample, rank) and passed to what draws: a sample's augmentation (SeededSamples), the
# visual instructions and the denoising noise (step_generator). No code relies on torch's
# global RNG, so `--resume` continues exactly, with any number of DataLoader workers, and no
# RNG state needs saving.

def mix_seed(*values: int) -> int:
    """One seed from several integers (a tuple of ints hashes the same in every process)."""
    return hash(tuple(values)) % (2 ** 62)


def step_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded from several integers: (seed, epoch, batch, rank) for a step's
    denoising noise, with a trailing 1 for its prompts; (seed, epoch, batch, 2) for the
    coin of --prompts both, the same in every process."""
    return torch.Generator().manual_seed(mix_seed(*values))


class SeededSamples(Dataset):
    """Gives each sample's augmentation a generator seeded from (seed, epoch, index), so a
    sample's crop and flip do not depend on workers, order or an interruption."""

    def __init__(self, dataset: ReplaceUnreadable, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    @property
    def num_replaced(self) -> int:
        return self.dataset.num_replaced

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.sample(index, step_generator(self.seed, self.epoch, index))


def make_loader(run: Run, skip_batches: int) -> DataLoader:
    """A loader over this epoch's shard, starting after `skip_batches` batches."""
    args = run.args
    workers = args.workers if args.workers is not None else (
        4 if run.device.type == "cuda" else 0)
    indices = list(run.sampler)[skip_batches * args.batch_size:]
    return DataLoader(run.samples, batch_size=args.batch_size, sampler=indices, drop_last=True,
                      num_workers=workers, pin_memory=run.device.type == "cuda",
                      collate_fn=partial(collate, pad_multiple=run.model.config.pad_multiple))


# ----------------------------------------------------------------------------- checkpoints

def save_run(run: Run, epoch: int, batch_in_epoch: int) -> None:
    """last.pt of the run (main process): where to continue from is (epoch, batch_in_epoch)."""
    if run.is_main:
        save_checkpoint(run.out / "last.pt", {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "epoch": epoch, "step": run.step,
            "batch_in_epoch": batch_in_epoch, "config": asdict(run.model.config),
            "format": CHECKPOINT_FORMAT,
            "args": vars(run.args), "objective": run.objective.state_dict()})


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write leaves
    the previous checkpoint intact."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def compatible_checkpoint(path: str, model: DINOR1, args) -> dict:
    """Load a checkpoint and check it holds this architecture (the kernel, and whether the
    backbone started from ImageNet weights, may differ)."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"model", "config", "args"} <= checkpoint.keys():
        raise SystemExit(f"{path} is not a checkpoint written by train_sft.py or "
                         f"train_grqo.py (it needs 'model', 'config' and 'args')")
    differences = checkpoint_config_differences(checkpoint["config"], model.config)
    if differences:
        raise SystemExit(f"{path} was written with other model settings ({differences}); "
                         f"its run used --model {checkpoint['args'].get('model')}, this one "
                         f"--model {args.model}")
    return checkpoint


# ----------------------------------------------------------------------------- fault handling
# What keeps a long run alive and honest: processes that agree on skipping a step (else DDP's
# gradient all-reduce would wait forever for the ones that skipped), NaN/Inf losses named,
# unreadable images and batches without boxes counted, logs cut back on resume.

@dataclass
class EpochFaults:
    """What an epoch skipped, reported at its end (main process)."""
    skipped: int = 0                     # steps skipped for a non-finite loss
    without_boxes: int = 0               # batches skipped for having no box

    def report(self, is_main: bool, epoch: int, replaced: int) -> None:
        """Print what was skipped, and `replaced`: the unreadable images replaced."""
        if not is_main:
            return
        if replaced:
            print(f"epoch {epoch}: {replaced} unreadable images were replaced by others "
                  f"(in this process; see the warnings above)")
        if self.skipped:
            print(f"epoch {epoch}: {self.skipped} steps skipped for a non-finite loss")
        if self.without_boxes:
            print(f"epoch {epoch}: {self.without_boxes} batches skipped for having no box "
                  f"(under DDP: in any one process)")


def agree_before_step(has_boxes: bool, targets: list, device: torch.device
                      ) -> tuple[bool, float]:
    """One all-reduce before the forward: (whether every process has boxes, so that they
    all skip a step together; the loss normaliser, ground-truth boxes per process averaged
    over processes, >= 1)."""
    num_boxes = float(sum(len(t.labels) for t in targets))
    if not (dist.is_available() and dist.is_initialized()):
        return has_boxes, max(num_boxes, 1.0)           # one process: nothing to agree on
    values = torch.tensor([float(has_boxes), num_boxes], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    world_size = dist.get_world_size()
    return bool(values[0].item() == world_size), max(values[1].item() / world_size, 1.0)


def finite_in_every_process(loss: torch.Tensor) -> bool:
    """One all-reduce after the forward: True when the loss is finite in every process (a
    NaN or Inf in any one must stop or skip the step in all of them, else DDP's gradient
    all-reduce would wait forever for the ones that skipped)."""
    finite = torch.isfinite(loss.detach()).reshape(1).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())                          # the step's one wait for the device


def truncate_log(log_file: Path, step: int) -> None:
    """Keep the lines of a log up to `step`: a run killed after its last checkpoint logged
    steps that the resumed run repeats, and may have left a half-written last line."""
    def kept(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line)["step"] <= step
        except ValueError:      # a half-written line, or one that a later line was glued to
            return False

    if log_file.is_file():
        lines = log_file.read_text().splitlines(keepends=True)
        temporary = log_file.with_name(log_file.name + ".tmp")
        temporary.write_text("".join(line for line in lines if kept(line)))
        os.replace(temporary, log_file)


# ----------------------------------------------------------------------------- the end

def final_evaluation(model: DINOR1, args, out: Path, device: torch.device) -> dict:
    """Generic-prompt evaluation on the evaluation split; metrics.json and prediction PNGs."""
    import evaluate
    try:
        metrics = evaluate.evaluate(model, args.data, split=args.eval_split, prompt="generic",
                                    device=device, vis_dir=out / "predictions",
                                    novel=args.novel.split(",") if args.novel else None)
    except DataError as error:          # the checkpoint is safe; say how to evaluate it later
        print(f"the final evaluation failed: {error}; the trained model is in "
              f"{out / 'last.pt'}: python evaluate.py --ckpt {out / 'last.pt'}")
        return {}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(evaluate.format_per_class(metrics))
    print(evaluate.format_table(metrics))
    print(f"metrics: {out / 'metrics.json'}; predictions drawn in {out / 'predictions'}")
    return metrics


def main(argv=None) -> DINOR1:
    parser = make_parser()
    parser.add_argument("--init-l2", type=float, default=0.0, metavar="WEIGHT",
                        help="add (WEIGHT / 2) * sum ||w - w_start||^2, a pull toward the "
                             "weights the run started from (--init); 0: none")
    args = finish_args(parser.parse_args(argv), "sft")
    if args.init_l2 < 0:
        parser.error(f"--init-l2 must be at least 0, got {args.init_l2}")
    if args.init_l2 and not args.init:
        parser.error("--init-l2 pulls toward the weights of --init: give --init")
    if args.init_l2:
        return train(args, PullToStart(args.match_cost, args.contrastive_weight, args.init_l2))
    return train(args, SFTObjective(args.match_cost, args.contrastive_weight))


if __name__ == "__main__":
    main()
