"""Detect objects in any picture with a trained checkpoint: from a box drawn on the picture,
boxes on other pictures, class names or saved per-class prototypes.

    python predict.py --ckpt runs/grqo/last.pt --image photo.jpg --box 40,60,90,120
    python predict.py --ckpt CKPT --image photo.jpg --box 40,60,90,120=cup --box 200,30,260,95=cup
    python predict.py --ckpt CKPT --image photos/ --exemplar ref.jpg:10,10,80,90=cup
    python predict.py --ckpt CKPT --image photo.jpg --text "red circle" --text "blue star"
    python predict.py --ckpt CKPT --image photo.jpg --classes prototypes.pt
    python predict.py --onnx DIR --image photos/ --text "red circle" --batch-size 4

Boxes are x0,y0,x1,y1 in pixels of the picture they are drawn on. Boxes that share a name
become one prompt, the mean of their embeddings (several shots of one class, as generic
prototypes are built in evaluate.py); an unnamed box is a prompt of its own, "prompt 1",
"prompt 2", ... `--classes` reads prototypes written by
`python evaluate.py --ckpt CKPT --save-prototypes FILE`. `--onnx DIR` runs the graphs that
export.py wrote with onnxruntime instead; `--batch-size N` searches pictures of one padded
size together (not with --box, whose boxes are encoded on each picture).

Writes to --out (default predictions/) one PNG per picture with boxes, names and scores,
and detections.json: COCO-style results {"file_name", "bbox": [x, y, w, h] in the
picture's pixels, "score", "name"}.

In a notebook:

    from predict import Exemplar, Prompts, load_model, predict
    model = load_model("runs/grqo/last.pt")
    found = predict(model, Image.open("photo.jpg"), Prompts([Exemplar((40, 60, 90, 120), "cup")]))
    found.boxes, found.scores, [found.names[label] for label in found.labels]
"""

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from checkpoints import UNTRAINED_VISUAL_PROMPTS, check_format, load_detector, resolve_device
from data import Batch, DataError, collate, make_sample, make_transforms, read_rgb_image
from evaluate import coco_results, detect, draw_detections, keep_top, text_prompt_chunks
from model import DINOR1, Detections

PICTURE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# ----------------------------------------------------------------------------- prompts

@dataclass
class Exemplar:
    """A box around one example of what to look for.

    box:       (x0, y0, x1, y1) in pixels of `image`.
    name:      the prompt's name; exemplars that share a name are averaged into one prompt.
    image:     the picture the box is on: a file, a PIL image or a (3, H, W) tensor (as
               in predict); None = the picture being searched (an interactive prompt).
    embedding: (d,) once encoded (see encode_other_pictures); None = encode when needed.
    """
    box: tuple[float, float, float, float]
    name: str
    image: str | Path | Image.Image | Tensor | None = None
    embedding: Tensor | None = None


@dataclass
class Prompts:
    """What to look for in a picture: exemplar boxes, ready-made prompts (saved prototypes)
    as embeddings (K, d) with K names, and class names read as text."""
    exemplars: list[Exemplar] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    embeddings: Tensor | None = None
    text: list[str] = field(default_factory=list)

    def __add__(self, other: "Prompts") -> "Prompts":
        parts = [e for e in (self.embeddings, other.embeddings) if e is not None]
        return Prompts(self.exemplars + other.exemplars, self.names + other.names,
                       torch.cat(parts) if parts else None, self.text + other.text)


def prompts_from_text(names: list[str]) -> Prompts:
    """Class names, read through the model's text encoder as evaluation's text prompts are
    (with BERT, as one Grounding DINO caption; METHOD 2.3)."""
    return Prompts(text=list(names))


def load_prototypes(path: str | Path, model: DINOR1) -> Prompts:
    """Per-class prototypes written by `evaluate.py --save-prototypes`: a dict with
    "prototypes" (C, d) and "names" (C). Raises ValueError naming the file when it is not
    such a file, is of another format (checkpoints.check_format) or its prototypes do not fit the
    model."""
    if not Path(path).is_file():
        raise ValueError(f"prototype file {path} not found")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        prototypes, names = saved["prototypes"], list(saved["names"])
    except Exception as error:      # not a torch file, or another dict: name it, say why
        raise ValueError(f"{path} holds no prototypes from evaluate.py --save-prototypes "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                         ) from error
    check_format(saved, path, "prototype file")
    if prototypes.ndim != 2 or prototypes.shape != (len(names), model.config.hidden_dim):
        raise ValueError(f"prototypes in {path} have shape {tuple(prototypes.shape)}; this "
                         f"model needs ({len(names)}, {model.config.hidden_dim})")
    return Prompts(names=names, embeddings=prototypes.to(model_device(model)))


def as_picture(image: str | Path | Image.Image | Tensor) -> Image.Image:
    """An RGB PIL image from a file (DataError naming it when unreadable), a PIL image, or
    a (1|3, H, W) tensor: uint8, or float in [0, 1]."""
    if isinstance(image, (str, Path)):
        return read_rgb_image(Path(image))
    if isinstance(image, Tensor):
        if image.is_floating_point():
            image = (image * 255).round().clamp(0, 255).to(torch.uint8)
        return to_pil_image(image.cpu()).convert("RGB")
    return image.convert("RGB")


def check_box_size(box) -> None:
    """ValueError when a box (x0, y0, x1, y1) has no area."""
    if not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"box {','.join(f'{v:g}' for v in box)} has zero size (it needs "
                         f"x0 < x1 and y0 < y1)")


def check_box(box, picture: Image.Image, where: str) -> None:
    """ValueError when a box (x0, y0, x1, y1) has no area or leaves the picture."""
    check_box_size(box)
    x0, y0, x1, y1 = box
    text = ",".join(f"{v:g}" for v in box)
    if x0 < 0 or y0 < 0 or x1 > picture.width or y1 > picture.height:
        raise ValueError(f"box {text} lies outside {where}, which is "
                         f"{picture.width}x{picture.height} pixels")


def model_device(model) -> torch.device:
    """Where a detector's inputs go: its weights' device (an export.OnnxDetector: the CPU)."""
    return model.device if hasattr(model, "device") else next(model.parameters()).device


def prepare(model: DINOR1, picture: Image.Image, boxes: list) -> Batch:
    """A batch of one picture exactly as evaluation sees it (data.make_sample with the
    evaluation transforms), with `boxes` (x0, y0, x1, y1 pixels) as its targets: after the
    transforms they are normalised cxcywh relative to the transformed picture."""
    transforms = make_transforms(False, model.config.image_size, model.config.max_size)
    pixels = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(pixels), dtype=torch.long)
    batch = collate([make_sample(picture, pixels, labels, transforms, image_id=0)],
                    model.config.pad_multiple)
    return batch.to(model_device(model))


@torch.no_grad()
def encode_on_picture(model: DINOR1, batch: Batch) -> Tensor:
    """Embeddings (M, d) of the M target boxes of a batch of one picture."""
    boxes = batch.targets[0].boxes
    image_index = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
    return model.encode_exemplars(batch.images, batch.mask, image_index, boxes)


def encode_other_pictures(model: DINOR1, prompts: Prompts) -> Prompts:
    """Encode, once, the exemplars that sit on other pictures (each picture read once), so
    that searching many pictures does not encode them again. Interactive exemplars (image
    None) stay as they are: they are encoded on each picture searched."""
    by_picture: dict[object, list[int]] = {}
    for index, exemplar in enumerate(prompts.exemplars):
        if exemplar.image is not None and exemplar.embedding is None:
            source = exemplar.image
            key = str(source) if isinstance(source, (str, Path)) else id(source)
            by_picture.setdefault(key, []).append(index)
    exemplars = list(prompts.exemplars)
    for indices in by_picture.values():
        source = exemplars[indices[0]].image
        picture = as_picture(source)
        where = str(source) if isinstance(source, (str, Path)) else "its picture"
        for index in indices:
            check_box(exemplars[index].box, picture, where)
        batch = prepare(model, picture, [exemplars[index].box for index in indices])
        embeddings = encode_on_picture(model, batch)
        for index, embedding in zip(indices, embeddings):
            exemplars[index] = replace(exemplars[index], embedding=embedding)
    return replace(prompts, exemplars=exemplars)


def prompt_set(model: DINOR1, prompts: Prompts, batch: Batch) -> tuple[Tensor | None, list[str]]:
    """The vector prompts (K, d) and their K names for the picture of a batch (its targets:
    the interactive boxes): exemplar embeddings averaged per name, in order of first
    appearance, then the ready-made prompts; None when there are none. Exemplars on other
    pictures must be encoded."""
    interactive = len(batch.targets[0].boxes) > 0
    on_picture = iter(encode_on_picture(model, batch) if interactive else [])
    groups: dict[str, list[Tensor]] = {}
    for exemplar in prompts.exemplars:
        embedding = next(on_picture) if exemplar.image is None else exemplar.embedding
        groups.setdefault(exemplar.name, []).append(embedding)
    vectors = [torch.stack(group).mean(0) for group in groups.values()]
    names = list(groups) + prompts.names
    if prompts.embeddings is not None:
        vectors += list(prompts.embeddings)
    return (torch.stack(vectors) if vectors else None), names


# ----------------------------------------------------------------------------- inference

@dataclass
class Prediction:
    """Detections on one picture, in its own pixels, by descending score."""
    boxes: Tensor      # (D, 4) x0, y0, x1, y1, D detections
    scores: Tensor     # (D,) in (0, 1)
    labels: Tensor     # (D,) long, the prompt each box answers: an index into names
    names: list[str]   # K, the prompts' names

    @property
    def detections(self) -> Detections:
        return Detections(self.boxes, self.scores, self.labels)


@torch.no_grad()
def predict(model: DINOR1, image: str | Path | Image.Image | Tensor, prompts: Prompts,
            threshold: float = 0.3, top_k: int = 100, chunk_size: int = 80) -> Prediction:
    """Detect what the prompts describe in one picture.

    image: a file, a PIL image, or a (3, H, W) tensor (uint8, or float in [0, 1]), RGB.
    The picture is resized and normalised as in evaluation (data.make_sample with the
    evaluation transforms); interactive boxes are encoded on it after the same transform.
    Returns the top_k (box, prompt) pairs scoring at least `threshold` (a box may answer
    several prompts, as in evaluation). Raises ValueError for a box of zero size or outside
    its picture, or no prompt at all; DataError for an unreadable file.
    """
    model.eval()
    picture = as_picture(image)
    interactive = [e.box for e in prompts.exemplars if e.image is None]
    for box in interactive:
        check_box(box, picture, "the picture")
    return predict_batch(model, prepare(model, picture, interactive), prompts, threshold,
                         top_k, chunk_size)[0]


@torch.no_grad()
def predict_batch(model: DINOR1, batch: Batch, prompts: Prompts, threshold: float = 0.3,
                  top_k: int = 100, chunk_size: int = 80) -> list[Prediction]:
    """predict() for a prepared batch: one picture with its interactive boxes as targets, or
    several pictures (of one padded size, so that each gives what it gives alone) with
    prompts that are not drawn on them."""
    model.eval()
    vectors, names = prompt_set(model, encode_other_pictures(model, prompts), batch)
    if vectors is None and not prompts.text:
        raise ValueError("no prompt: give boxes (--box, --exemplar), --text or --classes")
    parts = []
    if vectors is not None:
        parts.append(detect(model, batch, vectors, list(range(len(names))), chunk_size, top_k))
    if prompts.text:
        classes = list(range(len(names), len(names) + len(prompts.text)))
        text = text_prompt_chunks(model, prompts.text, chunk_size)
        parts.append(detect(model, batch, text, classes, chunk_size, top_k))
        names = names + prompts.text
    predictions = []
    for image_parts in zip(*parts):
        found = keep_top(list(image_parts), top_k)
        keep = found.scores >= threshold
        predictions.append(Prediction(found.boxes[keep].cpu(), found.scores[keep].cpu(),
                                      found.labels[keep].cpu(), names))
    return predictions


def load_model(path: str | Path, device: str | torch.device = "cpu") -> DINOR1:
    """The detector of a checkpoint or a Grounding DINO folder, in eval mode. SystemExit
    naming the path when it is missing or unreadable, or when its text encoder cannot be
    built here."""
    try:
        model = load_detector(path)[0]
    except (ImportError, OSError) as error:     # BertTextEncoder: no safetensors, no folder
        reason = str(error).splitlines()[0]
        raise SystemExit(f"the text encoder of {path} is unavailable here: {reason}") from error
    return model.eval().to(device)


# ----------------------------------------------------------------------------- command line

def parse_box(text: str) -> tuple[tuple[float, float, float, float], str | None]:
    """ "x0,y0,x1,y1[=name]" -> (box, name or None). ValueError naming the text."""
    coordinates, _, name = text.partition("=")
    try:
        box = tuple(float(v) for v in coordinates.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"box {text!r} is not x0,y0,x1,y1[=name] (four numbers, in pixels)")
    check_box_size(box)
    return box, name.strip() or None


def command_line_exemplars(boxes: list[str], exemplars: list[str]) -> list[Exemplar]:
    """--box x0,y0,x1,y1[=name] and --exemplar FILE:x0,y0,x1,y1[=name] -> Exemplars;
    unnamed boxes are named "prompt 1", "prompt 2", ..."""
    parsed = [(None, *parse_box(text)) for text in boxes]
    for text in exemplars:
        file_name, separator, box_text = text.rpartition(":")
        if not separator or not file_name:
            raise ValueError(f"--exemplar {text!r} is not FILE:x0,y0,x1,y1[=name]")
        parsed.append((file_name, *parse_box(box_text)))
    result, unnamed = [], 0
    for image, box, name in parsed:
        if name is None:
            unnamed += 1
            name = f"prompt {unnamed}"
        result.append(Exemplar(box, name, image))
    return result


def list_pictures(paths: list[str]) -> list[Path]:
    """Files as given, and the pictures of folders (by suffix, sorted). SystemExit naming a
    path that does not exist, or a folder without pictures."""
    pictures = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
            if not found:
                raise SystemExit(f"folder {path} holds no pictures "
                                 f"({', '.join(sorted(PICTURE_SUFFIXES))})")
            pictures += found
        elif path.is_file():
            pictures.append(path)
        else:
            raise SystemExit(f"picture {path} not found")
    return pictures


def output_names(pictures: list[Path]) -> list[str]:
    """One PNG name per picture: its stem, numbered when two pictures share one."""
    names, seen = [], {}
    for picture in pictures:
        seen[picture.stem] = seen.get(picture.stem, 0) + 1
        suffix = "" if seen[picture.stem] == 1 else f"_{seen[picture.stem]}"
        names.append(f"{picture.stem}{suffix}.png")
    return names


def build_prompts(args, model: DINOR1) -> Prompts:
    """Prompts from the command line; the exemplars on other pictures encoded once."""
    prompts = Prompts(command_line_exemplars(args.box, args.exemplar))
    if args.text:
        prompts = prompts + prompts_from_text(args.text)
    for path in args.classes:
        prompts = prompts + load_prototypes(path, model)
    return encode_other_pictures(model, prompts)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a checkpoint written by training, or a Grounding DINO "
                        "folder (config.json, model.safetensors, vocab.txt or tokenizer.json)")
    source.add_argument("--onnx", metavar="DIR", help="graphs written by export.py, run with "
                        "onnxruntime (CPU, or its CUDA provider when installed)")
    parser.add_argument("--image", action="append", required=True,
                        help="a picture or a folder of pictures (repeatable)")
    parser.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1[=NAME]",
                        help="a box on the picture itself, in its pixels (repeatable)")
    parser.add_argument("--exemplar", action="append", default=[],
                        metavar="FILE:X0,Y0,X1,Y1[=NAME]",
                        help="a box on another picture, in that picture's pixels (repeatable)")
    parser.add_argument("--text", action="append", default=[], metavar="NAME",
                        help="a class name, through the text encoder (repeatable)")
    parser.add_argument("--classes", action="append", default=[], metavar="FILE",
                        help="prototypes from evaluate.py --save-prototypes")
    parser.add_argument("--out", default="predictions", help="folder for PNGs and JSON")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score kept")
    parser.add_argument("--top-k", type=int, default=100, help="most detections per picture")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=1, help="pictures of one padded size "
                        "searched at once (prompts not drawn on the pictures only)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not (args.box or args.exemplar or args.text or args.classes):
        raise SystemExit("no prompt: give --box, --exemplar, --text or --classes")
    visual = args.box or args.exemplar or args.classes
    if args.ckpt and Path(args.ckpt).is_dir() and visual:
        raise SystemExit(UNTRAINED_VISUAL_PROMPTS.format(path=args.ckpt))
    try:
        command_line_exemplars(args.box, args.exemplar)       # syntax, before any loading
    except ValueError as error:
        raise SystemExit(str(error)) from error
    pictures = list_pictures(args.image)
    if args.onnx:
        from export import OnnxDetector
        model = OnnxDetector(args.onnx)
        if visual and not model.visual_prompts:
            raise SystemExit(UNTRAINED_VISUAL_PROMPTS.format(path=model.manifest["checkpoint"]))
    else:
        model = load_model(args.ckpt, resolve_device(args.device))
    try:
        prompts = build_prompts(args, model)
    except (ValueError, DataError) as error:
        raise SystemExit(str(error)) from error
    batch_size = 1 if args.box else args.batch_size       # boxes drawn on each picture
    return run(model, prompts, pictures, Path(args.out), args.threshold, args.top_k,
               batch_size)


def run(model: DINOR1, prompts: Prompts, pictures: list[Path], out: Path, threshold: float,
        top_k: int, batch_size: int = 1) -> list[dict]:
    """Predict on every picture, write a PNG per picture and detections.json (in the order of
    `pictures`). A picture that fails (unreadable, a box outside it) is named and skipped;
    the others are still written, then SystemExit names the ones that failed. batch_size > 1
    searches pictures of one padded size together (prompts must not be drawn on them)."""
    if batch_size > 1 and any(exemplar.image is None for exemplar in prompts.exemplars):
        raise ValueError("boxes drawn on the pictures themselves are encoded on each one: "
                         "search them one at a time (batch size 1)")
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []

    def write(index: int, picture: Image.Image, found: Prediction) -> None:
        draw_detections(picture, found.detections, found.names).save(out / png_names[index])
        results[index] = coco_results(found.detections, {"file_name": str(pictures[index])},
                                      "name", found.names)

    def fail(index: int, error: Exception) -> None:
        message = str(error) if isinstance(error, DataError) else f"{pictures[index]}: {error}"
        if len(pictures) > 1:
            tqdm.write(message, file=sys.stderr)
        failed.append((pictures[index], message))

    png_names, waiting = output_names(pictures), {}
    for index in tqdm(range(len(pictures)), desc="predict", disable=len(pictures) < 2):
        try:
            picture = read_rgb_image(pictures[index])
            if batch_size == 1:
                write(index, picture, predict(model, picture, prompts, threshold, top_k))
                continue
            batch = prepare(model, picture, [])
            waiting.setdefault(tuple(batch.images.shape[-2:]), []).append(
                (index, picture, batch))
            fullest = max(waiting, key=lambda size: len(waiting[size]))
            # A full batch goes; so does the fullest when too many pictures wait (a folder of
            # many sizes must not fill the memory).
            if len(waiting[fullest]) == batch_size or sum(map(len, waiting.values())) \
                    > 4 * batch_size:
                search_together(model, waiting.pop(fullest), prompts, threshold, top_k, write,
                                fail)
        except (ValueError, DataError) as error:     # a DataError names the file already
            fail(index, error)
    for group in waiting.values():                   # the last, smaller groups
        search_together(model, group, prompts, threshold, top_k, write, fail)
    ordered = [result for index in sorted(results) for result in results[index]]
    (out / "detections.json").write_text(json.dumps(ordered, indent=1))
    if len(failed) < len(pictures):
        print(f"{len(pictures) - len(failed)} pictures, {len(ordered)} detections: "
              f"{out / 'detections.json'} and one PNG per picture in {out}")
    if len(pictures) == 1 and failed:
        raise SystemExit(failed[0][1])
    if failed:
        raise SystemExit(f"{len(failed)} of {len(pictures)} pictures failed: "
                         + ", ".join(str(path) for path, _ in sorted(failed)))
    return ordered


def search_together(model: DINOR1, group: list, prompts: Prompts, threshold: float,
                    top_k: int, write: Callable[[int, Image.Image, Prediction], None],
                    fail: Callable[[int, Exception], None]) -> None:
    """Pictures of one padded size, each (index, picture, its batch of one), in one batch;
    an error (a refused size, memory, onnxruntime) fails each of them, and the run goes on."""
    batches = [batch for _, _, batch in group]
    batch = Batch(torch.cat([b.images for b in batches]), torch.cat([b.mask for b in batches]),
                  [b.targets[0] for b in batches])
    try:
        found = predict_batch(model, batch, prompts, threshold, top_k)
    except (ValueError, RuntimeError) as error:
        for index, _, _ in group:
            fail(index, error)
        return
    for (index, picture, _), prediction in zip(group, found):
        write(index, picture, prediction)


if __name__ == "__main__":
    main()
