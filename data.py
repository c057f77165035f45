"""Data for DINO-R1: COCO-format datasets, transforms, batching and prompt sampling; the
embedded synthetic "shapes" dataset is one of the datasets (shapes.py draws it).

The data contract every other file relies on:

- On disk, everything is COCO detection JSON: boxes are [x, y, width, height] in pixels of
  the original image, category ids are arbitrary integers (COCO's run 1..90 with gaps).
- In memory, categories are remapped to contiguous class indices 0..C-1, ordered by COCO
  category id (`CocoDetection.class_names[i]` is the name of class i).
- A dataset sample is `(image, target)`: `image` is a float tensor (3, H, W), normalised
  with the ImageNet mean and std after the transforms; `target.boxes` is (M, 4) in
  normalised (cx, cy, w, h), relative to that transformed image (before batch padding).
- Transforms work on absolute (x0, y0, x1, y1) pixel boxes; the dataset converts to
  normalised cxcywh at the very end.
- A batch pads images to a common size; `Batch.mask` is True on padding, False on image.
- Visual prompts (METHOD.md section 2, item 5) are instances chosen from the batch's
  targets, addressed by their position in `torch.cat([t.boxes for t in targets])`:
  `sample_prompts` turns a batch into `VisualInstructions` and prompt-indexed targets.

Run `python data.py shapes --out data/shapes` to generate the synthetic data and
`python data.py preview --data shapes --split train --out preview.png` to look at it.
"""

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from pycocotools.coco import COCO
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, make_grid

from shapes import DOMAINS, DOMAINS_ROOT, SHAPES_ROOT, domain_named, ensure_domain, ensure_shapes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_ROOT = Path("data/coco")
COCO_HINT = (
    "COCO 2017 comes from https://cocodataset.org/#download; the expected layout is "
    "data/coco/{train2017,val2017,annotations/instances_{train,val}2017.json}"
)
# The most pixels an image may have (3 GB as 8-bit RGB). PIL's own decompression-bomb
# guard (89.5 megapixels) would refuse a 100-megapixel photo, yet a dataset is the user's
# own files and the transforms resize every image anyway; read_rgb_image applies this
# limit instead, while it opens a file, and names the file.
MAX_IMAGE_PIXELS = 1_000_000_000


class DataError(Exception):
    """A dataset that cannot be used as given: missing files, invalid JSON, bad annotations."""


# ----------------------------------------------------------------------------------------
# Targets, batches and visual instructions
# ----------------------------------------------------------------------------------------


@dataclass
class Target:
    """Ground truth of one image.

    boxes:     FloatTensor (M, 4), normalised (cx, cy, w, h) relative to `size`.
    labels:    LongTensor (M,), contiguous class indices (prompt indices once
               `sample_prompts` has re-indexed them).
    image_id:  the COCO image id.
    orig_size: LongTensor (2,), (height, width) of the image file.
    size:      LongTensor (2,), (height, width) after the transforms, without padding.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    image_id: int
    orig_size: torch.Tensor
    size: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Target":
        """On `device` (non_blocking: see Batch.to)."""
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking)
                                for name in ("boxes", "labels", "orig_size", "size")})

    def pin_memory(self) -> "Target":
        """In pinned memory, for non-blocking copies to CUDA."""
        return replace(self, **{name: getattr(self, name).pin_memory()
                                for name in ("boxes", "labels", "orig_size", "size")})


@dataclass
class Batch:
    """A padded batch.

    images:  FloatTensor (B, 3, H, W), zero (the ImageNet mean) on padding.
    mask:    BoolTensor (B, H, W), True = padding, False = image.
    targets: one Target per image.
    """

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[Target]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """On `device`; non_blocking copies overlap with the device's work when the batch
        is in pinned memory (DataLoader(pin_memory=True) calls pin_memory below)."""
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       mask=self.mask.to(device, non_blocking=non_blocking),
                       targets=[target.to(device, non_blocking=non_blocking)
                                for target in self.targets])

    def pin_memory(self) -> "Batch":
        """In pinned memory: DataLoader(pin_memory=True) calls it in its pinning thread."""
        return replace(self, images=self.images.pin_memory(), mask=self.mask.pin_memory(),
                       targets=[target.pin_memory() for target in self.targets])


@dataclass
class VisualInstructions:
    """Exemplar boxes that become prompts (METHOD 2.5, Algorithm 1 line 8).

    All N exemplars are encoded (the contrastive loss uses them all); `selected` picks the
    K that become the prompts shown to every image in the batch, one per class.

    boxes:       FloatTensor (E, 4), cxcywh of each exemplar, normalised to its own image.
    image_index: LongTensor (E,), which image of the batch each exemplar is on.
    labels:      LongTensor (E,), prompt index (0..K-1) of each exemplar's class.
    selected:    LongTensor (K,), the exemplar used as prompt k.
    class_names: K names, for the text side of the contrastive loss.
    max_per_image: the most exemplars on one image, a host integer, so that the prompt
                 encoder lays them out without reading image_index from the device (None:
                 it reads it).
    """

    boxes: torch.Tensor
    image_index: torch.Tensor
    labels: torch.Tensor
    selected: torch.Tensor
    class_names: list[str]
    max_per_image: int | None = None

    def to(self, device, non_blocking: bool = False) -> "VisualInstructions":
        """On `device` (non_blocking: see Batch.to)."""
        return replace(self, **{name: getattr(self, name).to(device, non_blocking=non_blocking)
                                for name in ("boxes", "image_index", "labels", "selected")})


@dataclass
class TextPrompts:
    """The text prompts of a training batch: the names of the classes present (positives)
    and of other classes (negatives), in a random order, as Grounding DINO's fine-tuning
    builds its captions (with BERT the names become one caption, see
    model.BertTextEncoder.caption). The targets' labels index this list."""

    class_names: list[str]


# ----------------------------------------------------------------------------------------
# COCO-format datasets
# ----------------------------------------------------------------------------------------


def resolve_data_root(data: str) -> Path:
    """The folder of a --data value: "shapes" -> data/shapes, "shapes:NAME" -> the domain
    NAME in data/shapes_domains/NAME (both generated when missing), "coco" -> data/coco,
    anything else -> that path."""
    if data == "shapes":
        return ensure_shapes(SHAPES_ROOT)
    if data.startswith("shapes:"):
        name = data.split(":", 1)[1]
        try:
            domain_named(name)
        except ValueError as error:         # an unknown domain
            raise DataError(str(error)) from error
        return ensure_domain(name)
    if data == "coco":
        return COCO_ROOT
    return Path(data)


def _data_error(message: str, root: Path) -> DataError:
    if Path(root).resolve() == COCO_ROOT.resolve():
        message = f"{message}. {COCO_HINT}"
    return DataError(message)


def split_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation JSON, image folder) of a split.

    Looks for annotations/instances_<split>.json with images in <split>/, then COCO's
    naming annotations/instances_<split>2017.json with <split>2017/.
    """
    root = Path(root)
    if not root.is_dir():
        raise _data_error(f"data folder {root} not found", root)
    layouts = [(f"instances_{split}.json", split), (f"instances_{split}2017.json", f"{split}2017")]
    for annotation_name, image_folder in layouts:
        annotation_file = root / "annotations" / annotation_name
        if annotation_file.is_file():
            image_dir = root / image_folder
            if not image_dir.is_dir():
                raise _data_error(
                    f"image folder {image_dir} (for {annotation_file}) not found", root
                )
            return annotation_file, image_dir
    expected = " or ".join(str(root / "annotations" / name) for name, _ in layouts)
    raise _data_error(f"annotation file {expected} not found", root)


def read_json(path: Path):
    """Parse a JSON file; DataError naming the file and the position of a parse error."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column "
            f"{error.colno} (character {error.pos})"
        ) from error
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: {error}") from error


def load_coco(annotation_file: Path) -> COCO:
    """A pycocotools COCO object for a checked detection JSON file."""
    data = read_json(annotation_file)
    if not isinstance(data, dict) or not {"images", "categories"} <= data.keys():
        raise DataError(
            f"{annotation_file} is not COCO detection JSON: it needs 'images' and 'categories'"
        )
    data.setdefault("annotations", [])
    _check_annotations(data, annotation_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _check_annotations(data: dict, annotation_file: Path) -> None:
    category_ids = {category["id"] for category in data["categories"]}
    image_ids = {image["id"] for image in data["images"]}
    for annotation in data["annotations"]:
        name = f"{annotation_file}: annotation {annotation.get('id')}"
        if annotation.get("category_id") not in category_ids:
            raise DataError(
                f"{name} has category_id {annotation.get('category_id')}, not in 'categories'"
            )
        if annotation.get("image_id") not in image_ids:
            raise DataError(f"{name} has image_id {annotation.get('image_id')}, not in 'images'")
        if len(annotation.get("bbox", ())) != 4:
            raise DataError(f"{name} has no bbox [x, y, width, height]")


def read_rgb_image(path: Path, upright: bool = False) -> Image.Image:
    """Open an image as 8-bit RGB, whatever its mode (grayscale, palette, RGBA, CMYK, 16-bit);
    `upright`: turned as its EXIF orientation says (a phone's photo; datasets are annotated
    on the stored pixels, so they are read as stored).

    Raises DataError naming the file when it is missing, cannot be decoded or has more
    than MAX_IMAGE_PIXELS pixels.
    """
    try:
        with _without_pil_pixel_guard(), Image.open(path) as image:  # reads the header only
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise DataError(
                    f"image file {path} is {image.width}x{image.height} pixels, more than "
                    f"data.MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}: resize it, or raise "
                    f"the limit if the memory allows")
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image) if upright else image)
    except FileNotFoundError as error:
        raise DataError(f"image file {path} is missing") from error
    except (OSError, SyntaxError, ValueError) as error:  # what PIL raises on corrupt files
        raise DataError(f"cannot read image file {path}: {error}") from error


_PIL_GUARD_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_pil_pixel_guard():
    """PIL's decompression-bomb guard (89.5 megapixels) off while one file is opened,
    because read_rgb_image applies MAX_IMAGE_PIXELS instead; restored afterwards (under a
    lock, so that threads reading images cannot leave it off), so that this module leaves
    PIL's setting as it found it."""
    with _PIL_GUARD_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        # 16-bit (and 32-bit integer) grey: convert("L") would clip at 255 instead of
        # scaling, so map 0..65535 to 0..255 here.
        values = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection split as (image (3, H, W), Target) samples.

    Attributes:
        coco:           the pycocotools COCO object of the annotation file.
        image_ids:      COCO image ids, sorted; sample i is image_ids[i].
        class_names:    contiguous class index -> name.
        category_ids:   contiguous class index -> COCO category id.
        category_index: COCO category id -> contiguous class index.
        novel_classes, base_classes: contiguous indices, sorted.
        instance_boxes: FloatTensor (A, 4), xyxy pixels of the original images, of every
                        usable instance (not crowd, clipped, not degenerate);
        instance_labels: LongTensor (A,); instance_offsets: LongTensor (len + 1,), sample
                        i owns instances instance_offsets[i]:instance_offsets[i + 1].
        num_dropped_boxes, num_clipped_boxes: boxes dropped / clipped when loading.

    An unreadable image raises DataError naming the file (training wraps the dataset in
    ReplaceUnreadable to carry on without it).
    """

    def __init__(self, root, split: str, transforms=None, novel: list[str] | None = None):
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.annotation_file, self.image_dir = split_files(self.root, split)
        self.coco = load_coco(self.annotation_file)
        self.image_ids = sorted(self.coco.imgs)
        if not self.image_ids:
            raise DataError(f"{self.annotation_file} lists no images: split {split!r} is empty")
        categories = sorted(self.coco.dataset["categories"], key=lambda category: category["id"])
        self.category_ids = [category["id"] for category in categories]
        self.class_names = [category["name"] for category in categories]
        self.category_index = {
            category_id: index for index, category_id in enumerate(self.category_ids)
        }
        self.novel_classes = self._novel_classes(novel)
        self.base_classes = [
            index for index in range(len(self.class_names)) if index not in self.novel_classes
        ]
        self._collect_instances()

    def __len__(self) -> int:
        return len(self.image_ids)

    def _novel_classes(self, novel: list[str] | None) -> list[int]:
        """Novel classes from the `novel` argument when given, else from split.json."""
        split_file = self.annotation_file.parent / "split.json"
        if novel is None and split_file.is_file():
            novel = read_json(split_file).get("novel", [])
        unknown = [name for name in novel or [] if name not in self.class_names]
        if unknown:
            raise DataError(f"novel classes {unknown} are not categories of {self.annotation_file}")
        return sorted(self.class_names.index(name) for name in novel or [])

    def _collect_instances(self) -> None:
        """Usable boxes of every image: crowd boxes skipped, boxes clipped to the image,
        those under 1 px wide or high dropped; one warning counts what was changed."""
        annotations = [
            (position, annotation)
            for position, image_id in enumerate(self.image_ids)
            for annotation in self.coco.imgToAnns[image_id]
            if not annotation.get("iscrowd", 0)
        ]
        positions = torch.tensor([position for position, _ in annotations], dtype=torch.long)
        boxes = torch.tensor(
            [annotation["bbox"] for _, annotation in annotations], dtype=torch.float64
        )
        boxes = box_convert(boxes.reshape(-1, 4), "xywh", "xyxy")
        images = self.coco.loadImgs(self.image_ids)
        image_sizes = torch.tensor([[image["width"], image["height"]] for image in images]).reshape(
            -1, 2
        )
        upper = image_sizes[positions].repeat(1, 2).to(boxes.dtype)  # (A, 4): w, h, w, h
        clipped = torch.minimum(boxes.clamp(min=0), upper)
        keep = (clipped[:, 2] - clipped[:, 0] >= 1) & (clipped[:, 3] - clipped[:, 1] >= 1)
        num_clipped = int(((clipped != boxes).any(dim=1) & keep).sum())
        num_dropped = len(annotations) - int(keep.sum())
        if num_clipped or num_dropped:
            warnings.warn(
                f"{self.annotation_file}: {num_dropped} boxes dropped (empty or outside the "
                f"image after clipping), {num_clipped} clipped to the image"
            )
        self.num_dropped_boxes, self.num_clipped_boxes = num_dropped, num_clipped
        labels = [self.category_index[annotation["category_id"]] for _, annotation in annotations]
        self.instance_boxes = clipped[keep].float()
        self.instance_labels = torch.tensor(labels, dtype=torch.long)[keep]
        counts = torch.bincount(positions[keep], minlength=len(self.image_ids))
        self.instance_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def instances(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (M, 4) xyxy pixels of the original image, labels (M,)) of sample index."""
        start, end = self.instance_offsets[index], self.instance_offsets[index + 1]
        return self.instance_boxes[start:end], self.instance_labels[start:end]

    def load_image(self, index: int) -> Image.Image:
        """The RGB image of sample index; DataError naming the file when unreadable."""
        file_name = self.coco.imgs[self.image_ids[index]]["file_name"]
        return read_rgb_image(self.image_dir / file_name)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self.sample(index)

    def sample(self, index: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, Target]:
        """Sample index, its random augmentation drawn from `generator` (None: torch's
        global RNG)."""
        index = range(len(self))[index]  # IndexError out of range, as iteration expects
        boxes, labels = self.instances(index)
        return make_sample(self.load_image(index), boxes, labels, self.transforms,
                           self.image_ids[index], generator)


def make_sample(image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, transforms,
                image_id: int, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, Target]:
    """A picture and its boxes (M, 4) xyxy pixels -> a sample as the model sees it: the
    transformed image (3, H, W) normalised with the ImageNet mean and std, and its Target
    (boxes normalised cxcywh relative to the transformed image). Datasets and predict.py
    both go through here, so a picture reaches the model the same way from either."""
    orig_size = torch.tensor([image.height, image.width])
    if transforms is not None:
        image, boxes, labels = transforms(image, boxes, labels, generator)
    if isinstance(image, Image.Image):
        image = F.to_tensor(image)
    image = F.normalize(image, IMAGENET_MEAN, IMAGENET_STD)
    height, width = image.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    target = Target(
        boxes=box_convert(boxes, "xyxy", "cxcywh") / scale,
        labels=labels.clone(),  # not a view that would carry all instance_labels along
        image_id=image_id,
        orig_size=orig_size,
        size=torch.tensor([height, width]),
    )
    return image, target


def build_dataset(data: str, split: str, train: bool, image_size: int, max_size: int,
                  novel: list[str] | None = None) -> CocoDetection:
    """A dataset by name ("shapes", "coco" or a folder) with training or evaluation
    transforms."""
    transforms = make_transforms(train, image_size, max_size)
    return CocoDetection(resolve_data_root(data), split, transforms, novel)


# ----------------------------------------------------------------------------------------
# Transforms: callables (image, boxes, labels) -> (image, boxes, labels), where image is a
# PIL image or a (C, H, W) tensor, boxes are (M, 4) absolute (x0, y0, x1, y1) pixels and
# labels are (M,), and a generator that every random draw comes from (None: torch's global
# RNG). Training passes one seeded per sample (train_sft.SeededSamples), which makes runs
# reproducible with any number of DataLoader workers. As in DETR's transforms.
# ----------------------------------------------------------------------------------------


def _image_shape(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a (C, H, W) tensor."""
    _, height, width = F.get_dimensions(image)
    return height, width


def _random_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high], inclusive."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _random_float(generator: torch.Generator | None) -> float:
    """Uniform number in [0, 1)."""
    return torch.rand((), generator=generator).item()


class Compose:
    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, image, boxes, labels, generator=None):
        for transform in self.transforms:
            image, boxes, labels = transform(image, boxes, labels, generator)
        return image, boxes, labels


class RandomHorizontalFlip:
    def __init__(self, probability: float = 0.5):
        self.probability = probability

    def __call__(self, image, boxes, labels, generator=None):
        if _random_float(generator) >= self.probability:
            return image, boxes, labels
        _, width = _image_shape(image)
        x0, y0, x1, y1 = boxes.unbind(-1)
        flipped = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
        return F.hflip(image), flipped, labels


def resized_shape(
    height: int, width: int, short_side: int, max_size: int | None
) -> tuple[int, int]:
    """(height, width) with the short side `short_side`, aspect kept, long side <= max_size,
    rounded as Grounding DINO's image processor rounds them (the short side to the nearest
    pixel, the long side down from the unrounded scale)."""
    short, long = min(height, width), max(height, width)
    exact = float(short_side)
    if max_size is not None and short_side * long / short > max_size:
        exact = max_size * short / long
        short_side = int(round(exact))
    if short == short_side:
        return height, width
    long_side = int(exact * long / short)
    return (short_side, long_side) if height <= width else (long_side, short_side)


def resize(image, boxes: torch.Tensor, short_side: int, max_size: int | None):
    """Resize keeping the aspect ratio; boxes (M, 4) xyxy pixels are scaled along."""
    height, width = _image_shape(image)
    new_height, new_width = resized_shape(height, width, short_side, max_size)
    scale = torch.tensor([new_width / width, new_height / height] * 2)
    return F.resize(image, [new_height, new_width]), boxes * scale


class Resize:
    def __init__(self, short_side: int, max_size: int | None):
        self.short_side = short_side
        self.max_size = max_size

    def __call__(self, image, boxes, labels, generator=None):
        image, boxes = resize(image, boxes, self.short_side, self.max_size)
        return image, boxes, labels


class RandomResize:
    """Resize with the short side drawn from `sizes` (multi-scale training)."""

    def __init__(self, sizes: list[int], max_size: int | None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, boxes, labels, generator=None):
        short_side = self.sizes[_random_int(0, len(self.sizes) - 1, generator)]
        image, boxes = resize(image, boxes, short_side, self.max_size)
        return image, boxes, labels


class RandomSizeCrop:
    """Crop a random region with sides in [min_size, max_size] (capped by the image).

    Boxes are shifted and clipped to the crop; those left with no area are dropped.
    """

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, boxes, labels, generator=None):
        height, width = _image_shape(image)
        crop_width = _random_int(min(self.min_size, width), min(width, self.max_size), generator)
        crop_height = _random_int(min(self.min_size, height), min(height, self.max_size),
                                  generator)
        top = _random_int(0, height - crop_height, generator)
        left = _random_int(0, width - crop_width, generator)
        image = F.crop(image, top, left, crop_height, crop_width)
        boxes = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
        upper = torch.tensor([crop_width, crop_height] * 2, dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), upper)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return image, boxes[keep], labels[keep]


class RandomSelect:
    """Apply `first` with the given probability, else `second`."""

    def __init__(self, first, second, probability: float = 0.5):
        self.first = first
        self.second = second
        self.probability = probability

    def __call__(self, image, boxes, labels, generator=None):
        if _random_float(generator) < self.probability:
            return self.first(image, boxes, labels, generator)
        return self.second(image, boxes, labels, generator)


def training_scales(image_size: int) -> list[int]:
    """Short sides for multi-scale training, from ~0.6x to 1.0x image_size.

    In multiples of 32 from 480 px up (COCO: 480, 512, ..., 800, DETR's list), of 16 or 8
    for small images, where steps of 32 would leave only one or two sizes.
    """
    step = 32 if image_size >= 480 else 16 if image_size >= 192 else 8
    lowest = math.ceil(0.6 * image_size / step) * step
    scales = list(range(lowest, image_size + 1, step))
    if scales[-1] != image_size:
        scales.append(image_size)
    return scales


def make_transforms(train: bool, image_size: int, max_size: int) -> Compose:
    """Training: flip, then either a multi-scale resize or (probability 0.5) DETR's
    resize -> random crop -> multi-scale resize. Evaluation: short side image_size.

    Long sides are capped at max_size. The crop sizes are DETR's (resize to 400/500/600,
    crop 384..600 at image_size 800), scaled to image_size.
    """
    if not train:
        return Compose([Resize(image_size, max_size)])
    scales = training_scales(image_size)
    crop_resizes = [round(image_size * fraction) for fraction in (0.5, 0.625, 0.75)]
    crop = Compose([
        RandomResize(crop_resizes, None),
        RandomSizeCrop(round(0.48 * image_size), round(0.75 * image_size)),
        RandomResize(scales, max_size),
    ])
    return Compose([RandomHorizontalFlip(), RandomSelect(RandomResize(scales, max_size), crop)])

# ----------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------

def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple



def collate(samples: list[tuple[torch.Tensor, Target]], pad_multiple: int = 32) -> Batch:
    """Pad images (3, h_i, w_i) into one (B, 3, H, W) tensor with its padding mask.

    H and W are the batch maxima rounded up to a multiple of `pad_multiple` (the model's,
    DetectorConfig.pad_multiple). 32, the backbone's total stride, makes every stage halve
    the padded size exactly, so feature maps line up with the image and the mask downsamples
    to each level without rounding (which the tiny preset's coarse levels need); 1 pads to the
    maxima only, as Grounding DINO's processor does (a lone picture is not padded at all).
    """
    images, targets = zip(*samples)
    height = _round_up(max(image.shape[1] for image in images), pad_multiple)
    width = _round_up(max(image.shape[2] for image in images), pad_multiple)
    padded = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for position, image in enumerate(images):
        padded[position, :, : image.shape[1], : image.shape[2]] = image
        mask[position, : image.shape[1], : image.shape[2]] = False
    return Batch(padded, mask, list(targets))


# ----------------------------------------------------------------------------------------
# Prompt sampling: visual instructions for training (METHOD 2.5), exemplars for evaluation
# ----------------------------------------------------------------------------------------


def sample_prompts(batch: Batch, class_names: list[str],
                   generator: torch.Generator) -> tuple[VisualInstructions, list[Target]]:
    """The visual instructions of a training batch ("RandSample(v, K, 1)", Algorithm 1).

    Every instance of the batch is an exemplar; for each class present, one random
    instance becomes that class's prompt, shown to every image (so a prompt usually comes
    from another image, and classes absent from an image act as negatives). Classes are
    ordered ascending, and the returned targets carry prompt indices 0..K-1 as labels.

    generator: a CPU torch.Generator; the same state gives the same sample. A batch
    without boxes gives K = 0. Everything returned is on the batch's device.
    """
    device = batch.images.device
    labels = torch.cat([t.labels.cpu() for t in batch.targets] + [torch.zeros(0, dtype=torch.long)])
    classes = torch.unique(labels)  # sorted
    chosen = []
    for class_index in classes:
        members = torch.nonzero(labels == class_index).flatten()
        chosen.append(members[torch.randint(len(members), (), generator=generator)])
    selected = torch.stack(chosen) if chosen else torch.zeros(0, dtype=torch.long)
    prompt_labels = torch.searchsorted(classes, labels)
    counts = [len(t.labels) for t in batch.targets]
    targets = [replace(t, labels=part.to(device))
               for t, part in zip(batch.targets, prompt_labels.split(counts))]
    instructions = VisualInstructions(
        boxes=torch.cat([t.boxes for t in batch.targets] + [torch.zeros(0, 4, device=device)]),
        image_index=instance_image_index(batch.targets).to(device),
        labels=prompt_labels.to(device), selected=selected.to(device),
        class_names=[class_names[c] for c in classes.tolist()],
        max_per_image=max(counts, default=0))
    return instructions, targets


def sample_text_prompts(batch: Batch, class_names: list[str], candidates: list[int],
                        generator: torch.Generator, max_prompts: int = 80,
                        name_tokens: "Callable[[str], int] | None" = None,
                        max_tokens: float = math.inf) -> tuple[TextPrompts, list[Target]]:
    """The text prompts of a training batch: every class present, and negatives drawn
    from `candidates` (class indices; training passes the base classes, so that a novel
    name is never a negative) up to `max_prompts` names in all (80, COCO's class count) and
    `max_tokens` caption tokens, a name costing name_tokens(name) (the text encoder's count:
    so that one caption holds them all), shuffled. Returns the prompts and the targets with the
    prompt indices as labels (M,) long, on the device of the batch's targets. generator: a CPU
    torch.Generator."""
    present = sorted(set(torch.cat([t.labels.cpu() for t in batch.targets]
                                   + [torch.zeros(0, dtype=torch.long)]).tolist()))
    others = [c for c in candidates if c not in present]
    cost = name_tokens or (lambda name: 0)
    chosen, budget = list(present), max_tokens - sum(cost(class_names[c]) for c in present)
    if budget < 0:
        raise DataError(f"the {len(present)} classes of a training batch take "
                        f"{max_tokens - budget} caption tokens, more than {max_tokens}: train "
                        f"with a smaller --batch-size")
    for index in torch.randperm(len(others), generator=generator).tolist():
        budget -= cost(class_names[others[index]])
        if len(chosen) >= max_prompts or budget < 0:
            break
        chosen.append(others[index])
    order = [chosen[i] for i in torch.randperm(len(chosen), generator=generator).tolist()]
    position = {class_index: k for k, class_index in enumerate(order)}
    targets = [replace(t, labels=torch.tensor([position[c] for c in t.labels.tolist()],
                                              dtype=torch.long, device=t.labels.device))
               for t in batch.targets]
    return TextPrompts([class_names[c] for c in order]), targets


def instance_image_index(targets: list[Target]) -> torch.Tensor:
    """LongTensor (E,) on the CPU: the batch position of each instance of
    torch.cat([t.boxes for t in targets])."""
    counts = torch.tensor([len(target.labels) for target in targets], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(targets)), counts)


def sample_exemplars(dataset: "CocoDetection", shots: int | None,
                     seed: int) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """Exemplars for cross-image and generic prompts, read from the annotations only.

    Returns {class index: [(dataset index, box (4,) normalised cxcywh), ...]} with up to
    `shots` random instances per class (all of them, in dataset order, when shots is
    None). Normalised boxes do not change when the image is resized, so they hold for
    dataset[index] under the evaluation transforms. Classes without any instance are
    left out, with a warning naming them.
    """
    generator = torch.Generator().manual_seed(seed)
    counts = dataset.instance_offsets.diff()
    positions = torch.repeat_interleave(torch.arange(len(dataset)), counts)
    images = dataset.coco.loadImgs(dataset.image_ids)
    sizes = torch.tensor([[image["width"], image["height"]] for image in images],
                         dtype=torch.float32).reshape(-1, 2)
    boxes = (box_convert(dataset.instance_boxes, "xyxy", "cxcywh")
             / sizes[positions].repeat(1, 2))
    exemplars, missing = {}, []
    for class_index, name in enumerate(dataset.class_names):
        candidates = torch.nonzero(dataset.instance_labels == class_index).flatten()
        if len(candidates) == 0:
            missing.append(name)
            continue
        if shots is not None:
            candidates = candidates[torch.randperm(len(candidates), generator=generator)[:shots]]
        exemplars[class_index] = [(int(positions[i]), boxes[i].clone())
                                  for i in candidates.tolist()]
    if missing:
        warnings.warn(f"no exemplars in {dataset.annotation_file} for classes: "
                      f"{', '.join(missing)}")
    return exemplars


# ----------------------------------------------------------------------------------------
# Unreadable images during training
# ----------------------------------------------------------------------------------------


class ReplaceUnreadable(torch.utils.data.Dataset):
    """A dataset whose unreadable images are replaced by the next readable sample.

    One broken file among a million should not stop a training run: its sample is
    replaced (deterministically, by the next readable one), with a warning that names the
    file, and counted. The count is shared with DataLoader worker processes, so
    `num_replaced` is the number of replaced samples this process's loaders produced.
    Evaluation does not use this: a metric on a split with a substituted image would
    score the wrong picture, so there a broken image is an error.
    """

    def __init__(self, dataset: "CocoDetection"):
        self.dataset = dataset
        self._count = multiprocessing.get_context().Value("l", 0)

    @property
    def num_replaced(self) -> int:
        return self._count.value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.sample(index)

    def sample(self, index: int, generator: torch.Generator | None = None):
        """Sample index, or the next readable one; augmentation drawn from `generator`."""
        index = range(len(self))[index]  # IndexError out of range, as iteration expects
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                sample = self.dataset.sample(candidate, generator)
            except DataError as error:
                warnings.warn(f"{error}; sample {candidate} replaced by the next readable one")
                continue
            if offset > 0:
                with self._count.get_lock():
                    self._count.value += 1
            return sample
        raise DataError(f"no image listed in {self.dataset.annotation_file} can be read")


# ----------------------------------------------------------------------------------------
# Preview and command line
# ----------------------------------------------------------------------------------------


def draw_target(image: torch.Tensor, target: Target, class_names: list[str]) -> torch.Tensor:
    """uint8 (3, H, W) picture of a normalised image (3, H, W) with its boxes and names."""
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    picture = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    height, width = target.size.tolist()
    boxes = box_convert(target.boxes, "cxcywh", "xyxy") * torch.tensor(
        [width, height, width, height]
    )
    names = [class_names[label] for label in target.labels.tolist()]
    if not names:  # draw_bounding_boxes warns on an empty box list
        return picture
    return draw_bounding_boxes(picture, boxes, names, colors="magenta", fill_labels=True)


def save_preview(
    data: str, split: str, out: str, num_images: int = 16, display_size: int = 384
) -> None:
    """Write a grid of the first images of a split with boxes and class names drawn,
    resized to fit display_size x display_size and padded as in a batch."""
    dataset = CocoDetection(
        resolve_data_root(data), split, make_transforms(False, display_size, display_size)
    )
    batch = collate([dataset[index] for index in range(min(num_images, len(dataset)))])
    pictures = [
        draw_target(image, target, dataset.class_names)
        for image, target in zip(batch.images, batch.targets)
    ]
    grid = make_grid(pictures, nrow=math.ceil(math.sqrt(len(pictures))), padding=4, pad_value=255)
    F.to_pil_image(grid).save(out)  # torchvision.io's encoders are deprecated since 0.29


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DINO-R1 data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    shapes = commands.add_parser("shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", help=f"default {SHAPES_ROOT}, or {DOMAINS_ROOT}/NAME")
    shapes.add_argument("--domain", help="generate this domain (see --list-domains)")
    shapes.add_argument("--list-domains", action="store_true",
                        help="print the domains' names, one per line")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=128)
    shapes.add_argument("--train-images", type=int, default=2000)
    preview = commands.add_parser("preview", help="draw images of a split with their boxes")
    preview.add_argument(
        "--data", default="shapes", help='"shapes", "coco" or a COCO-format folder'
    )
    preview.add_argument("--split", default="train")
    preview.add_argument("--out", required=True, help="PNG file to write")
    preview.add_argument("--num-images", type=int, default=16)
    args = parser.parse_args(argv)
    if args.command == "shapes" and args.list_domains:
        print("\n".join(DOMAINS))
    elif args.command == "shapes" and args.domain:
        try:
            domain_named(args.domain)
        except ValueError as error:
            raise SystemExit(str(error)) from error
        root = ensure_domain(args.domain, args.out, args.seed, args.image_size)
        print(f"shapes domain {args.domain} ready in {root}")
    elif args.command == "shapes":
        root = ensure_shapes(args.out or SHAPES_ROOT, args.seed, args.image_size,
                             args.train_images)
        print(f"shapes dataset ready in {root}")
    else:
        save_preview(args.data, args.split, args.out, args.num_images)
        print(f"wrote {args.out}")




if __name__ == "__main__":
    main()
