"""Data for DINO-R1: COCO-format datasets, transforms, batching, prompt sampling, and the
embedded synthetic "shapes" dataset (an appendix at the end of this file).

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
import colorsys
import contextlib
import io
import json
import math
import multiprocessing
import threading
import warnings
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageDraw, ImageFilter
from pycocotools.coco import COCO
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes, make_grid
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COCO_ROOT = Path("data/coco")
SHAPES_ROOT = Path("data/shapes")
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

    def to(self, device) -> "Target":
        return replace(self, boxes=self.boxes.to(device), labels=self.labels.to(device),
                       orig_size=self.orig_size.to(device), size=self.size.to(device))


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

    def to(self, device) -> "Batch":
        return replace(self, images=self.images.to(device), mask=self.mask.to(device),
                       targets=[target.to(device) for target in self.targets])


@dataclass
class VisualInstructions:
    """Exemplar boxes that become prompts (METHOD 2.5, Algorithm 1 line 8).

    All N exemplars are encoded (the contrastive loss uses them all); `selected` picks the
    K that become the prompts shown to every image in the batch, one per class.

    boxes:       FloatTensor (N, 4), cxcywh of each exemplar, normalised to its own image.
    image_index: LongTensor (N,), which image of the batch each exemplar is on.
    labels:      LongTensor (N,), prompt index (0..K-1) of each exemplar's class.
    selected:    LongTensor (K,), the exemplar used as prompt k.
    class_names: K names, for the text side of the contrastive loss.
    """

    boxes: torch.Tensor
    image_index: torch.Tensor
    labels: torch.Tensor
    selected: torch.Tensor
    class_names: list[str]


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
        return ensure_domain(data.split(":", 1)[1])
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


def read_rgb_image(path: Path) -> Image.Image:
    """Open an image as 8-bit RGB, whatever its mode (grayscale, palette, RGBA, 16-bit).

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
            return _to_rgb(image)
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
        class_names=[class_names[c] for c in classes.tolist()])
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
    """LongTensor (N,) on the CPU: the batch position of each instance of
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
            root = ensure_domain(args.domain, args.out, args.seed, args.image_size)
        except DataError as error:
            raise SystemExit(str(error)) from error
        print(f"shapes domain {args.domain} ready in {root}")
    elif args.command == "shapes":
        root = ensure_shapes(args.out or SHAPES_ROOT, args.seed, args.image_size,
                             args.train_images)
        print(f"shapes dataset ready in {root}")
    else:
        save_preview(args.data, args.split, args.out, args.num_images)
        print(f"wrote {args.out}")


# ========================================================================================
# Appendix: the embedded synthetic dataset "shapes"
#
# Shape x colour classes on cluttered backgrounds, written as real COCO JSON and PNG files
# (`python data.py shapes`, or on first use of --data shapes). Nothing above depends on how
# these pictures are drawn; a reader of the data pipeline can stop here.
# ========================================================================================

SHAPES_VERSION = 1  # bump when the generator changes, so cached copies are regenerated
SHAPE_NAMES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOUR_NAMES = ("red", "green", "blue", "yellow")
SPLIT_CLASSES = {"train": "base", "support": "all", "dev": "all", "val": "all"}
MAX_OBJECTS = 6
MIN_VISIBLE_FRACTION = 0.6  # of each object: inside the image and not covered by others
PLACEMENT_ATTEMPTS = 20


@dataclass(frozen=True)
class Style:
    """How a domain's pictures differ from the default data (whose style is Style())."""

    background: str = "clutter"  # a key of BACKGROUNDS: clutter, plain, dark, texture
    sizes: tuple[float, float] | None = None  # long side of an object, fractions of the
    # image side (None: 16 px to a third of the side)
    objects: tuple[int, int] = (1, MAX_OBJECTS)  # objects drawn per picture, inclusive
    outline_only: bool = False  # coloured outlines, nothing inside
    blur: float = 0.0  # Gaussian blur radius, pixels
    noise: float = 0.0  # sensor noise, standard deviation in 0-255 units


@dataclass(frozen=True)
class Domain:
    """A variant of the shapes data for zero-shot transfer, the way ODinW's datasets differ
    from each other: other class names (each with a word the default data never uses),
    backgrounds, scales and styles. Splits support, dev and val, and train (base classes
    only) where train_images > 0."""

    description: str
    classes: tuple[str, ...]  # "<colour> <shape>"
    style: Style
    novel: tuple[str, ...] = ()  # kept out of train (with a train split only)
    train_images: int = 0
    support_dev_val_images: tuple[int, int, int] = (60, 100, 200)  # 10 shots a class and more

    def categories(self) -> list[dict]:
        return [{"id": index + 1, "name": name, "supercategory": name.split(" ")[1]}
                for index, name in enumerate(self.classes)]

    def split_sizes(self) -> dict[str, int]:
        sizes = {"train": self.train_images,
                 **dict(zip(("support", "dev", "val"), self.support_dev_val_images))}
        return {split: size for split, size in sizes.items() if size > 0}


@dataclass(frozen=True)
class ColourRange:
    """Jitter that keeps a colour's name right: hue in degrees +- jitter, and the darkest
    HSV value before the colour turns into another name (dark yellow reads as olive)."""

    hue: float
    hue_jitter: float
    min_value: float


COLOUR_RANGES = {
    "red": ColourRange(0.0, 6.0, 0.65),
    "green": ColourRange(125.0, 12.0, 0.45),
    "blue": ColourRange(220.0, 14.0, 0.55),
    "yellow": ColourRange(55.0, 5.0, 0.85),
    # colours of the domains only (DOMAINS below), never in the default data
    "orange": ColourRange(28.0, 4.0, 0.85),
    "cyan": ColourRange(185.0, 8.0, 0.6),
    "purple": ColourRange(275.0, 10.0, 0.5),
    "magenta": ColourRange(305.0, 8.0, 0.7),
}


def _regular_polygon(corners: int, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(corners) / corners
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner_radius: float = 0.42) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner_radius)
    return _regular_polygon(2 * points) * radii[:, None]


def _arrow() -> np.ndarray:
    return np.array([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25),
                     (-1, 0.25)])


def _cross(half_width: float = 0.3) -> np.ndarray:
    a, b = half_width, 1.0
    return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
                     (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)])


SHAPE_OUTLINES = {  # (P, 2) unit outlines (x, y), roughly within [-1, 1]
    "circle": _regular_polygon(48),
    "square": _regular_polygon(4, phase=math.pi / 4),
    "triangle": _regular_polygon(3),
    "star": _star(),
    "hexagon": _regular_polygon(6),
    "cross": _cross(),
    # shapes of the domains only (DOMAINS below), never in the default data
    "pentagon": _regular_polygon(5),
    "diamond": np.array([(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]),
    "arrow": _arrow(),
}


def shapes_categories() -> list[dict]:
    """The 24 COCO categories, ids from 1, named "<colour> <shape>"."""
    return [
        {
            "id": shape_index * len(COLOUR_NAMES) + colour_index + 1,
            "name": f"{colour} {shape}",
            "supercategory": shape,
        }
        for shape_index, shape in enumerate(SHAPE_NAMES)
        for colour_index, colour in enumerate(COLOUR_NAMES)
    ]


def shapes_novel_names() -> list[str]:
    """Shape i in colour i mod 4: a quarter of the classes, and every novel shape and every
    novel colour still occurs in base classes (METHOD.md section 1: novel = unseen class)."""
    return [
        f"{COLOUR_NAMES[index % len(COLOUR_NAMES)]} {shape}"
        for index, shape in enumerate(SHAPE_NAMES)
    ]


def _grey(rng: np.random.Generator, max_saturation: float = 0.15) -> tuple[int, int, int]:
    """A random low-saturation colour, so clutter never looks like a class colour."""
    hue, saturation, value = (
        rng.uniform(0, 1),
        rng.uniform(0, max_saturation),
        rng.uniform(0.1, 0.95),
    )
    return tuple(int(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value))


def _background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A tinted grey background with a gradient, noise, sometimes a faint checker, and
    grey clutter: strokes and blobs."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    angle = rng.uniform(0, 2 * math.pi)
    gradient = xs * math.cos(angle) + ys * math.sin(angle)
    field = rng.uniform(0.3, 0.85) * (1 + rng.uniform(-0.3, 0.3) * gradient)
    field = field + rng.normal(0, rng.uniform(0.0, 0.04), field.shape)
    if rng.random() < 0.3:
        frequency = rng.uniform(6, 20) * math.pi
        field = field + 0.05 * np.sign(np.sin(xs * frequency) * np.sin(ys * frequency))
    tint = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.12), 1.0))
    image = Image.fromarray(np.clip(field[..., None] * tint * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 9)):
        if rng.random() < 0.5:
            points = rng.uniform(-0.1, 1.1, (rng.integers(2, 5), 2)) * image_size
            draw.line(points.flatten().tolist(), fill=_grey(rng), width=int(rng.integers(1, 4)))
        else:
            centre, radii = rng.uniform(0, image_size, 2), rng.uniform(2, image_size / 10, 2)
            draw.ellipse([*(centre - radii), *(centre + radii)], fill=_grey(rng))
    return image


def _plain_background(rng: np.random.Generator, image_size: int,
                      values: tuple[float, float] = (0.75, 0.95)) -> Image.Image:
    """A flat tinted grey with a faint gradient and no clutter."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    angle = rng.uniform(0, 2 * math.pi)
    field = rng.uniform(*values) * (1 + 0.1 * (xs * math.cos(angle) + ys * math.sin(angle)))
    tint = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.1), 1.0))
    return Image.fromarray(np.clip(field[..., None] * tint * 255, 0, 255).astype(np.uint8))


def _dark_background(rng: np.random.Generator, image_size: int) -> Image.Image:
    return _plain_background(rng, image_size, values=(0.05, 0.25))


def _texture_background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A high-contrast procedural texture: random gratings over blocky value noise, in two
    low-saturation tints."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    field = np.zeros((image_size, image_size))
    for _ in range(3):
        angle, frequency = rng.uniform(0, math.pi), rng.uniform(4, 24) * math.pi
        field += np.sin(frequency * (xs * math.cos(angle) + ys * math.sin(angle))
                        + rng.uniform(0, 2 * math.pi))
    cells = int(rng.integers(4, 12))
    blocks = np.kron(rng.uniform(-1, 1, (cells, cells)),
                     np.ones((math.ceil(image_size / cells),) * 2))[:image_size, :image_size]
    weight = (np.tanh(field + 2 * blocks) + 1) / 2                   # (S, S) in (0, 1)
    tints = [np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25),
                                          rng.uniform(0.2, 0.95))) for _ in range(2)]
    pixels = weight[..., None] * tints[0] + (1 - weight[..., None]) * tints[1]
    return Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))


def _degrade(rng: np.random.Generator, canvas: np.ndarray, style: "Style") -> Image.Image:
    """The finished picture: float canvas (S, S, 3) -> RGB, blurred and with sensor noise
    where the style asks for them (the default asks for neither, and draws nothing)."""
    image = Image.fromarray(np.round(canvas).astype(np.uint8))
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    if style.noise:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, style.noise, canvas.shape)
        image = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return image


BACKGROUNDS = {"clutter": _background, "plain": _plain_background, "dark": _dark_background,
               "texture": _texture_background}


def _shape_polygon(
    rng: np.random.Generator, shape: str, image_size: int, fully_inside: bool,
    sizes: tuple[float, float] | None = None,
) -> np.ndarray:
    """A randomly stretched, rotated, sized and placed outline, (P, 2) (x, y) pixels.

    The long side of its box is log-uniform from 16 px (less for tiny images) to a third
    of the image side, or between the fractions `sizes` of the image side.
    """
    points = SHAPE_OUTLINES[shape] * np.array([math.exp(rng.uniform(-0.3, 0.3)), 1.0])
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = points @ rotation.T
    largest = image_size / 3
    smallest = min(16.0, largest)
    if sizes is not None:
        smallest, largest = sizes[0] * image_size, sizes[1] * image_size
    long_side = math.exp(rng.uniform(math.log(smallest), math.log(largest)))
    points = (points - points.min(axis=0)) * long_side / np.ptp(points, axis=0).max()
    extent = points.max(axis=0)
    if fully_inside:
        offset = rng.uniform(0, image_size - extent)
    else:
        offset = rng.uniform(-extent / 2, image_size - extent / 2)
    return points + offset


def _rasterise(polygon: np.ndarray, image_size: int, outline_width: int) -> np.ndarray:
    """uint8 (S, S): 0 outside the shape, 1 its fill, 2 its outline."""
    canvas = Image.new("L", (image_size, image_size), 0)
    outline = 2 if outline_width else None
    ImageDraw.Draw(canvas).polygon(
        polygon.flatten().tolist(), fill=1, outline=outline, width=max(outline_width, 1)
    )
    return np.asarray(canvas)


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _place_object(
    rng, shape: str, image_size: int, owner: np.ndarray, visible: np.ndarray, full: np.ndarray,
    style: "Style",
):
    """Try positions until the new shape is mostly inside the image and every earlier
    object stays mostly visible (bounded occlusion).

    owner: int (S, S), index of the object on top at each pixel, -1 for background;
    visible / full: (n,) visible and original pixel counts of the n earlier objects.
    Returns (polygon (P, 2), mask uint8 (S, S) as in _rasterise), or None.
    """
    if style.outline_only:
        outline_width = int(rng.integers(2, 4))
    else:
        outline_width = int(rng.integers(1, 3)) if rng.random() < 0.3 else 0
    for attempt in range(PLACEMENT_ATTEMPTS):
        fully_inside = attempt == PLACEMENT_ATTEMPTS - 1 or rng.random() < 0.8
        polygon = _shape_polygon(rng, shape, image_size, fully_inside, style.sizes)
        mask = _rasterise(polygon, image_size, outline_width)
        covered = mask > 0
        if covered.sum() < MIN_VISIBLE_FRACTION * _polygon_area(polygon):
            continue
        hidden = np.bincount(owner[covered] + 1, minlength=len(visible) + 1)[1:]
        if np.all(visible - hidden >= MIN_VISIBLE_FRACTION * full):
            return polygon, mask
    return None


def _shading(
    rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray
) -> np.ndarray:
    """Brightness factors (n,) for pixels (xs, ys): flat, gradient, stripes or noise."""
    centre, extent = polygon.mean(axis=0), np.ptp(polygon, axis=0).max()
    angle = rng.uniform(0, 2 * math.pi)
    along = ((xs - centre[0]) * math.cos(angle) + (ys - centre[1]) * math.sin(angle)) / extent
    kind = rng.choice(["flat", "gradient", "stripes", "noise"])
    if kind == "gradient":
        return 1 + rng.uniform(0.3, 0.7) * along
    if kind == "stripes":
        period = rng.uniform(3, 8) / extent  # 3 to 8 px
        return np.where(np.sin(2 * math.pi * along / period) > 0, 1.0, 1 - rng.uniform(0.2, 0.35))
    if kind == "noise":
        return 1 + rng.normal(0, rng.uniform(0.05, 0.12), xs.shape)
    return np.ones_like(xs)


def _paint(
    rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, polygon: np.ndarray,
    colour: str, outline_only: bool = False,
) -> None:
    """Paint one object into canvas (S, S, 3) float: jittered hue, saturation and
    brightness, a shading pattern, and a dark grey outline where mask == 2 (or, outline
    only, the colour on the outline and nothing inside)."""
    spec = COLOUR_RANGES[colour]
    hue = (spec.hue + rng.uniform(-spec.hue_jitter, spec.hue_jitter)) % 360
    pure = 255 * np.array(colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.7, 1.0), 1.0))
    value = rng.uniform(spec.min_value, 1.0)
    if outline_only:
        canvas[mask == 2] = value * pure
        return
    ys, xs = np.nonzero(mask == 1)
    values = np.clip(value * _shading(rng, xs, ys, polygon), spec.min_value, 1.0)
    canvas[ys, xs] = values[:, None] * pure  # HSV with fixed hue/saturation scales linearly in V
    canvas[mask == 2] = rng.uniform(10, 60)


def _draw_image(
    rng: np.random.Generator, image_size: int, categories: list[dict], style: "Style"
) -> tuple[Image.Image, list[dict]]:
    """One image with (up to) the given objects, later ones on top, in a style.

    Returns the RGB image and COCO annotation stubs (category_id, bbox [x, y, w, h] tight
    around the drawn shape and clipped to the image, area = visible pixels).
    """
    background = BACKGROUNDS[style.background](rng, image_size)
    canvas = np.asarray(background, dtype=np.float32).copy()
    owner = np.full((image_size, image_size), -1, dtype=np.int64)
    placed, visible, full = [], np.zeros(0), np.zeros(0)
    for category in categories:
        shape, colour = category["supercategory"], category["name"].split(" ")[0]
        placement = _place_object(rng, shape, image_size, owner, visible, full, style)
        if placement is None:
            continue
        polygon, mask = placement
        covered = mask > 0
        visible = visible - np.bincount(owner[covered] + 1, minlength=len(visible) + 1)[1:]
        visible, full = np.append(visible, covered.sum()), np.append(full, covered.sum())
        owner[covered] = len(placed)
        _paint(rng, canvas, mask, polygon, colour, style.outline_only)
        rows, columns = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
        box = [
            int(columns[0]),
            int(rows[0]),
            int(columns[-1] + 1 - columns[0]),
            int(rows[-1] + 1 - rows[0]),
        ]
        placed.append({"category_id": category["id"], "bbox": box})
    for stub, area in zip(placed, visible):
        stub["area"] = int(area)
    return _degrade(rng, canvas, style), placed


def _class_deck(rng: np.random.Generator, categories: list[dict], count: int) -> list[dict]:
    """`count` categories from consecutive shuffles, so every class gets an equal share."""
    shuffles = [rng.permutation(len(categories)) for _ in range(math.ceil(count / len(categories)))]
    return [categories[index] for index in np.concatenate(shuffles)[:count]]


def _generate_split(
    out_dir: Path, split: str, seed: int, image_size: int, num_images: int,
    domain: "Domain | None" = None,
) -> dict:
    """Write the PNGs of one split (of the default data, or of a domain) and return its
    COCO dictionary."""
    categories = shapes_categories() if domain is None else domain.categories()
    novel = set(shapes_novel_names() if domain is None else domain.novel)
    style = Style() if domain is None else domain.style
    allowed = (
        [c for c in categories if c["name"] not in novel]
        if SPLIT_CLASSES[split] == "base"
        else categories
    )
    stream = [seed, list(SPLIT_CLASSES).index(split)]             # one stream per split
    if domain is not None:                 # and per domain, by its name: order-independent
        stream.append(zlib.crc32(domain_name(domain).encode()))
    rng = np.random.default_rng(stream)
    object_counts = rng.integers(style.objects[0], style.objects[1] + 1, num_images)
    deck = iter(_class_deck(rng, allowed, int(object_counts.sum())))
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in tqdm(range(1, num_images + 1), desc=f"shapes {split}", unit="image"):
        wanted = [next(deck) for _ in range(object_counts[image_id - 1])]
        picture, stubs = _draw_image(rng, image_size, wanted, style)
        file_name = f"{image_id:06d}.png"
        picture.save(out_dir / split / file_name)
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for stub in stubs:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, **stub, "iscrowd": 0}
            )
    info = {"description": "DINO-R1 synthetic shapes", "version": SHAPES_VERSION, "seed": seed}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _marker_text(seed: int, image_size: int, split_sizes: dict[str, int]) -> str:
    """What the COMPLETE marker holds: every parameter that changes the files."""
    parameters = {
        "version": SHAPES_VERSION,
        "seed": seed,
        "image_size": image_size,
        "split_sizes": split_sizes,
    }
    return json.dumps(parameters, sort_keys=True) + "\n"


def generate_shapes(
    out_dir, seed: int = 0, image_size: int = 128, train_images: int = 2000,
    support_images: int = 60, dev_images: int = 200, val_images: int = 300,
) -> Path:
    """Generate the shapes dataset into out_dir (deterministic for a seed).

    Writes <split>/NNNNNN.png (image ids from 1), annotations/instances_<split>.json,
    annotations/split.json ({"base": [...], "novel": [...]}) and, last, the COMPLETE
    marker holding the parameters. `train` holds base classes only.
    """
    out_dir = Path(out_dir)
    marker = out_dir / "COMPLETE"
    marker.unlink(missing_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    split_sizes = {
        "train": train_images,
        "support": support_images,
        "dev": dev_images,
        "val": val_images,
    }
    _write_splits(out_dir, split_sizes, seed, image_size, None)
    marker.write_text(_marker_text(seed, image_size, split_sizes), encoding="utf-8")
    return out_dir


def _write_splits(out_dir: Path, split_sizes: dict[str, int], seed: int, image_size: int,
                  domain: "Domain | None") -> None:
    """Every split's PNGs and annotations/instances_<split>.json, and split.json where there
    are novel classes."""
    for split, num_images in split_sizes.items():
        coco = _generate_split(out_dir, split, seed, image_size, num_images, domain)
        text = json.dumps(coco, ensure_ascii=False)
        (out_dir / "annotations" / f"instances_{split}.json").write_text(text, encoding="utf-8")
    novel = shapes_novel_names() if domain is None else list(domain.novel)
    names = [c["name"] for c in (shapes_categories() if domain is None else domain.categories())]
    if novel:
        split_text = json.dumps({"base": [n for n in names if n not in novel], "novel": novel},
                                indent=1)
        (out_dir / "annotations" / "split.json").write_text(split_text, encoding="utf-8")


def ensure_shapes(
    root=SHAPES_ROOT, seed: int = 0, image_size: int = 128, train_images: int = 2000,
    support_images: int = 60, dev_images: int = 200, val_images: int = 300,
) -> Path:
    """The shapes dataset at root, generated unless a complete copy with these parameters
    is there already (its COMPLETE marker is written last and holds the parameters)."""
    root = Path(root)
    split_sizes = {
        "train": train_images,
        "support": support_images,
        "dev": dev_images,
        "val": val_images,
    }
    marker = root / "COMPLETE"
    if marker.is_file() and marker.read_text(encoding="utf-8") == _marker_text(
        seed, image_size, split_sizes
    ):
        return root
    return generate_shapes(
        root, seed=seed, image_size=image_size, train_images=train_images,
        support_images=support_images, dev_images=dev_images, val_images=val_images,
    )


# ----------------------------------------------------------------------------------------
# Domains: `--data shapes:NAME`, for zero-shot transfer studies
# ----------------------------------------------------------------------------------------

DOMAINS_ROOT = Path("data/shapes_domains")
DOMAINS = {
    "outlines": Domain(
        "coloured outlines, nothing inside, on plain light backgrounds; the one domain with "
        "a train split (base classes only), as a user's own data",
        ("red pentagon", "yellow pentagon", "red diamond", "blue diamond", "purple circle",
         "purple square", "blue pentagon", "yellow diamond", "purple diamond"),
        Style(background="plain", outline_only=True),
        novel=("blue pentagon", "yellow diamond", "purple diamond"), train_images=400),
    "crowded": Domain(
        "small objects, 8 to 14 a picture",
        ("orange circle", "orange star", "orange cross", "green pentagon", "blue pentagon",
         "orange pentagon"),
        Style(sizes=(0.06, 0.14), objects=(8, 14))),
    "textures": Domain(
        "high-contrast procedural textures behind the objects",
        ("cyan square", "cyan hexagon", "cyan triangle", "red arrow", "yellow arrow",
         "cyan arrow"),
        Style(background="texture")),
    "blurry": Domain(
        "blur and sensor noise",
        ("magenta circle", "magenta star", "green diamond", "yellow diamond",
         "magenta diamond"),
        Style(blur=1.2, noise=12.0)),
    "large": Domain(
        "one or two large objects on dark backgrounds",
        ("purple hexagon", "orange hexagon", "purple arrow", "orange arrow", "blue arrow"),
        Style(background="dark", sizes=(0.35, 0.75), objects=(1, 2))),
}


def domain_name(domain: Domain) -> str:
    """The name DOMAINS gives a domain."""
    return next(name for name, known in DOMAINS.items() if known == domain)


def domain_named(name: str) -> Domain:
    """DOMAINS[name]; DataError listing the domains for another name."""
    if name not in DOMAINS:
        raise DataError(f"unknown shapes domain {name!r}; the domains are "
                        f"{', '.join(DOMAINS)} (python data.py shapes --list-domains)")
    return DOMAINS[name]


def ensure_domain(name: str, root=None, seed: int = 0, image_size: int = 128) -> Path:
    """The domain's COCO-format folder (default data/shapes_domains/NAME), generated unless
    a complete copy with these parameters is there already, as ensure_shapes does."""
    domain = domain_named(name)
    root = Path(root) if root is not None else DOMAINS_ROOT / name
    marker = root / "COMPLETE"
    text = json.dumps({"version": SHAPES_VERSION, "seed": seed, "image_size": image_size,
                       "name": name, "domain": asdict(domain)}, sort_keys=True) + "\n"
    if marker.is_file() and marker.read_text(encoding="utf-8") == text:
        return root
    marker.unlink(missing_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    _write_splits(root, domain.split_sizes(), seed, image_size, domain)
    marker.write_text(text, encoding="utf-8")
    return root


if __name__ == "__main__":
    main()
