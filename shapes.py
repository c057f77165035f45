"""The embedded synthetic dataset "shapes", written as real COCO JSON and PNG files: shape x
colour classes on cluttered backgrounds, a fixed novel subset of classes that `train` never
shows, and the domains of `--data shapes:NAME` (other names, backgrounds, scales and styles,
for zero-shot transfer studies). Generated on first use of --data shapes (data.py's
resolve_data_root) or by `python data.py shapes`, deterministic by seed. Nothing in data.py
depends on how these pictures are drawn.
"""

import colorsys
import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

SHAPES_ROOT = Path("data/shapes")
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
    classes: tuple[str, ...]  # "<colour> <shape>", or a name of OBJECT_PAINTERS
    style: Style
    novel: tuple[str, ...] = ()  # kept out of train (with a train split only)
    train_images: int = 0
    support_dev_val_images: tuple[int, int, int] = (60, 100, 200)  # 10 shots a class and more

    def categories(self) -> list[dict]:
        return [{"id": index + 1, "name": name, "supercategory": name.split(" ")[-1]}
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
        paint = OBJECT_PAINTERS.get(category["name"])    # a far domain's object, or a shape
        if paint is None:
            shape, colour = category["supercategory"], category["name"].split(" ")[0]
            placement = _place_object(rng, shape, image_size, owner, visible, full, style)
        else:
            placement = _place_painted(rng, paint, image_size, owner, visible, full, style)
        if placement is None:
            continue
        if paint is None:
            polygon, mask = placement                      # mask: 1 fill, 2 outline
            covered = mask > 0
        else:
            covered, pixels = placement
        visible = visible - np.bincount(owner[covered] + 1, minlength=len(visible) + 1)[1:]
        visible, full = np.append(visible, covered.sum()), np.append(full, covered.sum())
        owner[covered] = len(placed)
        if paint is None:
            _paint(rng, canvas, mask, polygon, colour, style.outline_only)
        else:
            canvas[covered] = pixels[covered]
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
# Far domains: other object families on photograph-like backgrounds
# ----------------------------------------------------------------------------------------
# Machine parts on a workbench, cells under a microscope, marks on a printed page: objects
# that are not the drawn shapes, told apart by form and texture rather than by colour, on
# backgrounds with the low-frequency shading and clutter of photographs.


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float noise in about [-1, 1], smooth at the scale of size / cells."""
    grid = Image.fromarray(rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32))
    return np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32)


def _fractal_noise(rng: np.random.Generator, size: int, octaves: int = 4) -> np.ndarray:
    """A sum of smooth noises at doubling frequencies and halving amplitudes: the mottling
    of natural surfaces."""
    return sum(_smooth_noise(rng, size, 2 ** (octave + 1)) / 2 ** octave
               for octave in range(octaves))


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) brightness factors: a lamp off to one side, as in a photograph."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    centre = rng.uniform(-0.3, 1.3, 2)
    distance = np.hypot(xs - centre[0], ys - centre[1])
    return 1.15 - rng.uniform(0.2, 0.45) * distance


def _wood_background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """Wood grain under a lamp: rings bent by fractal noise, knots, brown tones."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    angle = rng.uniform(0, math.pi)
    across = xs * math.cos(angle) + ys * math.sin(angle)
    warp = _fractal_noise(rng, image_size, 3)
    grain = np.sin(2 * math.pi * (rng.uniform(8, 20) * across + 1.5 * warp)) * 0.5 + 0.5
    hue, value = rng.uniform(0.05, 0.11), rng.uniform(0.45, 0.8)
    light = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.35, 0.6), value))
    dark = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.8), value * 0.55))
    pixels = grain[..., None] * light + (1 - grain[..., None]) * dark
    pixels *= (_lighting(rng, image_size) + 0.05 * _fractal_noise(rng, image_size))[..., None]
    return Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))


def _tissue_background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A stained section under a microscope: mottled pink, pale fibres, purple debris."""
    mottle = _fractal_noise(rng, image_size)
    pink = np.array(colorsys.hsv_to_rgb(rng.uniform(0.9, 0.98), rng.uniform(0.15, 0.35),
                                        rng.uniform(0.8, 0.95)))
    pixels = pink * (1 + 0.12 * mottle)[..., None]
    image = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 10)):                 # fibres
        points = np.cumsum(rng.normal(0, image_size / 8, (4, 2)), 0) + rng.uniform(
            0, image_size, 2)
        draw.line(points.flatten().tolist(), fill=tuple(int(v) for v in 255 * pink * 1.05),
                  width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(10, 40)):                # debris
        centre, radius = rng.uniform(0, image_size, 2), rng.uniform(0.5, 1.8)
        draw.ellipse([*(centre - radius), *(centre + radius)],
                     fill=tuple(int(v) for v in rng.uniform(60, 140, 3) * (0.9, 0.6, 1.0)))
    return image


def _paper_background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A printed page photographed: off-white, uneven light, lines of grey words."""
    tone = rng.uniform(0.85, 0.97) * np.array([1.0, 0.98, rng.uniform(0.9, 0.97)])
    pixels = tone * (_lighting(rng, image_size) * 0.3 + 0.75
                     + 0.02 * _fractal_noise(rng, image_size))[..., None]
    image = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    spacing, height = rng.uniform(5, 9), int(rng.integers(1, 3))
    margin = rng.uniform(4, 14)
    for row in np.arange(rng.uniform(2, 8), image_size, spacing):
        x = margin
        while x < image_size - margin:
            word = rng.uniform(3, 14)
            ink = int(rng.uniform(40, 120))
            draw.rectangle([x, row, min(x + word, image_size - margin), row + height],
                           fill=(ink, ink, ink))
            x += word + rng.uniform(2, 4)
    return image


BACKGROUNDS.update(wood=_wood_background, tissue=_tissue_background, paper=_paper_background)


def _canvas(long_side: float) -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    """A transparent square canvas for one object, its drawer and its centre."""
    size = int(math.ceil(long_side * 1.5)) + 4
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    return image, ImageDraw.Draw(image), size / 2


def _turned(points: np.ndarray, angle: float, scale: float, centre: float) -> list[float]:
    """Unit outline points (P, 2) rotated, scaled and centred, flattened for ImageDraw."""
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return ((points @ rotation.T) * scale + centre).flatten().tolist()


def _circle(radius: float, corners: int = 40, wobble: np.ndarray | None = None) -> np.ndarray:
    angles = 2 * math.pi * np.arange(corners) / corners
    radii = radius * (1 + (0 if wobble is None else wobble))
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def _metal(rng: np.random.Generator) -> tuple[int, int, int]:
    """Steel or brass, so that colour never names a part."""
    hue, saturation = (0.12, rng.uniform(0.4, 0.6)) if rng.random() < 0.4 else (
        rng.uniform(0.5, 0.65), rng.uniform(0.0, 0.1))
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation,
                                                             rng.uniform(0.55, 0.85)))


def _hole(draw, centre: float, radius: float) -> None:
    draw.ellipse([centre - radius, centre - radius, centre + radius, centre + radius],
                 fill=(0, 0, 0, 0))


def _gear(rng, long_side):
    image, draw, centre = _canvas(long_side)
    teeth = int(rng.integers(8, 14))
    angles = np.linspace(0, 2 * math.pi, 4 * teeth, endpoint=False)
    radii = np.tile([1.0, 1.0, 0.78, 0.78], teeth)
    outline = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
    draw.polygon(_turned(outline, rng.uniform(0, math.pi), long_side / 2, centre),
                 fill=_metal(rng) + (255,))
    _hole(draw, centre, long_side * rng.uniform(0.1, 0.18))
    return image


def _hex_nut(rng, long_side):
    image, draw, centre = _canvas(long_side)
    draw.polygon(_turned(_regular_polygon(6), rng.uniform(0, math.pi), long_side / 2, centre),
                 fill=_metal(rng) + (255,))
    _hole(draw, centre, long_side * rng.uniform(0.2, 0.26))
    return image


def _washer(rng, long_side):
    image, draw, centre = _canvas(long_side)
    radius = long_side / 2
    draw.ellipse([centre - radius, centre - radius, centre + radius, centre + radius],
                 fill=_metal(rng) + (255,))
    _hole(draw, centre, radius * rng.uniform(0.45, 0.6))
    return image


def _bolt(rng, long_side):
    image, draw, centre = _canvas(long_side)
    width = rng.uniform(0.12, 0.18)
    head = [(-1, -2.2 * width), (-0.7, -2.2 * width), (-0.7, 2.2 * width), (-1, 2.2 * width)]
    shaft = [(-0.7, -width), (1, -width), (1, width), (-0.7, width)]
    angle, colour = rng.uniform(0, 2 * math.pi), _metal(rng) + (255,)
    for part in (head, shaft):
        draw.polygon(_turned(np.array(part), angle, long_side / 2, centre), fill=colour)
    for x in np.arange(-0.3, 0.95, rng.uniform(0.08, 0.12)):           # the thread
        draw.line(_turned(np.array([(x, -width), (x + 0.05, width)]), angle, long_side / 2,
                          centre), fill=(60, 60, 60, 255), width=1)
    return image


def _spring(rng, long_side):
    image, draw, centre = _canvas(long_side)
    turns, width = int(rng.integers(4, 8)), rng.uniform(0.25, 0.4)
    xs = np.linspace(-1, 1, 2 * turns + 1)
    points = np.stack([xs, np.where(np.arange(len(xs)) % 2, width, -width)], 1)
    draw.line(_turned(points, rng.uniform(0, 2 * math.pi), long_side / 2, centre),
              fill=_metal(rng) + (255,), width=max(2, int(long_side / 14)), joint="curve")
    return image


def _bracket(rng, long_side):
    image, draw, centre = _canvas(long_side)
    arm = rng.uniform(0.25, 0.35)
    outline = np.array([(-1, -1), (-1 + 2 * arm, -1), (-1 + 2 * arm, 1 - 2 * arm),
                        (1, 1 - 2 * arm), (1, 1), (-1, 1)]) * 0.7
    angle = rng.uniform(0, 2 * math.pi)
    draw.polygon(_turned(outline, angle, long_side / 2, centre), fill=_metal(rng) + (255,))
    for hole in ((-0.7 + arm * 0.7, -0.35), (0.35, 0.7 - arm * 0.7)):
        x, y = _turned(np.array([hole]), angle, long_side / 2, centre)
        draw.ellipse([x - long_side * 0.06, y - long_side * 0.06, x + long_side * 0.06,
                      y + long_side * 0.06], fill=(0, 0, 0, 0))
    return image


def _cell_colours(rng):
    membrane = tuple(int(v) for v in rng.uniform([120, 60, 150], [170, 100, 200])) + (255,)
    inside = tuple(int(v) for v in rng.uniform([200, 160, 215], [235, 195, 245])) + (255,)
    nucleus = tuple(int(v) for v in rng.uniform([60, 20, 90], [100, 50, 140])) + (255,)
    return membrane, inside, nucleus


def _blob(rng, radius: float, stretch: float = 1.0) -> np.ndarray:
    wobble = _smooth_noise(rng, 40, 4)[0] * 0.12
    return _circle(radius, wobble=wobble) * np.array([stretch, 1.0])


def _cell(rng, long_side, stretch=1.0, lobes=1, vacuole=False):
    image, draw, centre = _canvas(long_side)
    membrane, inside, nucleus = _cell_colours(rng)
    angle = rng.uniform(0, 2 * math.pi)
    scale = long_side / 2 / (stretch if lobes == 1 else 1.8)
    shifts = [0.0] if lobes == 1 else [-0.8, 0.8]
    for shift in shifts:
        outline = _blob(rng, 1.0, stretch) + np.array([shift, 0.0])
        draw.polygon(_turned(outline, angle, scale, centre), fill=inside, outline=membrane,
                     width=max(1, int(long_side / 16)))
    for shift in shifts:
        if vacuole:
            draw.polygon(_turned(_blob(rng, 0.6) + np.array([0.15, 0]), angle, scale, centre),
                         fill=(245, 235, 245, 255))
        offset = np.array([shift + (-0.7 if vacuole else rng.uniform(-0.2, 0.2)), 0.0])
        core = _blob(rng, 0.3 if vacuole else 0.42, stretch * 0.9) + offset
        draw.polygon(_turned(core, angle, scale, centre), fill=nucleus)
    return image


def _star_cell(rng, long_side):
    image, draw, centre = _canvas(long_side)
    membrane, inside, nucleus = _cell_colours(rng)
    arms = int(rng.integers(4, 7))
    angles = np.linspace(0, 2 * math.pi, 8 * arms, endpoint=False)
    radii = 0.45 + 0.55 * np.abs(np.cos(angles * arms / 2)) ** 3
    outline = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
    angle = rng.uniform(0, 2 * math.pi)
    draw.polygon(_turned(outline, angle, long_side / 2, centre), fill=inside, outline=membrane)
    draw.polygon(_turned(_blob(rng, 0.28), angle, long_side / 2, centre), fill=nucleus)
    return image


def _red_blood_cell(rng, long_side):
    image, draw, centre = _canvas(long_side)
    red = tuple(int(v) for v in rng.uniform([200, 80, 100], [235, 120, 140]))
    draw.polygon(_turned(_blob(rng, 1.0), 0.0, long_side / 2, centre), fill=red + (255,))
    pale = tuple(min(255, v + 40) for v in red) + (255,)
    draw.polygon(_turned(_blob(rng, 0.45), 0.0, long_side / 2, centre), fill=pale)
    return image


def _ink(rng) -> tuple[int, int, int, int]:
    return ((int(rng.uniform(10, 50)),) * 2 + (int(rng.uniform(60, 140)),) + (255,)
            if rng.random() < 0.5 else (int(rng.uniform(15, 45)),) * 3 + (255,))


def _barcode(rng, long_side):
    image, draw, centre = _canvas(long_side)
    width, height = long_side, long_side * rng.uniform(0.35, 0.6)
    left, top = centre - width / 2, centre - height / 2
    draw.rectangle([left, top, left + width, top + height], fill=(250, 250, 250, 255))
    x = int(left) + 2
    while x < left + width - 3:
        bar = int(rng.choice([1, 1, 2, 3]))
        draw.rectangle([x, int(top) + 2, x + bar - 1, int(top + height) - 2],
                       fill=(15, 15, 15, 255))
        x += bar + int(rng.choice([1, 2, 3]))
    return image.rotate(rng.uniform(-15, 15), Image.BICUBIC)


def _qr_code(rng, long_side):
    image, draw, centre = _canvas(long_side)
    modules = int(rng.integers(11, 17))
    cell = long_side / (modules + 2)
    left = centre - long_side / 2
    draw.rectangle([left, left, left + long_side, left + long_side], fill=(250, 250, 250, 255))
    bits = rng.random((modules, modules)) < 0.5
    for corner_y, corner_x in ((0, 0), (0, modules - 7), (modules - 7, 0)):
        bits[corner_y:corner_y + 7, corner_x:corner_x + 7] = False
        ring = np.zeros((7, 7), bool)
        ring[[0, -1], :] = ring[:, [0, -1]] = True
        ring[2:5, 2:5] = True
        bits[corner_y:corner_y + 7, corner_x:corner_x + 7] = ring
    for y, x in zip(*np.nonzero(bits)):
        x0, y0 = left + cell * (x + 1), left + cell * (y + 1)
        draw.rectangle([x0, y0, x0 + max(cell - 1, 0), y0 + max(cell - 1, 0)],
                       fill=(10, 10, 10, 255))
    return image.rotate(rng.uniform(-10, 10), Image.BICUBIC)


def _stamp(rng, long_side):
    image, draw, centre = _canvas(long_side)
    ink = ((int(rng.uniform(170, 220)), 30, 40) if rng.random() < 0.6
           else (40, 50, int(rng.uniform(150, 200)))) + (220,)
    radius, width = long_side / 2, max(1, int(long_side / 14))
    draw.ellipse([centre - radius, centre - radius, centre + radius, centre + radius],
                 outline=ink, width=width)
    inner = radius * 0.72
    draw.ellipse([centre - inner, centre - inner, centre + inner, centre + inner],
                 outline=ink, width=1)
    for row in np.linspace(-0.3, 0.3, 3) * radius:
        draw.line([centre - inner * 0.6, centre + row, centre + inner * 0.6, centre + row],
                  fill=ink, width=max(1, width - 1))
    return image


def _signature(rng, long_side):
    image, draw, centre = _canvas(long_side)
    xs = np.linspace(-1, 1, 60)
    ys = (0.3 * np.sin(xs * rng.uniform(6, 14) + rng.uniform(0, 6))
          * np.cos(xs * rng.uniform(1, 3)) + 0.15 * _smooth_noise(rng, 60, 5)[0])
    points = np.stack([xs, ys], 1)
    draw.line(_turned(points, rng.uniform(-0.3, 0.3), long_side / 2, centre), fill=_ink(rng),
              width=max(1, int(long_side / 20)), joint="curve")
    return image


def _checkbox(rng, long_side):
    image, draw, centre = _canvas(long_side)
    half, ink = long_side / 2, _ink(rng)
    draw.rectangle([centre - half, centre - half, centre + half, centre + half],
                   fill=(250, 250, 250, 255), outline=ink, width=max(1, int(long_side / 12)))
    tick = np.array([(-0.6, 0.0), (-0.15, 0.55), (0.7, -0.6)]) if rng.random() < 0.6 else None
    if tick is not None:
        draw.line((tick * half + centre).flatten().tolist(), fill=ink,
                  width=max(1, int(long_side / 8)))
    else:
        for sign in (1, -1):
            draw.line([centre - half * 0.6, centre - sign * half * 0.6, centre + half * 0.6,
                       centre + sign * half * 0.6], fill=ink, width=max(1, int(long_side / 8)))
    return image


def _photo(rng, long_side):
    image, draw, centre = _canvas(long_side)
    width, height = long_side, long_side * rng.uniform(0.6, 0.8)
    left, top = centre - width / 2, centre - height / 2
    sky = tuple(int(v) for v in rng.uniform([90, 140, 200], [150, 190, 240]))
    draw.rectangle([left, top, left + width, top + height], fill=sky + (255,),
                   outline=(255, 255, 255, 255), width=max(1, int(long_side / 20)))
    hill = [(left + 1, top + height * rng.uniform(0.5, 0.7)),
            (left + width * rng.uniform(0.3, 0.7), top + height * rng.uniform(0.3, 0.5)),
            (left + width - 1, top + height * rng.uniform(0.5, 0.75)),
            (left + width - 1, top + height - 1), (left + 1, top + height - 1)]
    draw.polygon(hill, fill=tuple(int(v) for v in rng.uniform([40, 100, 40], [90, 160, 80]))
                 + (255,))
    sun = rng.uniform(0.1, 0.9) * width + left, top + height * 0.25
    draw.ellipse([sun[0] - 2, sun[1] - 2, sun[0] + 2, sun[1] + 2], fill=(250, 220, 90, 255))
    return image.rotate(rng.uniform(-12, 12), Image.BICUBIC)


OBJECT_PAINTERS = {  # class name -> (rng, long side in pixels) -> an RGBA picture of it
    "gear": _gear, "hex nut": _hex_nut, "washer": _washer, "bolt": _bolt,
    "spring": _spring, "bracket": _bracket,
    "round cell": lambda rng, size: _cell(rng, size),
    "spindle cell": lambda rng, size: _cell(rng, size, stretch=rng.uniform(2.2, 3.0)),
    "dividing cell": lambda rng, size: _cell(rng, size, lobes=2),
    "signet ring cell": lambda rng, size: _cell(rng, size, vacuole=True),
    "stellate cell": _star_cell, "erythrocyte": _red_blood_cell,
    "barcode": _barcode, "qr code": _qr_code, "stamp": _stamp, "signature": _signature,
    "checkbox": _checkbox, "photo": _photo,
}


def _place_painted(
    rng, paint, image_size: int, owner: np.ndarray, visible: np.ndarray, full: np.ndarray,
    style: "Style",
) -> tuple[np.ndarray, np.ndarray] | None:
    """_place_object for a painted object: (covered (S, S) bool, pixels (S, S, 3) float,
    valid where covered), or None when no position keeps every object mostly visible."""
    largest = image_size / 3
    smallest = min(16.0, largest)
    if style.sizes is not None:
        smallest, largest = style.sizes[0] * image_size, style.sizes[1] * image_size
    for attempt in range(PLACEMENT_ATTEMPTS):
        long_side = math.exp(rng.uniform(math.log(smallest), math.log(largest)))
        picture = paint(rng, long_side)
        picture = picture.crop(picture.getbbox() or (0, 0, 1, 1))
        rgba = np.asarray(picture, dtype=np.float32)
        mask = rgba[..., 3] > 127
        height, width = mask.shape
        fully_inside = attempt == PLACEMENT_ATTEMPTS - 1 or rng.random() < 0.8
        low = np.zeros(2) if fully_inside else -np.array([width, height]) / 2
        high = (np.array([image_size - width, image_size - height]) if fully_inside
                else image_size - np.array([width, height]) / 2)
        x, y = (int(v) for v in rng.uniform(low, np.maximum(high, low)))
        covered = np.zeros((image_size, image_size), bool)
        pixels = np.zeros((image_size, image_size, 3), np.float32)
        top, left = max(y, 0), max(x, 0)
        bottom, right = min(y + height, image_size), min(x + width, image_size)
        if bottom <= top or right <= left:
            continue
        inside = mask[top - y:bottom - y, left - x:right - x]
        covered[top:bottom, left:right] = inside
        pixels[top:bottom, left:right] = rgba[top - y:bottom - y, left - x:right - x, :3]
        if covered.sum() < MIN_VISIBLE_FRACTION * mask.sum():
            continue
        hidden = np.bincount(owner[covered] + 1, minlength=len(visible) + 1)[1:]
        if np.all(visible - hidden >= MIN_VISIBLE_FRACTION * full):
            return covered, pixels
    return None


FAR_DOMAINS = ("parts", "cells", "documents")


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
    "parts": Domain(
        "machine parts, steel or brass, on wood grain under a lamp: objects told apart by "
        "form, not colour, on a photograph-like background; a train split",
        ("gear", "hex nut", "washer", "bolt", "spring", "bracket"),
        Style(background="wood"), novel=("washer", "bracket"), train_images=600),
    "cells": Domain(
        "cells under a microscope on stained tissue with fibres and debris; a train split",
        ("round cell", "spindle cell", "dividing cell", "signet ring cell", "stellate cell",
         "erythrocyte"),
        Style(background="tissue", noise=4.0), novel=("signet ring cell", "stellate cell"),
        train_images=600),
    "documents": Domain(
        "marks on a photographed printed page among lines of words; a train split",
        ("barcode", "qr code", "stamp", "signature", "checkbox", "photo"),
        Style(background="paper"), novel=("stamp", "photo"), train_images=600),
}


def domain_name(domain: Domain) -> str:
    """The name DOMAINS gives a domain."""
    return next(name for name, known in DOMAINS.items() if known == domain)


def domain_named(name: str) -> Domain:
    """DOMAINS[name]; ValueError listing the domains for another name."""
    if name not in DOMAINS:
        raise ValueError(f"unknown shapes domain {name!r}; the domains are "
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
