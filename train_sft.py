"""Supervised fine-tuning (SFT), the baseline of METHOD.md section 3, and the training loop
that train_grqo.py reuses.

    python train_sft.py                          # tiny preset on the embedded shapes data
    python train_sft.py --data coco --model swin_t --amp bf16
    torchrun --nproc_per_node 8 train_sft.py --data coco --model swin_t --amp bf16

Read top to bottom: settings (argparse), distributed setup, the data, the optimiser, one
step, checkpoints, the loop, the final evaluation.

Reproducibility: every random draw of a step (data augmentation, visual instructions,
denoising noise) is seeded from (seed, epoch, sample or step, rank), so `--resume`
continues exactly, with any number of DataLoader workers.
"""

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from data import (Batch, DataError, build_dataset, collate, instance_image_index,
                  resolve_data_root, sample_visual_instructions, split_files)
from model import (PRESETS, DetectorConfig, DINOR1, HungarianMatcher, SetCriterion,
                   VisualInstructions, load_checkpoint)

# Training defaults per model preset (any of them can be overridden on the command line).
TRAIN_DEFAULTS = {
    "tiny": dict(epochs=12, batch_size=8, lr=2e-3, lr_drop=10, warmup_steps=100),
    "swin_t": dict(epochs=12, batch_size=2, lr=1e-4, lr_drop=11, warmup_steps=1000),
    "r50": dict(epochs=12, batch_size=2, lr=1e-4, lr_drop=11, warmup_steps=1000),
}


# ----------------------------------------------------------------------------- settings

def make_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="shapes", help="shapes | coco | a COCO-format folder")
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS))
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
    parser.add_argument("--init", help="start from this checkpoint's weights (new optimiser)")
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
    parser.add_argument("--text-encoder", default="bytes")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also write last.pt every this many steps (0: every epoch only)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="skip (and count) a step whose loss is NaN or Inf instead of "
                             "stopping the run")
    parser.add_argument("--match-cost", default="focal", choices=HungarianMatcher.CLASS_COSTS,
                        help="class part of the Hungarian matching cost: focal (DINO-style) or "
                             "binary_focal (the release's, METHOD section 4)")
    parser.add_argument("--eval-split", default="val", help="split evaluated at the end")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    return parser


def finish_args(args: argparse.Namespace, script: str) -> argparse.Namespace:
    """Fill preset-dependent defaults."""
    for key, value in TRAIN_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = f"runs/{script}"
    return args


# ----------------------------------------------------------------------------- distributed

def setup_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """Single process by default; under torchrun, one process per GPU (nccl) or CPU (gloo).
    Returns (device, rank, world_size)."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(device_name)
    if world_size > 1:
        if device_name == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl" if device_name == "cuda" else "gloo")
    return device, rank, world_size


def average_across_processes(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


# ----------------------------------------------------------------------------- data

class SeededSamples(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) before each sample's augmentation, so a
    sample's crop and flip do not depend on workers, order or an interruption."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        torch.manual_seed(mix_seed(self.seed, self.epoch, index))
        return self.dataset[index]


def make_loader(samples: SeededSamples, sampler: DistributedSampler, batch_size: int,
                workers: int, skip_batches: int) -> DataLoader:
    """A loader over this epoch's shard, starting after `skip_batches` batches."""
    indices = list(sampler)[skip_batches * batch_size:]
    return DataLoader(samples, batch_size=batch_size, sampler=indices, drop_last=True,
                      collate_fn=collate, num_workers=workers)


def mix_seed(*values: int) -> int:
    """One seed from several integers (a tuple of ints hashes the same in every process)."""
    return hash(tuple(values)) % (2 ** 62)


def make_instructions(batch: Batch, class_names: list[str],
                      generator: torch.Generator) -> tuple[VisualInstructions, list]:
    """METHOD 2.5: one random exemplar per class present in the batch becomes that class's
    prompt for every image. Returns the instructions and the targets with labels re-indexed
    to prompt indices (0..K-1, classes in ascending order)."""
    sample = sample_visual_instructions(batch.targets, generator)
    classes = sample.classes.to(batch.images.device)
    targets = [replace(t, labels=torch.searchsorted(classes, t.labels)) for t in batch.targets]
    all_labels = torch.cat([t.labels for t in targets])
    instructions = VisualInstructions(
        boxes=torch.cat([t.boxes for t in batch.targets]),
        image_index=instance_image_index(batch.targets).to(batch.images.device),
        labels=all_labels, selected=sample.instance_index.to(batch.images.device),
        class_names=[class_names[c] for c in sample.classes.tolist()])
    return instructions, targets


# ----------------------------------------------------------------------------- optimiser

def make_optimizer(model: DINOR1, args) -> torch.optim.AdamW:
    """AdamW; the backbone at 0.1x the learning rate; no weight decay on norms, biases and
    embeddings (METHOD.md section 2, paper-scale settings)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_backbone = name.startswith("backbone.body.")
        no_decay = (parameter.ndim < 2 or id(parameter) in embeddings
                    or "embed" in name.rsplit(".", 1)[-1])
        groups.setdefault((in_backbone, no_decay), []).append(parameter)
    return torch.optim.AdamW(
        [{"params": params, "lr": args.lr * (0.1 if in_backbone else 1.0),
          "weight_decay": 0.0 if no_decay else args.weight_decay}
         for (in_backbone, no_decay), params in sorted(groups.items())], lr=args.lr)


def make_scheduler(optimizer, args, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then a 10x step decay at epoch `lr_drop`."""
    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / max(args.warmup_steps, 1))
        return warmup * (0.1 if step >= args.lr_drop * steps_per_epoch else 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- one step

class SFTObjective:
    """L_SFT + L_contra (METHOD section 3). train_grqo.GRQOObjective extends it."""
    name = "sft"

    def __init__(self, args):
        self.criterion = SetCriterion(HungarianMatcher(class_cost=args.match_cost))

    def start_epoch(self, model: DINOR1, epoch: int) -> None:
        """Called before every epoch (GRQO refreshes its reference model here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model: DINOR1) -> None:
        pass

    def __call__(self, model, batch: Batch, instructions: VisualInstructions, targets: list,
                 num_boxes: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the loss to minimise and named terms for logging."""
        output = model(batch.images, batch.mask, instructions=instructions, dn_targets=targets)
        terms = self.criterion(output, targets, num_boxes)
        return terms["sft"], terms


# ----------------------------------------------------------------------------- checkpoints

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
    """Load a checkpoint and check it holds this architecture (the kernel may differ)."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"model", "config", "args"} <= checkpoint.keys():
        raise SystemExit(f"{path} is not a checkpoint written by train_sft.py or "
                         f"train_grqo.py (it needs 'model', 'config' and 'args')")
    ours = {k: v for k, v in asdict(model.config).items() if k != "kernel"}
    theirs = {k: v for k, v in checkpoint["config"].items() if k != "kernel"}
    if ours != theirs:
        differences = ", ".join(f"{k}: {theirs.get(k)!r} there, {v!r} here"
                                for k, v in ours.items() if theirs.get(k) != v)
        raise SystemExit(f"{path} holds a different model (preset "
                         f"{checkpoint['args'].get('model')!r}, not --model {args.model}): "
                         f"{differences}")
    return checkpoint


def rng_state(device: torch.device) -> dict:
    """The generators' states at the checkpoint, for inspection: resuming does not need
    them, since every step and sample reseeds from (seed, epoch, batch or index, rank)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# ----------------------------------------------------------------------------- the loop

def true_in_every_process(condition: bool, device: torch.device) -> bool:
    """`condition` and-ed over the processes (all must skip a step together, or DDP's
    gradient all-reduce would wait forever for the ones that skipped)."""
    value = torch.tensor([float(condition)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


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


def nonfinite_message(terms: dict, step: int) -> str:
    values = ", ".join(f"{name}={value.item():.4g}" for name, value in terms.items())
    return f"non-finite loss at step {step + 1}: {values}"


def resident_memory_mb() -> float:
    """This process's resident set size (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return 0.0


def build_model_for(args, device: torch.device) -> DINOR1:
    config = PRESETS[args.model]
    config = DetectorConfig(**{**asdict(config), "kernel": args.kernel,
                               "pretrained_backbone": args.pretrained_backbone,
                               "text_encoder": args.text_encoder})
    return DINOR1(config).to(device)


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
    samples = SeededSamples(dataset, args.seed)
    sampler = DistributedSampler(samples, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"the train split has {len(dataset)} images: fewer than one batch of "
                         f"{args.batch_size} per process")
    return dataset, samples, sampler, steps_per_epoch


def restore(args, model: DINOR1, optimizer, scheduler, objective) -> tuple[int, int, int]:
    """--init loads weights only; --resume everything. Returns (epoch, step, batches of
    that epoch already done)."""
    if args.init:
        model.load_state_dict(compatible_checkpoint(args.init, model, args)["model"])
    if not args.resume:
        return 0, 0, 0
    checkpoint = compatible_checkpoint(args.resume, model, args)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    objective.load_state_dict(checkpoint["objective"], model)
    return checkpoint["epoch"], checkpoint["step"], checkpoint["batch_in_epoch"]


def write_log_line(log, **values) -> None:
    log.write(json.dumps(values) + "\n")
    log.flush()


def report_skips(epoch: int, replaced: int, skipped: int, without_boxes: int) -> None:
    if replaced:
        print(f"epoch {epoch}: {replaced} unreadable images were replaced by others "
              f"(see the warnings above)")
    if skipped:
        print(f"epoch {epoch}: {skipped} steps skipped for a non-finite loss")
    if without_boxes:
        print(f"epoch {epoch}: {without_boxes} batches skipped for having no box "
              f"(under DDP: in any one process)")


def train(args, objective: SFTObjective) -> DINOR1:
    """Train, checkpoint every epoch, evaluate at the end; returns the trained model
    (the run folder is args.out)."""
    device, rank, world_size = setup_distributed(args.device)
    is_main = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    model = build_model_for(args, device)
    dataset, samples, sampler, steps_per_epoch = training_data(args, model, rank, world_size)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args, steps_per_epoch)
    start_epoch, step, skip_batches = restore(args, model, optimizer, scheduler, objective)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            truncate_log(out / "log.jsonl", step)
        (out / "config.json").write_text(json.dumps(
            {"args": vars(args), "model": asdict(model.config), "world_size": world_size},
            indent=2))
    network = model
    if world_size > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=args.amp == "bf16" and device.type == "cuda")
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    log = open(out / "log.jsonl", "a") if is_main else None

    def checkpoint_state(epoch: int, batch_in_epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                "batch_in_epoch": batch_in_epoch, "config": asdict(model.config),
                "args": vars(args), "objective": objective.state_dict(),
                "rng": rng_state(device)}

    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        samples.epoch = epoch
        if skip_batches == 0:
            objective.start_epoch(model, epoch)
        loader = make_loader(samples, sampler, args.batch_size, workers, skip_batches)
        bar = tqdm(loader, desc=f"epoch {epoch}", initial=skip_batches, total=steps_per_epoch,
                   disable=not is_main, dynamic_ncols=True)
        replaced = skipped = without_boxes = 0
        model.train()
        batch_index = skip_batches
        for batch_index, batch in enumerate(bar, start=skip_batches):
            started = time.perf_counter()
            torch.manual_seed(mix_seed(args.seed, epoch, batch_index, rank))
            batch = batch.to(device)
            replaced += batch.num_replaced
            instructions, targets = make_instructions(
                batch, dataset.class_names, mix_generator(args.seed, epoch, batch_index, rank))
            if not true_in_every_process(len(instructions.class_names) > 0, device):
                without_boxes += 1      # no box, no prompt: nothing to learn from
                continue
            num_boxes = max(average_across_processes(
                float(sum(len(t.labels) for t in targets)), device), 1.0)
            with autocast:
                loss, terms = objective(network, batch, instructions, targets, num_boxes)
            if not true_in_every_process(bool(torch.isfinite(loss.detach())), device):
                if not args.skip_nonfinite:
                    raise FloatingPointError(nonfinite_message(terms, step) + f"; stopped, "
                                             f"{out / 'last.pt'} is left as it was "
                                             f"(--skip-nonfinite skips such steps instead)")
                skipped += 1
                if is_main:
                    print(nonfinite_message(terms, step) + ": step skipped")
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            step += 1
            if is_main and (step % args.log_every == 0 or step == total_steps):
                values = {k: round(v.item(), 5) for k, v in terms.items()}
                bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()})
                write_log_line(log, step=step, epoch=epoch, lr=scheduler.get_last_lr()[0],
                               step_seconds=time.perf_counter() - started,
                               rss_mb=round(resident_memory_mb(), 1), **values)
            if step >= total_steps:
                break               # the checkpoint after the loop saves this step
            if is_main and args.save_every and step % args.save_every == 0 \
                    and batch_index + 1 < steps_per_epoch:
                save_checkpoint(out / "last.pt", checkpoint_state(epoch, batch_index + 1))
        finished_epoch = batch_index + 1 >= steps_per_epoch
        skip_batches = 0
        if is_main:
            report_skips(epoch, replaced, skipped, without_boxes)
            save_checkpoint(out / "last.pt", checkpoint_state(
                epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else batch_index + 1))
    if log:
        log.close()
    if is_main and not args.no_eval:
        final_evaluation(model, args, out, device)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return model


def mix_generator(*values: int) -> torch.Generator:
    """A generator for one step's visual instructions, seeded from (seed, epoch, batch, rank)."""
    return torch.Generator().manual_seed(mix_seed(*values, 1))


def final_evaluation(model: DINOR1, args, out: Path, device: torch.device) -> dict:
    """Generic-prompt evaluation on the evaluation split; metrics.json and prediction PNGs."""
    import evaluate
    metrics = evaluate.evaluate(model, args.data, split=args.eval_split, prompt="generic",
                                device=device, vis_dir=out / "predictions",
                                novel=args.novel.split(",") if args.novel else None)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(evaluate.format_per_class(metrics))
    print(evaluate.format_table(metrics))
    print(f"metrics: {out / 'metrics.json'}; predictions drawn in {out / 'predictions'}")
    return metrics


def main(argv=None) -> DINOR1:
    args = finish_args(make_parser().parse_args(argv), "sft")
    return train(args, SFTObjective(args))


if __name__ == "__main__":
    main()
