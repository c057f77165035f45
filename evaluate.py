"""Evaluate a checkpoint with COCO AP (pycocotools), in the paper's prompt modes.

    python evaluate.py --ckpt runs/grqo/last.pt                     # generic prompts, val
    python evaluate.py --ckpt runs/grqo/last.pt --prompt text
    python evaluate.py --ckpt CKPT --data coco --split val --shots 10 --vis vis/

Prompt modes (METHOD.md section 1):
- generic: one prototype per class, the mean of K exemplar embeddings drawn from the support
  split (all of them without --shots). A closed-set detector; the paper's zero-shot protocol.
- text: the class names through the text encoder.
- interactive: each image is prompted with its own ground-truth boxes (one prompt per class
  present: the mean embedding of that class's boxes on the image).

Metrics: AP, AP50, AP75, APs, APm, APl over all classes, AP over base and over novel classes
(COCOeval with params.catIds restricted), and AP per class. A metric that COCOeval cannot
compute (no large objects in the split, no novel classes) is None and printed as "-".
`duplicates` is the share of detections scoring >= 0.3 that repeat a higher-scored
detection of the same prompt (IoU > 0.7).
"""

import argparse
import contextlib
import io
import json
from functools import partial
from pathlib import Path

import torch
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Subset
from torchvision.ops import box_iou, nms
from PIL import Image
from torchvision.transforms.functional import (InterpolationMode, pil_to_tensor, resize,
                                               to_pil_image)
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from checkpoints import CHECKPOINT_FORMAT, UNTRAINED_VISUAL_PROMPTS, load_detector, resolve_device
from data import (Batch, CocoDetection, DataError, build_dataset, collate,
                  instance_image_index, resolve_data_root, sample_exemplars, split_files)
from model import (DINOR1, Detections, PromptTokens, expand_prompts, one_token_per_class,
                   postprocess)

SUMMARY_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# Box colours, one per class or prompt: light, for black label text, and unlike the
# saturated red, green, blue and yellow of the shapes data, so that a box's colour never
# reads as a class.
COLOURS = ["white", "magenta", "cyan", "orange", "pink", "violet", "lightgrey", "tan"]


# ----------------------------------------------------------------------------- shared prompts
# Generic and text prompts are one set of C class prompts shared by every image: the builders
# below make them once per evaluation, `detect` runs them.

@torch.no_grad()
def generic_prototypes(model: DINOR1, support: CocoDetection, shots: int | None, seed: int,
                       device, batch_size: int = 8) -> tuple[torch.Tensor, list[int]]:
    """One prototype per class with an exemplar: the mean embedding of its exemplars.

    Returns (prototypes (C', d), the class index of each prototype)."""
    exemplars = sample_exemplars(support, shots, seed)
    by_image: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for class_index, items in exemplars.items():
        for dataset_index, box in items:
            by_image.setdefault(dataset_index, []).append((class_index, box))
    image_indices = sorted(by_image)
    d = model.config.hidden_dim
    sums = torch.zeros(len(support.class_names), d, device=device)
    counts = torch.zeros(len(support.class_names), device=device)
    loader = DataLoader(Subset(support, image_indices), batch_size=batch_size,
                        collate_fn=partial(collate, pad_multiple=model.config.pad_multiple))
    position = 0
    for batch in tqdm(loader, desc="prototypes", leave=False):
        batch = batch.to(device)
        image_index, boxes, classes = [], [], []
        for b in range(len(batch.targets)):
            for class_index, box in by_image[image_indices[position + b]]:
                image_index.append(b), boxes.append(box), classes.append(class_index)
        position += len(batch.targets)
        embeddings = model.encode_exemplars(batch.images, batch.mask,
                                            torch.tensor(image_index, device=device),
                                            torch.stack(boxes).to(device))
        classes = torch.tensor(classes, device=device)
        sums.index_add_(0, classes, embeddings.float())
        counts.index_add_(0, classes, torch.ones_like(classes, dtype=torch.float))
    present = sorted(exemplars)
    return sums[present] / counts[present, None], present


def default_support_split(data: str) -> str:
    """`support` where the data has that split (the shapes data does), else `train`."""
    try:
        split_files(resolve_data_root(data), "support")
        return "support"
    except DataError:
        print(f"no 'support' split in {data}: generic prompts take their exemplars from "
              f"'train'")
        return "train"


@torch.no_grad()
def text_prompt_chunks(model: DINOR1, names: list[str], chunk_size: int
                       ) -> list[tuple[int, PromptTokens]]:
    """Class names read as text once, for every batch: chunks of at most `chunk_size` names
    (with BERT, one Grounding DINO caption each, within its 256 tokens), as (index of the
    chunk's first name, its prompts for a batch of one)."""
    return [(start, model.text_encoder.caption(names[start:end]))
            for start, end in model.text_encoder.caption_chunks(names, chunk_size)]


@torch.no_grad()
def detect(model: DINOR1, batch: Batch,
           prompts: torch.Tensor | list[tuple[int, PromptTokens]], prompt_classes: list[int],
           chunk_size: int, top_k: int = 300) -> list[Detections]:
    """Run shared prompts over a batch: C vectors (C, d), `chunk_size` at a time (LVIS has
    1,203 classes), or the chunks of text_prompt_chunks; merges the chunks and keeps each
    image's top_k. Labels become class indices (prompt_classes: one per prompt)."""
    merged = [[] for _ in batch.targets]
    classes = torch.tensor(prompt_classes, device=batch.images.device)
    size = len(batch.targets)
    if isinstance(prompts, list):
        chunks = [(start, expand_prompts(tokens, size)) for start, tokens in prompts]
    else:
        chunks = [(start, one_token_per_class(
                      prompts[start:start + chunk_size][None].expand(size, -1, -1)))
                  for start in range(0, len(prompts), chunk_size)]
    for start, chunk in chunks:
        output = model(batch.images, batch.mask, chunk)
        found = postprocess(output.logits[-1], output.boxes[-1], original_sizes(batch), top_k)
        for b, detections in enumerate(found):
            merged[b].append(Detections(detections.boxes, detections.scores,
                                        classes[start + detections.labels]))
    return [keep_top(parts, top_k) for parts in merged]


def keep_top(parts: list[Detections], top_k: int) -> Detections:
    """The top_k detections of several parts (one image's chunks), by score."""
    boxes = torch.cat([p.boxes for p in parts])
    scores = torch.cat([p.scores for p in parts])
    labels = torch.cat([p.labels for p in parts])
    order = scores.argsort(descending=True)[:top_k]
    return Detections(boxes[order], scores[order], labels[order])


def original_sizes(batch: Batch) -> torch.Tensor:
    """(B, 2) (height, width) of the image files, where boxes are reported."""
    return torch.stack([t.orig_size for t in batch.targets]).to(batch.images.device)


# ----------------------------------------------------------------------------- interactive
# Each image prompted with its own ground truth: prompts differ per image.

@torch.no_grad()
def interactive_prompts(model: DINOR1, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Each image prompted with its own ground truth: per image, one prompt per class present
    (the mean embedding of that class's boxes). Returns prompts (B, K, d), prompt_mask (B, K)
    True = padding, and per image the class index of each prompt."""
    device = batch.images.device
    image_index = instance_image_index(batch.targets).to(device)
    boxes = torch.cat([t.boxes for t in batch.targets])
    embeddings = model.encode_exemplars(batch.images, batch.mask, image_index, boxes)
    per_image, start = [], 0
    for target in batch.targets:
        image_embeddings = embeddings[start:start + len(target.labels)]
        start += len(target.labels)
        classes = target.labels.unique().tolist()
        per_image.append((classes, [image_embeddings[target.labels == c].mean(0) for c in classes]))
    width = max((len(classes) for classes, _ in per_image), default=0)
    prompts = torch.zeros(len(per_image), width, model.config.hidden_dim, device=device)
    prompt_mask = torch.ones(len(per_image), width, dtype=torch.bool, device=device)
    for b, (classes, vectors) in enumerate(per_image):
        if vectors:
            prompts[b, :len(vectors)] = torch.stack(vectors)
            prompt_mask[b, :len(vectors)] = False
    return prompts, prompt_mask, [classes for classes, _ in per_image]


@torch.no_grad()
def detect_interactive(model: DINOR1, batch: Batch, top_k: int = 300) -> list[Detections]:
    """Each image with its own prompts; labels become class indices (padding prompts, which
    score exactly 0, are dropped)."""
    prompts, prompt_mask, classes = interactive_prompts(model, batch)
    output = model(batch.images, batch.mask, one_token_per_class(prompts, prompt_mask))
    found = postprocess(output.logits[-1], output.boxes[-1], original_sizes(batch), top_k)
    detections = []
    for b, item in enumerate(found):
        keep = item.scores > 0          # padding prompts score exactly 0
        lookup = torch.tensor(classes[b] or [0], device=item.labels.device)
        detections.append(Detections(item.boxes[keep], item.scores[keep],
                                     lookup[item.labels[keep]]))
    return detections


# ----------------------------------------------------------------------------- metrics

def coco_results(found: Detections, identity: dict, label_key: str,
                 label_values: list) -> list[dict]:
    """One image's detections (boxes xyxy in its own pixels) -> COCO result dicts:
    `identity` ({"image_id": 7} here, {"file_name": ...} in predict.py), then `label_key`
    with label_values[label] (the dataset's category id, or the prompt's name), the bbox as
    [x, y, w, h] and the score. evaluate.py and predict.py both write results through here."""
    boxes = found.boxes.cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    return [{**identity, label_key: label_values[label], "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)}
            for box, score, label in zip(boxes.tolist(), found.scores.tolist(),
                                         found.labels.tolist())]


def duplicate_counts(found: Detections, score_threshold: float = 0.3,
                     iou_threshold: float = 0.7) -> tuple[int, int]:
    """(detections scoring >= score_threshold, those among them that overlap a
    higher-scored detection of the same prompt with IoU > iou_threshold). A DETR-style
    detector has no NMS: answering one object many times shows up here."""
    keep = found.scores >= score_threshold
    boxes, scores, labels = found.boxes[keep], found.scores[keep], found.labels[keep]
    order = scores.argsort(descending=True)
    boxes, labels = boxes[order], labels[order]
    overlap = box_iou(boxes, boxes) > iou_threshold
    same_prompt = labels[:, None] == labels[None, :]
    earlier = torch.ones_like(overlap).tril(-1)       # [i, j] with j ranked above i
    return len(boxes), int((overlap & same_prompt & earlier).any(1).sum())


def coco_metrics(dataset: CocoDetection, results: list[dict]) -> dict:
    """COCOeval on bounding boxes: the six summary numbers over all classes, AP over base
    and over novel classes, and AP per class (by name). AP values are in [0, 1]."""
    metrics = {name: 0.0 for name in SUMMARY_NAMES}          # what no detection scores
    for subset, classes in (("base", dataset.base_classes), ("novel", dataset.novel_classes)):
        metrics[f"AP_{subset}"] = metrics[f"AP50_{subset}"] = 0.0 if classes else None
    present = set(dataset.instance_labels.tolist())
    metrics.update(per_class={name: 0.0 if k in present else None
                              for k, name in enumerate(dataset.class_names)},
                   num_detections=len(results))
    if not results:
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        detections = dataset.coco.loadRes(results)

    def run(category_ids: list[int]) -> COCOeval:
        evaluator = COCOeval(dataset.coco, detections, "bbox")
        evaluator.params.imgIds = dataset.image_ids
        evaluator.params.catIds = category_ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator

    everything = run(dataset.category_ids)
    metrics.update({name: computed(v) for name, v in zip(SUMMARY_NAMES, everything.stats[:6])})
    precision = everything.eval["precision"][:, :, :, 0, -1]     # (IoU, recall, class), all areas
    for k, name in enumerate(dataset.class_names):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        metrics["per_class"][name] = float(valid.mean()) if valid.size else None
    for subset, classes in (("base", dataset.base_classes), ("novel", dataset.novel_classes)):
        stats = run([dataset.category_ids[c] for c in classes]).stats if classes else None
        metrics[f"AP_{subset}"] = None if stats is None else computed(stats[0])
        metrics[f"AP50_{subset}"] = None if stats is None else computed(stats[1])
    return metrics


def computed(value: float) -> float | None:
    """A COCOeval statistic, or None where it has nothing to measure (COCOeval's -1, e.g.
    APl on a split without large objects): never averaged as if it were 0."""
    return None if value < 0 else float(value)


def format_table(metrics: dict) -> str:
    """A plain-text table of the summary metrics (in AP points, x100)."""
    names = SUMMARY_NAMES + ["AP_base", "AP_novel", "AP50_base", "AP50_novel"]
    cells = ["-" if metrics.get(n) is None else f"{100 * metrics[n]:.1f}" for n in names]
    widths = [max(len(n), len(c)) for n, c in zip(names, cells)]
    line = lambda values: "| " + " | ".join(v.rjust(w) for v, w in zip(values, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(names), rule, line(cells)])


def format_per_class(metrics: dict) -> str:
    """AP per class, novel classes marked (printed after the summary table)."""
    novel = set(metrics.get("novel_class_names", []))
    rows = [f"  {'novel' if name in novel else 'base ':5s} {name:30s} "
            f"{'-' if ap is None else f'{100 * ap:5.1f}'}"
            for name, ap in metrics["per_class"].items()]
    return "AP per class:\n" + "\n".join(rows)


# ----------------------------------------------------------------------------- pictures

def draw_detections(picture: Image.Image, found: Detections, names: list[str],
                    threshold: float = 0.0, min_side: int = 512,
                    overlap: float = 0.5) -> Image.Image:
    """The picture with the boxes scoring at least `threshold`, each with its name
    (names[label]) and score, one colour per label. Small pictures are enlarged (pixels kept
    square) so that the labels can be read. Where boxes overlap by more than `overlap`
    (IoU), only the best-scoring one is drawn: the same object found by several queries or
    prompts (the results keep them all)."""
    image = pil_to_tensor(picture)
    zoom = max(1.0, min_side / min(image.shape[-2:]))
    image = resize(image, [round(image.shape[-2] * zoom), round(image.shape[-1] * zoom)],
                   InterpolationMode.NEAREST)
    boxes, scores = found.boxes.float().cpu(), found.scores.float().cpu()
    keep = nms(boxes, scores, iou_threshold=overlap)
    keep = keep[scores[keep] >= threshold]
    if len(keep):
        labels = found.labels[keep].tolist()
        texts = [f"{names[k]} {s:.2f}" for k, s in zip(labels, scores[keep].tolist())]
        image = draw_bounding_boxes(image, boxes[keep] * zoom, labels=texts,
                                    colors=[COLOURS[k % len(COLOURS)] for k in labels],
                                    width=2, fill_labels=True)
    return to_pil_image(image)


# ----------------------------------------------------------------------------- the driver

@torch.no_grad()
def evaluate(model: DINOR1, data: str, *, split: str = "val", prompt: str = "generic",
             shots: int | None = None, device="cpu", batch_size: int = 8, seed: int = 0,
             support_split: str | None = None, chunk_size: int = 80,
             vis_dir: Path | None = None, num_vis: int = 8,
             novel: list[str] | None = None) -> dict:
    """Detect on every image of `split` and score with COCOeval. Returns the metrics.
    Generic prompts take their exemplars from `support_split` (default: `support` where
    the data has one, else `train`, as for COCO)."""
    model.eval().to(device)
    size = dict(image_size=model.config.image_size, max_size=model.config.max_size)
    dataset = build_dataset(data, split, train=False, novel=novel, **size)
    if prompt == "generic":
        support = build_dataset(data, support_split or default_support_split(data),
                                train=False, novel=novel, **size)
        prompts, classes = generic_prototypes(model, support, shots, seed, device, batch_size)
        detect_batch = partial(detect, model, prompts=prompts, prompt_classes=classes,
                               chunk_size=chunk_size)
    elif prompt == "text":
        prompts = text_prompt_chunks(model, list(dataset.class_names), chunk_size)
        classes = list(range(len(dataset.class_names)))
        detect_batch = partial(detect, model, prompts=prompts, prompt_classes=classes,
                               chunk_size=chunk_size)
    elif prompt == "interactive":
        detect_batch = partial(detect_interactive, model)
    else:
        raise ValueError(f"unknown prompt mode {prompt!r}")
    loader = DataLoader(dataset, batch_size=batch_size,
                        collate_fn=partial(collate, pad_multiple=model.config.pad_multiple))
    results, position, confident, duplicates = [], 0, 0, 0
    for batch in tqdm(loader, desc=f"evaluate {split} ({prompt})"):
        batch = batch.to(device)
        found = detect_batch(batch)
        image_ids = [t.image_id for t in batch.targets]
        for detections, image_id in zip(found, image_ids):
            results += coco_results(detections, {"image_id": int(image_id)}, "category_id",
                                    dataset.category_ids)
        for detections in found:
            counts = duplicate_counts(detections)
            confident, duplicates = confident + counts[0], duplicates + counts[1]
        if vis_dir is not None:
            for b, detections in enumerate(found):
                if position + b < num_vis:
                    path = Path(vis_dir) / f"{split}_{image_ids[b]}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    draw_detections(dataset.load_image(position + b), detections,
                                    dataset.class_names, threshold=0.3).save(path)
        position += len(batch.targets)
    metrics = coco_metrics(dataset, results)
    metrics.update(split=split, prompt=prompt, shots=shots, num_images=len(dataset),
                   duplicates=duplicates / confident if confident else 0.0,
                   novel_class_names=[dataset.class_names[c] for c in dataset.novel_classes])
    return metrics


def save_prototypes(model: DINOR1, data: str, path: Path, shots: int | None, seed: int,
                    device, support_split: str | None = None,
                    novel: list[str] | None = None) -> None:
    """Write the generic prototypes of a support split for predict.py --classes: a plain
    dict {"prototypes": (C', d) float tensor, "names": C' class names, "format":
    CHECKPOINT_FORMAT}, loadable with torch.load(weights_only=True), so the support set is
    encoded once."""
    model.eval().to(device)
    size = dict(image_size=model.config.image_size, max_size=model.config.max_size)
    support = build_dataset(data, support_split or default_support_split(data), train=False,
                            novel=novel, **size)
    prototypes, classes = generic_prototypes(model, support, shots, seed, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"prototypes": prototypes.cpu(), "format": CHECKPOINT_FORMAT,
                "names": [support.class_names[c] for c in classes]}, path)
    print(f"{len(classes)} prototypes written to {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by training, or a "
                        "Grounding DINO folder (config.json, model.safetensors, vocab.txt or "
                        "tokenizer.json)")
    parser.add_argument("--data", help="shapes | shapes:DOMAIN | coco | PATH (default: the "
                                           "training data)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--prompt", choices=["generic", "text", "interactive"],
                        help="default generic; text for a Grounding DINO folder")
    parser.add_argument("--shots", type=int, help="exemplars per class (default: all)")
    parser.add_argument("--support-split",
                        help="where generic exemplars come from (default: support, else train)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--kernel", default=None, choices=["auto", "torch", "triton"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--novel", help="comma-separated novel class names")
    parser.add_argument("--vis", help="write PNGs with predictions to this folder")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--save-prototypes", metavar="FILE",
                        help="write the generic prototypes (for predict.py --classes) to FILE "
                             "and stop, without evaluating")
    args = parser.parse_args(argv)
    published = Path(args.ckpt).is_dir()
    if published and (args.prompt not in (None, "text") or args.save_prototypes):
        raise SystemExit(UNTRAINED_VISUAL_PROMPTS.format(path=args.ckpt))
    args.prompt = args.prompt or ("text" if published else "generic")
    overrides = {"kernel": args.kernel} if args.kernel else {}
    model, trained_with = load_detector(args.ckpt, **overrides)
    device = resolve_device(args.device)
    data = args.data or trained_with.get("data", "shapes")
    novel = args.novel or trained_with.get("novel")
    if args.save_prototypes:
        try:
            save_prototypes(model, data, Path(args.save_prototypes), args.shots, args.seed,
                            device, args.support_split, novel.split(",") if novel else None)
        except DataError as error:
            raise SystemExit(f"cannot build prototypes from --data {data}: {error}") from error
        return {}
    try:
        metrics = evaluate(model, data, split=args.split, prompt=args.prompt,
                           shots=args.shots, device=device, batch_size=args.batch_size,
                           seed=args.seed, support_split=args.support_split,
                           vis_dir=Path(args.vis) if args.vis else None,
                           novel=novel.split(",") if novel else None)
    except DataError as error:
        raise SystemExit(f"cannot evaluate on --data {data}: {error}") from error
    print(format_per_class(metrics))
    print(format_table(metrics))
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
        print(f"metrics written to {args.out}")
    return metrics


if __name__ == "__main__":
    main()
