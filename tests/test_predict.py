"""predict.py on real files: a checkpoint from a short training run on the shapes fixture,
pictures written to disk. Box coordinates against the data pipeline, agreement with
evaluate.py's interactive mode, prototypes saved by evaluate.py, and every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.functional import pil_to_tensor

import evaluate
import predict
import train_sft
from conftest import run_args
from data import CocoDetection, build_dataset, collate, make_transforms
from model import DINOR1

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_run")
    train_sft.main(run_args(shapes, out, "--max-steps", "2"))
    return out / "last.pt"


@pytest.fixture(scope="module")
def model(checkpoint) -> DINOR1:
    return predict.load_model(checkpoint)


def val_annotations(shapes) -> dict:
    return json.loads((shapes / "annotations" / "instances_val.json").read_text())


def val_picture(shapes, index: int = 0) -> Path:
    return shapes / "val" / val_annotations(shapes)["images"][index]["file_name"]


def one_picture_dataset(folder: Path, picture: Image.Image, annotations: list[dict],
                        categories: list[dict]) -> Path:
    """A COCO-format folder with one picture (val/picture.png); returns the picture's path."""
    (folder / "val").mkdir(parents=True)
    (folder / "annotations").mkdir()
    picture.save(folder / "val" / "picture.png")
    image = {"id": 1, "file_name": "picture.png", "width": picture.width, "height": picture.height}
    annotations = [{"id": i + 1, "image_id": 1, "iscrowd": 0, "area": 1.0, **a}
                   for i, a in enumerate(annotations)]
    coco = {"images": [image], "annotations": annotations, "categories": categories}
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return folder / "val" / "picture.png"


def failure(argv: list[str]) -> str:
    """The message of the SystemExit that predict.main raises; it must be one line."""
    with pytest.raises(SystemExit) as caught:
        predict.main(argv)
    message = caught.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- coordinates

def test_a_pixel_box_reaches_the_model_as_the_data_pipeline_normalises_it(
        checkpoint, model, tmp_path, monkeypatch):
    """A 300x100 picture: at short side 128 its long side would be 384, so max_size (171)
    caps it to 171x57. Its box, given in pixels as --box (on the picture) and as --exemplar
    (from its file), reaches encode_exemplars as exactly the normalised cxcywh box, on
    exactly the image, that CocoDetection with evaluation transforms produces."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (100, 300, 3), dtype=np.uint8))
    bbox = [31.5, 12.25, 100.0, 40.5]                       # COCO x, y, w, h
    path = one_picture_dataset(tmp_path / "wide", picture,
                               [{"category_id": 7, "bbox": bbox}], [{"id": 7, "name": "thing"}])
    size = dict(image_size=model.config.image_size, max_size=model.config.max_size)
    image, target = CocoDetection(tmp_path / "wide", "val", make_transforms(False, **size))[0]
    assert target.size.tolist() == [57, 171]
    seen = []
    real = DINOR1.encode_exemplars

    def spy(self, images, mask, image_index, boxes):
        seen.append((images, mask, image_index, boxes))
        return real(self, images, mask, image_index, boxes)

    monkeypatch.setattr(DINOR1, "encode_exemplars", spy)
    box = "31.5,12.25,131.5,52.75=thing"
    predict.main(["--ckpt", str(checkpoint), "--image", str(path), "--box", box,
                  "--exemplar", f"{path}:{box}", "--out", str(tmp_path / "out")])
    assert len(seen) == 2                                   # the exemplar, then the box
    for images, mask, image_index, boxes in seen:
        assert torch.equal(boxes, target.boxes)
        assert image_index.tolist() == [0]
        assert torch.equal(images[0, :, :57, :171], image)
        assert not mask[0, :57, :171].any() and mask[0].sum() == mask[0].numel() - 57 * 171


def test_predicted_boxes_are_in_the_pixels_of_the_original_file(model, tmp_path, monkeypatch):
    """The model's boxes are normalised to the resized picture (171x57, padded to 192x64);
    predict returns them in the file's 300x100 pixels."""
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (100, 300, 3), dtype=np.uint8))
    outputs = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: outputs.append(real(*a, **k)) or outputs[-1])
    found = predict.predict(model, picture, predict.Prompts([predict.Exemplar((40, 10, 90, 60), "a")]),
                            threshold=0.0, top_k=5)
    logits, boxes = outputs[0].logits[-1, 0], outputs[0].boxes[-1, 0]    # (Q, 1), (Q, 4)
    scores, query = logits[:, 0].sigmoid().topk(5)
    expected = box_convert(boxes[query], "cxcywh", "xyxy") * torch.tensor([300.0, 100, 300, 100])
    assert torch.allclose(found.scores, scores)
    assert torch.allclose(found.boxes, expected, atol=1e-4)
    assert found.labels.tolist() == [0] * 5 and found.names == ["a"]
    as_tensor = predict.predict(model, pil_to_tensor(picture), predict.Prompts(
        [predict.Exemplar((40, 10, 90, 60), "a")]), threshold=0.0, top_k=5)
    assert torch.equal(as_tensor.boxes, found.boxes)          # a uint8 tensor: the same


# ----------------------------------------------------------------------------- agreement

def test_ground_truth_boxes_agree_with_interactive_evaluation(shapes, checkpoint, model, tmp_path):
    """A val picture with its ground-truth boxes as --box prompts named by class gives the
    detections of evaluate.py's interactive mode. Two boxes are relabelled to one class,
    so that boxes of one class are averaged into one prompt. The boxes are given in class
    order, the order of the interactive mode's prompts, so that the two agree to the bit
    (another order permutes the prompts and moves scores by float rounding, ~1e-5)."""
    coco = val_annotations(shapes)
    image = max(coco["images"], key=lambda i: sum(a["image_id"] == i["id"] for a in coco["annotations"]))
    annotations = [{"category_id": a["category_id"], "bbox": a["bbox"]}
                   for a in coco["annotations"] if a["image_id"] == image["id"]]
    assert len(annotations) >= 3
    annotations[2]["category_id"] = annotations[0]["category_id"]
    picture = Image.open(shapes / "val" / image["file_name"])
    path = one_picture_dataset(tmp_path / "data", picture, annotations, coco["categories"])
    dataset = build_dataset(str(tmp_path / "data"), "val", train=False,
                            image_size=model.config.image_size, max_size=model.config.max_size)
    with torch.no_grad():                   # as in evaluate(): attention takes its fast path
        expected = evaluate.detect_interactive(model, collate([dataset[0]]))[0]
    names = {c["id"]: c["name"] for c in coco["categories"]}
    annotations.sort(key=lambda a: a["category_id"])
    exemplars = [predict.Exemplar((x, y, x + w, y + h), names[a["category_id"]])
                 for a in annotations for x, y, w, h in [a["bbox"]]]
    found = predict.predict(model, path, predict.Prompts(exemplars), threshold=0, top_k=300)
    assert len(found.names) == len(annotations) - 1 and len(found.scores) > 0
    assert torch.equal(found.boxes, expected.boxes) and torch.equal(found.scores, expected.scores)
    assert [found.names[k] for k in found.labels] == \
        [dataset.class_names[k] for k in expected.labels]
    boxes = [f"--box={','.join(str(v) for v in e.box)}={e.name}" for e in exemplars]
    results = predict.main(["--ckpt", str(checkpoint), "--image", str(path), "--threshold", "0",
                            "--top-k", "300", "--out", str(tmp_path / "out"), *boxes])
    assert results == json.loads((tmp_path / "out" / "detections.json").read_text())
    assert results == evaluate.coco_results(found.detections, {"file_name": str(path)}, "name",
                                            found.names)


# ----------------------------------------------------------------------------- prompts

def test_prototypes_saved_by_evaluate_and_text_prompts(shapes, checkpoint, model, tmp_path):
    """evaluate.py --save-prototypes writes generic_prototypes' output as a plain dict;
    --classes reads it, --text adds a prompt, and every prompt reaches the model."""
    file = tmp_path / "prototypes.pt"
    evaluate.main(["--ckpt", str(checkpoint), "--save-prototypes", str(file)])
    saved = torch.load(file, weights_only=True)
    support = build_dataset(str(shapes), "support", train=False, image_size=128, max_size=171)
    prototypes, classes = evaluate.generic_prototypes(model, support, None, 0, "cpu")
    assert set(saved) == {"prototypes", "names", "format"}
    assert saved["prototypes"].shape == (24, 64)
    assert torch.allclose(saved["prototypes"], prototypes)
    assert saved["names"] == [support.class_names[c] for c in classes]
    results = predict.main(["--ckpt", str(checkpoint), "--image", str(val_picture(shapes)),
                            "--classes", str(file), "--text", "red circle", "--threshold", "0",
                            "--top-k", "2500", "--out", str(tmp_path / "out")])
    assert len(results) == 25 * 100                     # every (query, prompt) pair
    assert {r["name"] for r in results} == set(saved["names"]) | {"red circle"}
    assert (tmp_path / "out" / f"{val_picture(shapes).stem}.png").is_file()
    del saved["format"]                 # as written before the format was recorded
    torch.save(saved, tmp_path / "old.pt")
    message = failure(["--ckpt", str(checkpoint), "--image", str(val_picture(shapes)),
                       "--classes", str(tmp_path / "old.pt"), "--out", str(tmp_path / "out")])
    assert message.startswith(f"{tmp_path / 'old.pt'} is a prototype file of format 1, "
                              f"written by an earlier version of the detector")


# ----------------------------------------------------------------------------- bad input

def test_a_box_outside_the_picture(shapes, checkpoint, tmp_path):
    picture = val_picture(shapes)             # 128x128
    message = failure(["--ckpt", str(checkpoint), "--image", str(picture),
                       "--box", "100,100,140,120", "--out", str(tmp_path)])
    assert str(picture) in message and "100,100,140,120" in message and "outside" in message
    message = failure(["--ckpt", str(checkpoint), "--image", str(picture),
                       "--exemplar", f"{picture}:-5,0,20,20", "--out", str(tmp_path)])
    assert str(picture) in message and "-5,0,20,20" in message and "outside" in message


def test_a_box_of_zero_size(shapes, checkpoint, tmp_path):
    message = failure(["--ckpt", str(checkpoint), "--image", str(val_picture(shapes)),
                       "--box", "10,10,10,50", "--out", str(tmp_path)])
    assert "10,10,10,50" in message and "zero size" in message


def test_a_missing_or_unreadable_picture(shapes, checkpoint, tmp_path):
    missing = tmp_path / "nowhere.png"
    message = failure(["--ckpt", str(checkpoint), "--image", str(missing), "--box", "1,1,9,9", "--out", str(tmp_path / "out")])
    assert message == f"picture {missing} not found"            # before the model loads
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    message = failure(["--ckpt", str(checkpoint), "--image", str(corrupt), "--box", "1,1,9,9",
                       "--out", str(tmp_path / "out")])
    assert str(corrupt) in message


def test_a_folder_with_one_corrupt_picture(shapes, checkpoint, tmp_path):
    """The readable pictures are drawn and listed; the corrupt one is named, with its
    reason, and the exit code is non-zero (in a real process: no traceback)."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index in range(2):
        shutil.copy(val_picture(shapes, index), folder / f"good{index}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (folder / "notes.txt").write_text("not a picture")
    completed = subprocess.run(
        [sys.executable, "predict.py", "--ckpt", str(checkpoint), "--image", str(folder),
         "--box", "10,10,40,40", "--threshold", "0", "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    last_line = completed.stderr.strip().splitlines()[-1]  # after the bar and the reason
    assert last_line == f"1 of 3 pictures failed: {folder / 'broken.jpg'}"
    assert f"cannot read image file {folder / 'broken.jpg'}" in completed.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["good0.png", "good1.png"]
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {r["file_name"] for r in results} == {str(folder / "good0.png"), str(folder / "good1.png")}


def test_a_missing_checkpoint(shapes, tmp_path):
    missing = tmp_path / "none" / "last.pt"
    message = failure(["--ckpt", str(missing), "--image", str(val_picture(shapes)),
                       "--box", "1,1,9,9", "--out", str(tmp_path / "out")])
    assert str(missing) in message


def test_no_prompt_at_all(shapes, checkpoint, tmp_path):
    message = failure(["--ckpt", str(checkpoint), "--image", str(val_picture(shapes)),
                       "--out", str(tmp_path / "out")])
    assert message.startswith("no prompt")                      # before the model loads


def test_text_for_a_model_whose_text_encoder_is_unavailable(shapes, checkpoint, tmp_path):
    """A checkpoint trained with a BERT text encoder that this machine does not have."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["text_encoder"] = "no-such-bert"
    torch.save(saved, tmp_path / "bert.pt")
    message = failure(["--ckpt", str(tmp_path / "bert.pt"), "--image", str(val_picture(shapes)),
                       "--text", "red circle", "--out", str(tmp_path / "out")])
    assert "no-such-bert" in message and str(tmp_path / "bert.pt") in message
