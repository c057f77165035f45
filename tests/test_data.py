"""Tests of data.py: the shapes generator, COCO loading and its bad-input cases,
transforms, batching and prompt sampling. Everything runs on small files in tmp_path."""

import contextlib
import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

import data
import shapes

SMALL_SHAPES = dict(image_size=64, train_images=20, support_images=12, dev_images=4, val_images=24)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    return shapes.generate_shapes(tmp_path_factory.mktemp("shapes"), seed=0, **SMALL_SHAPES)


def write_split(root, pictures, annotations, categories=None, split="val", size=(40, 30)):
    """A COCO-format split on disk. pictures: per image a PIL image, raw bytes (written
    as they are) or None (listed but not written); image ids run from 1."""
    categories = categories or [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = []
    for image_id, picture in enumerate(pictures, start=1):
        file_name = f"{image_id}.png"
        width, height = picture.size if isinstance(picture, Image.Image) else size
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        if isinstance(picture, Image.Image):
            picture.save(root / split / file_name)
        elif picture is not None:
            (root / split / file_name).write_bytes(picture)
    annotations = [
        {"id": index, "iscrowd": 0, "area": 1.0, **annotation} for index, annotation in enumerate(annotations, start=1)
    ]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    return root


def rgb(size=(40, 30), colour=(200, 30, 30)):
    return Image.new("RGB", size, colour)


def unnormalise(image):
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    return image * std + mean


def make_target(labels, image_id=0):
    labels = torch.tensor(labels, dtype=torch.long)
    boxes = torch.rand(len(labels), 4) * 0.5 + 0.25
    size = torch.tensor([32, 32])
    return data.Target(boxes, labels, image_id, size, size)


# ---------------------------------------------------------------- the shapes dataset


def test_generation_is_deterministic(shapes_root, tmp_path):
    again = shapes.generate_shapes(tmp_path / "again", seed=0, **SMALL_SHAPES)
    other = shapes.generate_shapes(tmp_path / "other", seed=1, **SMALL_SHAPES)
    for split in shapes.SPLIT_CLASSES:
        name = f"annotations/instances_{split}.json"
        assert (again / name).read_bytes() == (shapes_root / name).read_bytes()
        assert (other / name).read_bytes() != (shapes_root / name).read_bytes()
    assert (again / "val" / "000001.png").read_bytes() == (shapes_root / "val" / "000001.png").read_bytes()


def test_novel_classes_split(shapes_root):
    split = json.loads((shapes_root / "annotations" / "split.json").read_text())
    names = [category["name"] for category in shapes.shapes_categories()]
    assert len(names) >= 20 and len(split["novel"]) == len(names) // 4
    assert sorted(split["base"] + split["novel"]) == sorted(names)
    base_parts = {part for name in split["base"] for part in enumerate(name.split(" "))}
    for name in split["novel"]:  # (0, colour) and (1, shape) both occur among base classes
        assert set(enumerate(name.split(" "))) <= base_parts
    train = data.CocoDetection(shapes_root, "train")
    val = data.CocoDetection(shapes_root, "val")
    assert train.novel_classes == val.novel_classes and len(train.novel_classes) == len(split["novel"])
    assert not set(train.instance_labels.tolist()) & set(train.novel_classes)
    assert set(val.novel_classes) <= set(val.instance_labels.tolist())


def test_support_split_has_every_class(shapes_root):
    support = data.CocoDetection(shapes_root, "support")
    counts = torch.bincount(support.instance_labels, minlength=len(support.class_names))
    assert counts.min() >= 1


def test_shapes_boxes_inside_images(shapes_root):
    coco = data.load_coco(shapes_root / "annotations" / "instances_val.json")
    for annotation in coco.dataset["annotations"]:
        x, y, width, height = annotation["bbox"]
        assert x >= 0 and y >= 0 and width >= 1 and height >= 1
        assert x + width <= SMALL_SHAPES["image_size"] and y + height <= SMALL_SHAPES["image_size"]
        assert 0 < annotation["area"] <= width * height


def test_ground_truth_round_trip_gives_ap_one(shapes_root):
    """Targets converted back to COCO detections score AP = 1 against the JSON."""
    dataset = data.CocoDetection(shapes_root, "val")
    detections = []
    for index in range(len(dataset)):
        _, target = dataset[index]
        height, width = target.orig_size.tolist()
        boxes = box_convert(target.boxes * torch.tensor([width, height, width, height]), "cxcywh", "xywh")
        for box, label in zip(boxes.tolist(), target.labels.tolist()):
            category_id = dataset.category_ids[label]
            detections.append({"image_id": target.image_id, "category_id": category_id, "bbox": box, "score": 1.0})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(dataset.coco, dataset.coco.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_reused_when_complete_regenerated_otherwise(tmp_path, monkeypatch):
    sizes = dict(image_size=48, train_images=2, support_images=1, dev_images=1, val_images=1)
    shapes.ensure_shapes(tmp_path, **sizes)
    calls = []
    original = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
    shapes.ensure_shapes(tmp_path, **sizes)
    assert calls == []
    (tmp_path / "COMPLETE").unlink()
    shapes.ensure_shapes(tmp_path, **sizes)
    assert len(calls) == 1 and (tmp_path / "COMPLETE").is_file()
    shapes.ensure_shapes(tmp_path, **{**sizes, "train_images": 3})
    assert len(calls) == 2
    assert len(json.loads((tmp_path / "annotations" / "instances_train.json").read_text())["images"]) == 3


def test_preview_command_writes_png(shapes_root, tmp_path):
    out = tmp_path / "preview.png"
    data.main(["preview", "--data", str(shapes_root), "--split", "val", "--out", str(out), "--num-images", "4"])
    picture = Image.open(out)
    assert picture.mode == "RGB" and min(picture.size) > 2 * 384


# ---------------------------------------------------------------- transforms and batching


def test_training_scales():
    assert data.training_scales(800) == list(range(480, 801, 32))
    assert data.training_scales(128) == [80, 88, 96, 104, 112, 120, 128]


def test_two_flips_are_identity():
    image = torch.rand(3, 20, 30)
    boxes = torch.tensor([[2.0, 3.0, 10.0, 15.0], [0.0, 0.0, 30.0, 20.0]])
    labels = torch.tensor([0, 1])
    flip = data.RandomHorizontalFlip(probability=1.0)
    flipped_image, flipped_boxes, _ = flip(image, boxes, labels)
    assert torch.equal(flipped_boxes[0], torch.tensor([20.0, 3.0, 28.0, 15.0]))
    again_image, again_boxes, again_labels = flip(flipped_image, flipped_boxes, labels)
    assert torch.equal(again_image, image) and torch.equal(again_boxes, boxes) and torch.equal(again_labels, labels)


def test_crops_keep_boxes_inside():
    torch.manual_seed(0)
    image = Image.new("RGB", (100, 80))
    boxes = torch.tensor([[5.0, 5.0, 30.0, 40.0], [60.0, 10.0, 95.0, 75.0], [40.0, 50.0, 45.0, 55.0]])
    labels = torch.tensor([0, 1, 2])
    crop = data.RandomSizeCrop(30, 60)
    for _ in range(50):
        cropped, cropped_boxes, cropped_labels = crop(image, boxes, labels)
        width, height = cropped.size
        assert 30 <= width <= 60 and 30 <= height <= 60
        assert len(cropped_boxes) == len(cropped_labels)
        assert (cropped_boxes >= 0).all()
        assert (cropped_boxes[:, [0, 2]] <= width).all() and (cropped_boxes[:, [1, 3]] <= height).all()
        assert (cropped_boxes[:, 2:] > cropped_boxes[:, :2]).all()


def test_training_transforms_keep_boxes_consistent(shapes_root):
    torch.manual_seed(0)
    dataset = data.CocoDetection(shapes_root, "train", data.make_transforms(True, 64, 85))
    for index in range(len(dataset)):
        image, target = dataset[index]
        height, width = target.size.tolist()
        assert image.shape == (3, height, width) and min(height, width) <= 64 and max(height, width) <= 85
        corners = box_convert(target.boxes, "cxcywh", "xyxy")
        assert (corners >= -1e-6).all() and (corners <= 1 + 1e-6).all()
        assert len(target.boxes) == len(target.labels)


def test_augmentation_draws_from_the_generator_alone(shapes_root):
    """A training sample's flip, crop and scales come from the generator it is given: the
    same seed gives the same sample whatever torch's global RNG holds, through
    ReplaceUnreadable as well; another seed gives other samples."""
    dataset = data.build_dataset(str(shapes_root), "train", train=True, image_size=256,
                                 max_size=341)

    def sample(seed, global_seed, source=dataset):
        torch.manual_seed(global_seed)                  # the global RNG in another state
        return source.sample(0, torch.Generator().manual_seed(seed))
    first = sample(1, global_seed=0)
    for again in [sample(1, global_seed) for global_seed in range(1, 6)] + \
            [sample(1, 6, source=data.ReplaceUnreadable(dataset))]:
        assert torch.equal(again[0], first[0]) and torch.equal(again[1].boxes, first[1].boxes)
    others = [sample(seed, global_seed=0) for seed in range(2, 8)]
    assert any(image.shape != first[0].shape or not torch.equal(image, first[0])
               for image, _ in others)


def test_eval_resize_keeps_normalised_boxes(shapes_root):
    plain = data.CocoDetection(shapes_root, "val")
    resized = data.CocoDetection(shapes_root, "val", data.make_transforms(False, 96, 128))
    _, target = plain[0]
    image, resized_target = resized[0]
    assert image.shape == (3, 96, 96) and resized_target.size.tolist() == [96, 96]
    assert target.orig_size.tolist() == [64, 64]
    assert torch.allclose(target.boxes, resized_target.boxes, atol=1e-5)


def test_resized_shape_caps_long_side():
    assert data.resized_shape(480, 640, 800, 1333) == (800, 1066)
    assert data.resized_shape(300, 1000, 800, 1333) == (400, 1333)
    assert data.resized_shape(1000, 300, 128, 171) == (171, 51)


def test_resized_shape_rounds_as_grounding_dinos_image_processor():
    image_transforms = pytest.importorskip("transformers.image_transforms")
    for height, width in [(300, 1000), (1000, 300), (480, 640), (451, 300), (799, 1333),
                          (100, 200), (333, 1001), (800, 1200)]:
        for short_side, max_size in [(800, 1333), (128, 171)]:
            assert data.resized_shape(height, width, short_side, max_size) == \
                image_transforms.get_size_with_aspect_ratio((height, width), short_side,
                                                            max_size), (height, width)


def test_collate_pads_and_masks():
    first = (torch.ones(3, 40, 50), make_target([0]))
    second = (torch.ones(3, 70, 20), make_target([1, 2]))
    batch = data.collate([first, second])
    assert batch.images.shape == (2, 3, 96, 64) and batch.mask.shape == (2, 96, 64)
    assert data.collate([first, second], pad_multiple=1).images.shape == (2, 3, 70, 50)
    assert not batch.mask[0, :40, :50].any() and batch.mask[0, 40:].all() and batch.mask[0, :, 50:].all()
    assert not batch.mask[1, :70, :20].any() and batch.mask[1, 70:].all() and batch.mask[1, :, 20:].all()
    assert torch.equal(batch.images.sum(dim=1) == 0, batch.mask)
    assert len(batch.targets) == 2
    moved = batch.to("cpu")
    assert moved.targets[1].labels.tolist() == [1, 2]


# ---------------------------------------------------------------- COCO loading and bad input


def test_noncontiguous_category_ids(tmp_path):
    categories = [{"id": 90, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"}]
    annotations = [
        {"image_id": 1, "category_id": 90, "bbox": [1, 1, 10, 10]},
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},
    ]
    dataset = data.CocoDetection(write_split(tmp_path, [rgb()], annotations, categories), "val")
    assert dataset.category_ids == [3, 17, 90] and dataset.class_names == ["car", "cat", "zebra"]
    assert dataset.category_index == {3: 0, 17: 1, 90: 2}
    _, target = dataset[0]
    assert target.labels.tolist() == [2, 0]
    assert torch.allclose(target.boxes[0], torch.tensor([6 / 40, 6 / 30, 10 / 40, 10 / 30]))


def test_missing_folder(tmp_path):
    with pytest.raises(data.DataError, match=str(tmp_path / "absent")):
        data.CocoDetection(tmp_path / "absent", "val")


def test_missing_annotation_file(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(data.DataError, match="instances_val.json"):
        data.CocoDetection(tmp_path, "val")


def test_coco_layout_and_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match="cocodataset.org") as error:
        data.build_dataset("coco", "val", train=False, image_size=64, max_size=64)
    assert "data/coco" in str(error.value)
    write_split(tmp_path / "data" / "coco", [rgb()], [], split="val2017")  # COCO's naming
    annotation_file, image_dir = data.split_files(data.resolve_data_root("coco"), "val")
    assert annotation_file.name == "instances_val2017.json" and image_dir.name == "val2017"


def test_invalid_json_names_file_and_position(tmp_path):
    write_split(tmp_path, [rgb()], [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    annotation_file = tmp_path / "annotations" / "instances_val.json"
    text = annotation_file.read_text()
    annotation_file.write_text(text[: len(text) // 2])
    with pytest.raises(data.DataError, match=r"instances_val\.json.*line 1 column \d+"):
        data.CocoDetection(tmp_path, "val")


def test_corrupt_image_is_replaced_and_counted(tmp_path):
    annotations = [{"image_id": 2, "category_id": 2, "bbox": [1, 1, 5, 5]}]
    write_split(tmp_path, [b"\x89PNG\r\n\x1a\nnot really a png", rgb()], annotations)
    dataset = data.ReplaceUnreadable(data.CocoDetection(tmp_path, "val"))
    with pytest.warns(UserWarning, match="1.png"):
        image, target = dataset[0]
    assert target.image_id == 2 and dataset.num_replaced == 1
    assert target.labels.tolist() == [1] and image.shape == (3, 30, 40)
    _, target = dataset[1]
    assert target.image_id == 2 and dataset.num_replaced == 1
    with pytest.warns(UserWarning, match="1.png"):
        assert [target.image_id for _, target in dataset] == [2, 2]   # iteration ends
    with pytest.raises(data.DataError, match="1.png"):
        dataset.dataset[0]                  # the dataset itself names the broken file


def test_replacements_are_counted_across_workers(tmp_path):
    write_split(tmp_path, [b"broken", rgb(), rgb(), rgb()], [])
    dataset = data.ReplaceUnreadable(data.CocoDetection(tmp_path, "val"))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1,
                                         collate_fn=data.collate)
    batches = list(loader)
    assert len(batches) == 1 and batches[0].images.shape == (2, 3, 32, 64)
    assert [target.image_id for target in batches[0].targets] == [2, 3]  # sample 0 replaced by 1
    assert dataset.num_replaced == 1                 # counted in the worker, seen here


def test_missing_image_file_is_replaced(tmp_path):
    write_split(tmp_path, [rgb(), None], [])
    dataset = data.ReplaceUnreadable(data.CocoDetection(tmp_path, "val"))
    with pytest.warns(UserWarning, match=r"val/2\.png is missing"):
        _, target = dataset[1]
    assert target.image_id == 1 and dataset.num_replaced == 1
    with pytest.raises(data.DataError, match=r"val/2\.png"):
        data.CocoDetection(tmp_path, "val")[1]


def test_importing_data_leaves_pil_pixel_guard_alone(tmp_path):
    import subprocess
    import sys
    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import data; "
            "print(before == Image.MAX_IMAGE_PIXELS is not None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(data.__file__).parent)
    assert result.stdout.strip() == "True", result.stderr[-2000:]
    write_split(tmp_path, [rgb()], [])
    before = Image.MAX_IMAGE_PIXELS
    data.CocoDetection(tmp_path, "val")[0]
    assert Image.MAX_IMAGE_PIXELS == before


def test_bad_boxes_are_clipped_or_dropped_and_counted(tmp_path):
    boxes = [
        [2, 2, 10, 10],  # fine
        [-5, -4, 15, 14],  # clipped to [0, 0, 10, 10]
        [35, 20, 20, 20],  # clipped to [35, 20, 40, 30]
        [5, 5, 0, 8],  # zero width: dropped
        [10, 10, -3, 5],  # negative width: dropped
        [50, 5, 10, 10],  # outside the image: dropped
    ]
    annotations = [{"image_id": 1, "category_id": 1, "bbox": box} for box in boxes]
    write_split(tmp_path, [rgb()], annotations)
    with pytest.warns(UserWarning, match="3 boxes dropped.*2 clipped"):
        dataset = data.CocoDetection(tmp_path, "val")
    assert dataset.num_dropped_boxes == 3 and dataset.num_clipped_boxes == 2
    boxes, labels = dataset.instances(0)
    assert boxes.tolist() == [[2, 2, 12, 12], [0, 0, 10, 10], [35, 20, 40, 30]]
    assert labels.tolist() == [0, 0, 0]


def test_crowd_boxes_are_not_targets(tmp_path):
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"image_id": 1, "category_id": 2, "bbox": [5, 5, 20, 20], "iscrowd": 1},
    ]
    dataset = data.CocoDetection(write_split(tmp_path, [rgb()], annotations), "val")
    _, target = dataset[0]
    assert target.labels.tolist() == [0]


def test_unknown_category_names_annotation(tmp_path):
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10]},
    ]
    write_split(tmp_path, [rgb()], annotations)
    with pytest.raises(data.DataError, match="annotation 2 has category_id 7"):
        data.CocoDetection(tmp_path, "val")


def test_image_modes_load_as_8_bit_rgb(tmp_path):
    sixteen_bit = np.zeros((30, 40), dtype=np.uint16)
    sixteen_bit[:, 20:] = 65535
    palette = Image.new("P", (40, 30), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pictures = [
        Image.new("L", (40, 30), 128),
        Image.new("RGBA", (40, 30), (255, 0, 0, 0)),
        Image.fromarray(sixteen_bit),
        palette,
    ]
    assert pictures[2].mode == "I;16"
    dataset = data.CocoDetection(write_split(tmp_path, pictures, []), "val")
    for index in range(len(pictures)):
        assert dataset.load_image(index).mode == "RGB"
    images = [unnormalise(dataset[index][0]) for index in range(len(pictures))]
    assert all(image.shape == (3, 30, 40) for image in images)
    assert torch.allclose(images[0], torch.full_like(images[0], 128 / 255), atol=1e-3)
    assert torch.allclose(images[1][:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(images[2][:, 0, 0], torch.zeros(3), atol=1e-3)
    assert torch.allclose(images[2][:, 0, 39], torch.ones(3), atol=1e-3)
    assert torch.allclose(images[3][:, 0, 0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)


def test_image_without_annotations_is_kept(tmp_path):
    annotations = [{"image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10]}]
    dataset = data.CocoDetection(write_split(tmp_path, [rgb(), rgb()], annotations), "val")
    assert len(dataset) == 2
    _, target = dataset[0]
    assert target.boxes.shape == (0, 4) and target.labels.shape == (0,) and target.image_id == 1
    batch = data.collate([dataset[0], dataset[1]])
    assert [len(target.labels) for target in batch.targets] == [0, 1]


def test_non_ascii_names_and_novel_argument(tmp_path):
    categories = [{"id": 1, "name": "café"}, {"id": 2, "name": "猫"}, {"id": 3, "name": "Ärger"}]
    annotations = [{"image_id": 1, "category_id": 2, "bbox": [2, 2, 10, 10]}]
    write_split(tmp_path, [rgb()], annotations, categories)
    dataset = data.CocoDetection(tmp_path, "val", novel=["猫"])
    assert dataset.class_names == ["café", "猫", "Ärger"]
    assert dataset.novel_classes == [1] and dataset.base_classes == [0, 2]
    with pytest.raises(data.DataError, match="dog"):
        data.CocoDetection(tmp_path, "val", novel=["猫", "dog"])


def test_split_file_gives_novel_classes(tmp_path):
    write_split(tmp_path, [rgb()], [])
    split = {"base": ["thing"], "novel": ["other"]}
    (tmp_path / "annotations" / "split.json").write_text(json.dumps(split))
    assert data.CocoDetection(tmp_path, "val").novel_classes == [1]
    assert data.CocoDetection(tmp_path, "val", novel=[]).novel_classes == []


# ---------------------------------------------------------------- prompt sampling


def make_batch(targets):
    return data.Batch(torch.zeros(len(targets), 3, 32, 32),
                      torch.zeros(len(targets), 32, 32, dtype=torch.bool), targets)


def test_prompts_one_per_class_deterministic_and_labels_reindexed():
    targets = [make_target([1, 3]), make_target([3, 5, 1, 3]), make_target([])]
    labels = torch.cat([target.labels for target in targets])
    names = [f"class {index}" for index in range(6)]
    instructions, prompted = data.sample_prompts(make_batch(targets), names,
                                                 torch.Generator().manual_seed(0))
    assert instructions.class_names == ["class 1", "class 3", "class 5"]
    assert labels[instructions.selected].tolist() == [1, 3, 5]      # prompt k is of class k
    assert instructions.labels.tolist() == [0, 1, 1, 2, 0, 1]        # prompt index per box
    assert [t.labels.tolist() for t in prompted] == [[0, 1], [1, 2, 0, 1], []]
    assert instructions.image_index.tolist() == [0, 0, 1, 1, 1, 1]
    assert torch.equal(instructions.boxes, torch.cat([t.boxes for t in targets]))
    again, _ = data.sample_prompts(make_batch(targets), names, torch.Generator().manual_seed(0))
    assert torch.equal(again.selected, instructions.selected)
    seen = {tuple(data.sample_prompts(make_batch(targets), names,
                                      torch.Generator().manual_seed(seed))[0].selected.tolist())
            for seed in range(20)}
    assert len(seen) > 1


def test_prompts_of_empty_batch():
    instructions, prompted = data.sample_prompts(make_batch([make_target([]), make_target([])]),
                                                 [], torch.Generator().manual_seed(0))
    assert instructions.class_names == [] and instructions.selected.shape == (0,)
    assert instructions.boxes.shape == (0, 4) and [len(t.labels) for t in prompted] == [0, 0]


def test_instance_image_index():
    targets = [make_target([1, 3]), make_target([]), make_target([0, 0, 2])]
    assert data.instance_image_index(targets).tolist() == [0, 0, 2, 2, 2]


def test_sample_exemplars(tmp_path):
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 15]},
        {"image_id": 2, "category_id": 1, "bbox": [10, 15, 10, 10]},
        {"image_id": 2, "category_id": 1, "bbox": [20, 0, 20, 30]},
    ]
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": "never seen"}]
    dataset = data.CocoDetection(write_split(tmp_path, [rgb(), rgb()], annotations, categories), "val")
    with pytest.warns(UserWarning, match="never seen"):
        exemplars = data.sample_exemplars(dataset, shots=None, seed=0)
    assert list(exemplars) == [0]
    assert [index for index, _ in exemplars[0]] == [0, 1, 1]
    assert torch.allclose(exemplars[0][1][1], torch.tensor([15 / 40, 20 / 30, 10 / 40, 10 / 30]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        two = data.sample_exemplars(dataset, shots=2, seed=3)
        assert len(two[0]) == 2
        again = data.sample_exemplars(dataset, shots=2, seed=3)
    assert [index for index, _ in two[0]] == [index for index, _ in again[0]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(two[0], again[0]))


def test_target_and_batch_move_every_tensor():
    target = make_target([1, 2]).to("meta")
    assert all(t.device.type == "meta"
               for t in (target.boxes, target.labels, target.orig_size, target.size))
    batch = make_batch([make_target([1]), make_target([2, 3])]).to("meta")
    assert batch.images.device.type == batch.mask.device.type == "meta"
    assert all(t.boxes.device.type == t.labels.device.type == "meta" for t in batch.targets)


def test_coco_object_is_pycocotools(shapes_root):
    dataset = data.CocoDetection(shapes_root, "dev")
    assert isinstance(dataset.coco, COCO)
    assert dataset.image_ids == sorted(dataset.coco.getImgIds())


# ----------------------------------------------------------------------------- domains

DEFAULT_WORDS = set(shapes.SHAPE_NAMES) | set(shapes.COLOUR_NAMES)


def small(domain: shapes.Domain) -> shapes.Domain:
    """The same domain with few pictures per split, for speed."""
    return replace(domain, train_images=4 if domain.train_images else 0,
                   support_dev_val_images=(6, 2, 4))


def test_list_domains_prints_five_or_more_names(capsys):
    data.main(["shapes", "--list-domains"])
    names = capsys.readouterr().out.split()
    assert names == list(shapes.DOMAINS) and len(names) >= 5


@pytest.mark.parametrize("name", list(shapes.DOMAINS))
def test_a_domain_is_a_coco_folder_of_unseen_words_read_as_shapes_name(name, tmp_path,
                                                                        monkeypatch):
    """Generated on first use of --data shapes:NAME, deterministic, loadable with
    pycocotools; every class name has a word the default data never uses."""
    monkeypatch.setattr(shapes, "DOMAINS_ROOT", tmp_path / "domains")
    monkeypatch.setitem(shapes.DOMAINS, name, small(shapes.DOMAINS[name]))
    root = data.resolve_data_root(f"shapes:{name}")
    assert root == tmp_path / "domains" / name
    domain = shapes.DOMAINS[name]
    for split in domain.split_sizes():
        dataset = data.CocoDetection(root, split)
        assert len(dataset) == domain.split_sizes()[split]
        assert all(set(n.split()) - DEFAULT_WORDS for n in dataset.class_names), dataset.class_names
        dataset[0]                                                     # the image loads
    if domain.train_images:
        train = data.CocoDetection(root, "train")
        assert {train.class_names[k] for k in train.instance_labels.tolist()}.isdisjoint(
            domain.novel)
        assert [train.class_names[k] for k in train.novel_classes] == list(domain.novel)
    again = shapes.ensure_domain(name, tmp_path / "again")
    for split in domain.split_sizes():
        first = (root / "annotations" / f"instances_{split}.json").read_bytes()
        assert first == (again / "annotations" / f"instances_{split}.json").read_bytes()
        assert (root / split / "000001.png").read_bytes() == (again / split / "000001.png").read_bytes()


@pytest.mark.parametrize("name", list(shapes.DOMAINS))
def test_a_domain_support_split_has_ten_shots_of_every_class(name, tmp_path):
    domain = shapes.DOMAINS[name]
    coco = shapes._generate_split(tmp_path, "support", 0, 128, domain.split_sizes()["support"],
                                domain)
    counts = np.bincount([a["category_id"] for a in coco["annotations"]],
                         minlength=len(coco["categories"]) + 1)[1:]
    assert counts.min() >= 10, dict(zip(shapes.DOMAINS[name].classes, counts.tolist()))


def test_an_unknown_domain_is_named_with_the_list(tmp_path):
    with pytest.raises(data.DataError, match="unknown shapes domain 'nope'; the domains are outlines"):
        data.resolve_data_root("shapes:nope")


def test_text_prompts_hold_the_batch_classes_and_base_negatives_only(shapes_root):
    """Grounding DINO's fine-tuning captions: every class of the batch, then negatives drawn
    from the candidates (the base classes: a novel name is never trained), shuffled, capped;
    the targets' labels index the names."""
    dataset = data.CocoDetection(shapes_root, "train", data.make_transforms(False, 64, 85))
    batch = data.collate([dataset[0], dataset[1]])
    present = {dataset.class_names[k] for t in batch.targets for k in t.labels.tolist()}
    novel = {dataset.class_names[k] for k in dataset.novel_classes}

    def sample(seed, max_prompts=80):
        return data.sample_text_prompts(batch, dataset.class_names, dataset.base_classes,
                                        torch.Generator().manual_seed(seed), max_prompts)
    prompts, targets = sample(0)
    assert set(prompts.class_names) == {dataset.class_names[k] for k in dataset.base_classes}
    assert present <= set(prompts.class_names) and not novel & set(prompts.class_names)
    for original, relabelled in zip(batch.targets, targets):
        assert [prompts.class_names[k] for k in relabelled.labels.tolist()] == \
            [dataset.class_names[k] for k in original.labels.tolist()]
        assert torch.equal(relabelled.boxes, original.boxes)
    capped, _ = sample(0, max_prompts=len(present) + 2)
    assert len(capped.class_names) == len(present) + 2 and present <= set(capped.class_names)
    assert sample(0)[0].class_names == prompts.class_names           # the generator decides
    # A token budget: every class present, then negatives while their captions fit.
    length = {name: len(name) for name in dataset.class_names}        # any cost will do
    budget = sum(length[name] for name in present) + 20
    fitted, _ = data.sample_text_prompts(batch, dataset.class_names, dataset.base_classes,
                                         torch.Generator().manual_seed(0),
                                         name_tokens=length.get, max_tokens=budget)
    assert present <= set(fitted.class_names) and len(fitted.class_names) > len(present)
    assert sum(map(length.get, fitted.class_names)) <= budget
    assert sum(map(length.get, fitted.class_names)) + max(length.values()) > budget
    with pytest.raises(data.DataError, match="smaller --batch-size"):
        data.sample_text_prompts(batch, dataset.class_names, dataset.base_classes,
                                 torch.Generator().manual_seed(0), name_tokens=length.get,
                                 max_tokens=budget - 21)
    assert any(sample(seed)[0].class_names != prompts.class_names for seed in range(1, 5))


@pytest.mark.parametrize("name", shapes.FAR_DOMAINS)
def test_a_far_domain_draws_its_own_objects_with_tight_boxes(name):
    """Every class of a far domain is a painted object (no drawn shape in a new colour), each
    class appears, and each box is tight around pixels that differ from the background."""
    domain = shapes.DOMAINS[name]
    style = replace(domain.style, noise=0.0, blur=0.0)            # so untouched pixels stay
    assert set(domain.classes) <= set(shapes.OBJECT_PAINTERS)
    assert not set(" ".join(domain.classes).split()) & DEFAULT_WORDS
    rng = np.random.default_rng(0)
    categories = domain.categories()
    seen = set()
    for _ in range(4):
        background_rng = np.random.default_rng(rng.integers(1 << 30))
        state = background_rng.bit_generator.state
        picture, stubs = shapes._draw_image(background_rng, 128, categories, style)
        background_rng.bit_generator.state = state
        empty = shapes.BACKGROUNDS[domain.style.background](background_rng, 128)
        changed = np.abs(np.asarray(picture, np.int16) - np.asarray(empty, np.int16)).max(-1) > 0
        for stub in stubs:
            x, y, w, h = stub["bbox"]
            seen.add(stub["category_id"])
            assert 0 < stub["area"] <= w * h
            inside = changed[y:y + h, x:x + w]
            edges = (inside[0], inside[-1], inside[:, 0], inside[:, -1])
            assert all(edge.any() for edge in edges), stub
    assert seen == {category["id"] for category in categories}
