"""export.py and predict.py --onnx: graphs traced at one size run at others, in every prompt
mode, as the eager detector does; bad input is refused in one line."""

import argparse
import json
import shutil
import sys

import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import export  # noqa: E402
import predict  # noqa: E402
import train_sft  # noqa: E402
from checkpoints import load_detector  # noqa: E402
from conftest import run_args  # noqa: E402
from model import expand_prompts, one_token_per_class  # noqa: E402

SIZES = [(96, 160), (224, 128), (160, 288)]      # landscape, portrait; none a multiple of another


@pytest.fixture(scope="module")
def exported(shapes, tmp_path_factory):
    """A tiny checkpoint trained for two steps, and its export (traced at 128 x 128)."""
    folder = tmp_path_factory.mktemp("export")
    train_sft.main(run_args(shapes, folder / "run", "--max-steps", "2"))
    checkpoint = folder / "run" / "last.pt"
    export.main(["--ckpt", str(checkpoint), "--out", str(folder / "onnx")])
    model = load_detector(checkpoint)[0].eval()
    return checkpoint, folder / "onnx", model, export.OnnxDetector(folder / "onnx")


def pictures(batch: int, height: int, width: int):
    """Images (B, 3, H, W) and their mask; the second picture has padding on the right."""
    generator = torch.Generator().manual_seed(height * width + batch)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if batch > 1:
        mask[1, :, width - 32:] = True
        images[1, :, :, width - 32:] = 0
    return images, mask


def assert_same_detections(eager_output, onnx_output):
    """Logits and boxes of the last layer within atol 1e-4 / rtol 1e-3, and the same top-10
    queries wherever their scores are more than 1e-4 apart."""
    logits, boxes = eager_output.logits[-1], eager_output.boxes[-1]
    torch.testing.assert_close(onnx_output.logits[-1], logits, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(onnx_output.boxes[-1], boxes, atol=1e-4, rtol=1e-3)
    for ours, theirs in zip(onnx_output.logits[-1].amax(-1), logits.amax(-1)):
        order = theirs.argsort(descending=True)
        gaps = theirs[order[:10]] - theirs[order[1:11]]
        ranked = ours.argsort(descending=True)[:10]
        for rank in range(10):
            if gaps[rank] > 1e-4 and (rank == 0 or gaps[rank - 1] > 1e-4):
                assert ranked[rank] == order[rank], (rank, ranked, order[:10])


# Names whose caption has 4 and 17 tokens with the tiny preset's generated vocabulary:
# [CLS], each name's pieces (1 for "a", 2 for the others) and its ".", [SEP].
CAPTIONS = {4: ["a"], 17: ["red", "blue", "star", "cat", "dog"]}


def test_the_export_writes_checked_graphs_and_a_manifest(exported):
    import onnx

    checkpoint, folder, model, _ = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"detector", "text_encoder", "visual_prompts"}
    for graph in manifest["graphs"].values():
        onnx.checker.check_model(str(folder / graph["file"]), full_check=True)
    assert manifest["graphs"]["detector"]["inputs"]["images"]["shape"][0] == "batch"
    assert manifest["checkpoint_sha256"] == export.file_hash(checkpoint)
    assert manifest["num_queries"] == model.config.num_queries
    assert (folder / "vocab.txt").read_text().split("\n")[:3] == sorted(
        model.text_encoder.tokenizer.ids, key=model.text_encoder.tokenizer.ids.get)[:3]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_graphs_traced_at_one_size_give_the_eager_detections_at_others(exported, height,
                                                                       width, batch):
    """Visual prompts (4 and 17 tokens), captions (4 and 17 tokens) and exemplars encoded by
    the visual prompt graph, at a size, batch and prompt length the export never saw."""
    _, _, model, runtime = exported
    images, mask = pictures(batch, height, width)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for length in (4, 17):
            vectors = torch.randn(batch, length, model.config.hidden_dim, generator=generator)
            prompts = one_token_per_class(vectors)
            assert_same_detections(model(images, mask, prompts), runtime(images, mask, prompts))
            names = CAPTIONS[length]
            eager_caption = model.text_encoder.caption(names)
            caption = runtime.text_encoder.caption(names)
            assert caption.tokens.shape[1] == length
            torch.testing.assert_close(caption.tokens, eager_caption.tokens, atol=1e-4,
                                       rtol=1e-3)
            expanded = [expand_prompts(c, batch) for c in (eager_caption, caption)]
            assert_same_detections(model(images, mask, expanded[0]),
                                   runtime(images, mask, expanded[1]))
        image_index = torch.tensor([0, 0, batch - 1])
        boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.5, 0.25, 0.2], [0.5, 0.5, 0.3, 0.3]])
        torch.testing.assert_close(runtime.encode_exemplars(images, mask, image_index, boxes),
                                   model.encode_exemplars(images, mask, image_index, boxes),
                                   atol=1e-4, rtol=1e-3)


def test_predict_with_onnx_writes_the_eager_detections(exported, shapes, tmp_path):
    """A box on the picture itself, an exemplar on another picture and a name, on `val`."""
    checkpoint, folder, _, _ = exported
    prompts = ["--box", "20,20,60,60=thing", "--exemplar",
               f"{shapes / 'val' / '000002.png'}:10,10,50,50=other", "--text", "red circle",
               "--threshold", "0", "--top-k", "20"]
    found = {}
    for source in (["--ckpt", str(checkpoint)], ["--onnx", str(folder)]):
        out = tmp_path / source[0].strip("-")
        found[source[0]] = predict.main([*source, "--image", str(shapes / "val" / "000001.png"),
                                         *prompts, "--out", str(out)])
    eager, onnx = found["--ckpt"], found["--onnx"]
    assert len(eager) == len(onnx) == 20 * 1
    for ours, theirs in zip(onnx, eager):
        assert ours["name"] == theirs["name"]
        assert abs(ours["score"] - theirs["score"]) <= 1e-3
        assert max(abs(a - b) for a, b in zip(ours["bbox"], theirs["bbox"])) <= 1.0


@pytest.mark.parametrize("source", ["eager", "onnx"])
def test_a_batch_of_pictures_of_mixed_sizes_gives_each_its_single_detections(exported, shapes,
                                                                             tmp_path, source):
    """--batch-size 4 over a folder of mixed sizes: pictures of one padded size go together,
    and every picture gets the detections it gets alone."""
    _, _, model, runtime = exported
    folder = tmp_path / "pictures"
    folder.mkdir()
    original = Image.open(shapes / "val" / "000001.png")
    sizes = [(128, 128), (128, 120), (150, 100), (128, 128), (96, 128), (128, 125), (100, 150),
             (128, 110), (128, 128)]                  # 128 x 128 padded: 6 of them, a full batch
    for index, size in enumerate(sizes):
        original.resize(size).save(folder / f"{index}.png")
    (folder / "5b.png").write_bytes(b"not a picture")     # named and skipped, the rest written
    detector = model if source == "eager" else runtime
    prompts = predict.build_prompts(argparse.Namespace(
        box=[], exemplar=[f"{shapes / 'val' / '000003.png'}:10,10,60,60=x"],
        text=["red circle", "blue star"], classes=[]), detector)
    listed = predict.list_pictures([str(folder)])
    found = {}
    for batch_size in (1, 4):
        with pytest.raises(SystemExit, match="1 of 10 pictures failed: .*5b.png"):
            predict.run(detector, prompts, listed, tmp_path / str(batch_size), 0.0, 10,
                        batch_size=batch_size)
        found[batch_size] = json.loads((tmp_path / str(batch_size) / "detections.json")
                                       .read_text())
    alone, together = found[1], found[4]
    assert len(alone) == 9 * 10
    assert [d["file_name"] for d in together] == [d["file_name"] for d in alone]
    for ours, theirs in zip(together, alone):
        assert ours["name"] == theirs["name"]
        assert abs(ours["score"] - theirs["score"]) <= 1.01e-4
        assert max(abs(a - b) for a, b in zip(ours["bbox"], theirs["bbox"])) <= 0.011


def test_bad_input_is_refused_in_one_line(exported, tmp_path, monkeypatch):
    _, folder, _, runtime = exported
    images, mask = pictures(1, 64, 64)                 # 85 encoder tokens, fewer than Q
    prompts = one_token_per_class(torch.randn(1, 3, runtime.config.hidden_dim))
    with pytest.raises(ValueError, match="fewer than the 100 queries"):
        runtime(images, mask, prompts)
    images, mask = pictures(1, 100, 128)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        runtime(images, mask, prompts)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["graphs"]["detector"]["inputs"] = {"pictures": {}}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="takes .* but .* says"):
        export.OnnxDetector(broken)
    (broken / "detector.onnx").unlink()
    with pytest.raises(SystemExit, match="detector.onnx is missing"):
        export.OnnxDetector(broken)
    with pytest.raises(SystemExit, match="manifest.json is missing"):
        export.OnnxDetector(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # as if not installed
    with pytest.raises(SystemExit, match="onnxruntime is not installed: pip install -r "
                                         "requirements-export.txt"):
        export.OnnxDetector(folder)


def test_a_swin_backbone_is_refused_in_one_line(tmp_path):
    """A small Grounding DINO folder (Swin): its export would not finish (export.PAD_MULTIPLE),
    so it is refused at once, by name."""
    from test_grounding_dino import save_tiny_grounding_dino

    folder = tmp_path / "gd"
    folder.mkdir()
    save_tiny_grounding_dino(folder)
    with pytest.raises(SystemExit, match=f"{folder} has a swin backbone: export.py exports the "
                                         f"tiny backbone only"):
        export.main(["--ckpt", str(folder), "--out", str(tmp_path / "onnx")])
    assert not (tmp_path / "onnx").exists()
