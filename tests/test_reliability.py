"""Reliability: faults during training (a kill, a crash inside a checkpoint write, a
non-finite loss, memory over epochs, DDP sampling) and bad input (data, checkpoints,
command lines), each with the message the user sees. Data-side cases that tests/test_data.py
already covers (invalid JSON, missing or corrupt images, bad boxes, unknown categories,
image modes, non-ASCII names when loading) are not repeated here."""

import itertools
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import train_grqo
import train_sft
from conftest import run_args
from data import Batch, Target, build_dataset, collate
from model import PRESETS, build_model

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 4     # 8 train images, batches of 2


def assert_same_weights(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def copy_dataset(shapes, tmp_path, split: str, edit) -> Path:
    """A copy of the shapes folder with instances_<split>.json changed by edit(coco dict)."""
    folder = tmp_path / "dataset"
    shutil.copytree(shapes, folder)
    annotation_file = folder / "annotations" / f"instances_{split}.json"
    coco = json.loads(annotation_file.read_text(encoding="utf-8"))
    edit(coco)
    annotation_file.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    return folder


def subprocess_environment() -> dict:
    """The environment of a training subprocess: as many threads as this process uses, so
    that its arithmetic matches an in-process run bit for bit."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run_command(command: list[str], timeout: float = 300,
                **environment: str) -> subprocess.CompletedProcess:
    """Run a command from the repository root in a process group of its own; past the
    timeout, kill the whole group (torchrun's workers too) and fail."""
    process = subprocess.Popen(command, cwd=ROOT, env={**subprocess_environment(), **environment},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"still running after {timeout} s: {command}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# ----------------------------------------------------------------------------- faults

def test_save_every_resumes_mid_epoch_exactly(shapes, tmp_path, monkeypatch):
    """--save-every 1 writes last.pt after every step; resuming from a mid-epoch one skips
    the batches already seen and ends equal to an uninterrupted run."""
    whole = train_sft.main(run_args(shapes, tmp_path / "whole", "--max-steps", "6"))
    copies = tmp_path / "copies"
    copies.mkdir()
    save_checkpoint = train_sft.save_checkpoint

    def save_and_keep_a_copy(path, state):
        save_checkpoint(path, state)
        shutil.copy(path, copies / f"step{state['step']}.pt")

    monkeypatch.setattr(train_sft, "save_checkpoint", save_and_keep_a_copy)
    saving = train_sft.main(run_args(shapes, tmp_path / "every", "--max-steps", "6",
                                     "--save-every", "1"))
    monkeypatch.undo()
    assert_same_weights(whole.state_dict(), saving.state_dict())
    positions = {}
    for path in copies.iterdir():
        checkpoint = torch.load(path, weights_only=True)
        positions[checkpoint["step"]] = (checkpoint["epoch"], checkpoint["batch_in_epoch"])
    assert positions == {1: (0, 1), 2: (0, 2), 3: (0, 3), 4: (1, 0), 5: (1, 1), 6: (1, 2)}
    for step in (1, 5):
        out = tmp_path / f"from_step{step}"
        resumed = train_sft.main(run_args(shapes, out, "--max-steps", "6", "--log-every", "1",
                                          "--resume", str(copies / f"step{step}.pt")))
        assert_same_weights(whole.state_dict(), resumed.state_dict())
        assert logged_steps(out) == list(range(step + 1, 7))   # the seen batches were skipped


def checkpoint_step(path: Path) -> int | None:
    """The step of last.pt, None before the first one. Checkpoints are renamed into place,
    so a reader never sees a half-written one (that would raise here)."""
    try:
        return torch.load(path, weights_only=True)["step"]
    except FileNotFoundError:
        return None


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(shapes, tmp_path):
    total_steps = 4 * STEPS_PER_EPOCH
    arguments = run_args(shapes, tmp_path / "killed", "--epochs", "4", "--save-every", "1",
                         "--log-every", "1")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "train_sft.py", *arguments], cwd=ROOT,
                                   env=subprocess_environment(), stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while (checkpoint_step(tmp_path / "killed" / "last.pt") or 0) < 2:
                assert process.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint at step 2 within 300 s"
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    killed_at = checkpoint_step(tmp_path / "killed" / "last.pt")
    assert 2 <= killed_at < total_steps
    resumed = train_sft.main(arguments + ["--resume", str(tmp_path / "killed" / "last.pt")])
    whole = train_sft.main(run_args(shapes, tmp_path / "whole", "--epochs", "4"))
    assert_same_weights(whole.state_dict(), resumed.state_dict())
    final = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    assert final["step"] == total_steps
    assert_same_weights(whole.state_dict(), final["model"])
    assert logged_steps(tmp_path / "killed") == list(range(1, total_steps + 1))


def test_resume_keeps_one_complete_log_line_per_step(shapes, tmp_path):
    """A run killed after its checkpoint at step 3 had logged steps 4 and 5, the second
    half-written; the resumed run logs them again, once, on lines of their own."""
    out = tmp_path / "run"
    train_sft.main(run_args(shapes, out, "--max-steps", "3", "--log-every", "1"))
    with open(out / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": 4, "epoch": 0}) + "\n" + '{"step": 5, "ep')
    train_sft.main(run_args(shapes, out, "--max-steps", "5", "--log-every", "1",
                            "--resume", str(out / "last.pt")))
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert all("sft" in line for line in lines)


class SimulatedCrash(Exception):
    """The process dying in the middle of save_checkpoint."""


@pytest.mark.parametrize("fault", ["write", "rename"])
def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(shapes, tmp_path, monkeypatch,
                                                                 fault):
    """The third checkpoint write dies half-way (fault "write") or just before the rename;
    last.pt still holds step 2 and loads, and the leftover .tmp does not stop a resume."""
    whole = train_sft.main(run_args(shapes, tmp_path / "whole", "--max-steps", "4"))
    saves = 0

    def write_half_then_crash(state, handle, *args, **kwargs):
        nonlocal saves
        saves += 1
        if saves < 3:
            return torch_save(state, handle, *args, **kwargs)
        handle.write(b"PK\x03\x04 the first bytes of a zip archive")
        raise SimulatedCrash

    def crash_before_renaming(source, destination):
        nonlocal saves
        saves += 1
        if saves < 3:
            return replace(source, destination)
        raise SimulatedCrash

    torch_save, replace = torch.save, os.replace
    if fault == "write":
        monkeypatch.setattr(torch, "save", write_half_then_crash)
    else:
        monkeypatch.setattr(os, "replace", crash_before_renaming)
    out = tmp_path / "parts"
    with pytest.raises(SimulatedCrash):
        train_sft.main(run_args(shapes, out, "--max-steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert (out / "last.pt.tmp").is_file()
    resumed = train_sft.main(run_args(shapes, out, "--max-steps", "4",
                                      "--resume", str(out / "last.pt")))
    assert_same_weights(whole.state_dict(), resumed.state_dict())
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    assert not (out / "last.pt.tmp").exists()


class PoisonedObjective(train_sft.SFTObjective):
    """SFT whose `poisoned_call`-th call (counting from 1) adds `value` (NaN or Inf) to the
    decoder term; the terms of that call are kept in `poisoned_terms`."""

    def __init__(self, poisoned_call: int, value: float):
        super().__init__()
        self.poisoned_call, self.value, self.calls = poisoned_call, value, 0
        self.poisoned_terms = None

    def __call__(self, model, batch, instructions, targets, num_boxes, generator=None):
        loss, terms = super().__call__(model, batch, instructions, targets, num_boxes, generator)
        self.calls += 1
        if self.calls == self.poisoned_call:
            terms = {**terms, "decoder": terms["decoder"] + self.value}
            terms["sft"] = sum(value for name, value in terms.items() if name != "sft")
            self.poisoned_terms, loss = terms, terms["sft"]
        return loss, terms


def parse(argv: list[str]):
    return train_sft.finish_args(train_sft.make_parser().parse_args(argv), "sft")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_naming_step_and_terms(shapes, tmp_path, value):
    out = tmp_path / "run"
    args = parse(run_args(shapes, out, "--save-every", "1"))
    objective = PoisonedObjective(poisoned_call=3, value=value)
    with pytest.raises(FloatingPointError) as error:
        train_sft.train(args, objective)
    message = str(error.value)
    assert message.startswith(f"non-finite loss at step 3: decoder={value}, ")
    for name, term in objective.poisoned_terms.items():
        assert f"{name}={term.item():.4g}" in message
    assert f"{out / 'last.pt'} is left as it was" in message
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2


def test_skip_nonfinite_skips_and_counts_the_step(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    args = parse(run_args(shapes, out, "--epochs", "1", "--log-every", "1", "--skip-nonfinite"))
    model = train_sft.train(args, PoisonedObjective(poisoned_call=2, value=float("nan")))
    printed = capsys.readouterr().out
    assert "non-finite loss at step 2: decoder=nan" in printed and ": step skipped" in printed
    assert "epoch 0: 1 steps skipped for a non-finite loss" in printed
    assert torch.load(out / "last.pt", weights_only=True)["step"] == STEPS_PER_EPOCH - 1
    assert logged_steps(out) == [1, 2, 3]
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values())


def test_batches_without_boxes_are_skipped_and_counted(shapes, tmp_path, capsys):
    """Images without annotations stay in the data (negatives); a batch where no image has
    a box gives no prompt, so the step is skipped (all processes together under DDP)."""
    def keep_two_annotated_images(coco):
        coco["annotations"] = [annotation for annotation in coco["annotations"]
                               if annotation["image_id"] <= 2]

    folder = copy_dataset(shapes, tmp_path, "train", keep_two_annotated_images)
    train_sft.main(run_args(folder, tmp_path / "run", "--epochs", "1", "--log-every", "1"))
    skipped = STEPS_PER_EPOCH - len(logged_steps(tmp_path / "run"))
    assert skipped >= 2       # the two annotated images fill at most two of the four batches
    assert (f"epoch 0: {skipped} batches skipped for having no box (under DDP: in any one "
            f"process)") in capsys.readouterr().out


def test_ddp_skips_a_batch_without_boxes_in_every_process_together(shapes, tmp_path):
    """Two processes with one image each per step: the image without annotations meets an
    annotated one in the other process once per epoch, and both skip that step (if only one
    did, the other would wait forever in DDP's gradient all-reduce)."""
    def unannotate_last_image(coco):
        last = max(image["id"] for image in coco["images"])
        coco["annotations"] = [annotation for annotation in coco["annotations"]
                               if annotation["image_id"] != last]

    folder = copy_dataset(shapes, tmp_path, "train", unannotate_last_image)
    result = run_command(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "train_sft.py", *run_args(folder, tmp_path / "run", "--batch-size", "1", "--device",
                                   "cpu")])
    assert result.returncode == 0, result.stderr[-3000:]
    for epoch in (0, 1):
        assert (f"epoch {epoch}: 1 batches skipped for having no box (under DDP: in any one "
                f"process)") in result.stdout
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2 * 3


def test_visual_instructions_depend_only_on_seed_epoch_batch_and_rank():
    """DDP: every process samples its own prompts from a generator seeded with (seed, epoch,
    batch index, rank); the same values give the same samples, in any process."""
    labels = [[1, 1, 1, 3, 3], [3, 1, 5, 5, 5, 1]]
    targets = [Target(torch.rand(len(image), 4), torch.tensor(image), image_id,
                      torch.tensor([32, 32]), torch.tensor([32, 32]))
               for image_id, image in enumerate(labels)]
    batch = Batch(torch.zeros(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.bool), targets)
    names = [f"class {index}" for index in range(6)]

    def selected(rank: int, seed: int = 0, epoch: int = 1, batch_index: int = 2) -> list[int]:
        generator = train_sft.step_generator(seed, epoch, batch_index, rank, 1)
        instructions, _ = data.sample_prompts(batch, names, generator)
        assert instructions.class_names == ["class 1", "class 3", "class 5"]
        return instructions.selected.tolist()

    per_step = {tuple(selected(0, epoch=e, batch_index=b)) for e in range(3) for b in range(3)}
    assert len(per_step) > 1                      # epoch and batch change the sample too
    per_rank = [selected(rank) for rank in range(4)]
    assert per_rank == [selected(rank) for rank in range(4)]
    assert len({tuple(sample) for sample in per_rank}) > 1
    assert [selected(rank, seed=1) for rank in range(4)] != per_rank
    other_process = run_command(     # the same seeds in a process with another hash seed
        [sys.executable, "-c",
         "import train_sft; print([train_sft.mix_seed(0, 1, 2, rank, 1) for rank in range(4)])"],
        PYTHONHASHSEED="12345")
    assert other_process.returncode == 0, other_process.stderr[-2000:]
    assert other_process.stdout.strip() == str([train_sft.mix_seed(0, 1, 2, rank, 1)
                                                for rank in range(4)])


def test_resident_memory_does_not_grow_step_after_step(shapes):
    """60 GRQO steps of the training loop on real batches: after the first 20, resident
    memory grows by less than 0.5 MB a step (a leak of 1 MB a step, say a loss kept for
    logging with its graph, measures about 1.07 here; none measures about 0)."""
    torch.manual_seed(0)
    model = build_model("tiny", kernel="torch").train()
    dataset = build_dataset(str(shapes), "train", train=False, image_size=128, max_size=171)
    batches = [collate([dataset[index], dataset[index + 1]]) for index in range(0, 8, 2)]
    objective = train_grqo.GRQOObjective(train_grqo.parse_grqo_args(["--sft-epochs", "0"]))
    objective.start_epoch(model, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    resident = []

    def measure(step, batch_index, terms, seconds):
        resident.append(train_sft.resident_memory_mb())
        return False

    train_sft.train_one_epoch(
        model, objective, optimizer, scheduler, enumerate(itertools.islice(
            itertools.cycle(batches), 60)), torch.device("cpu"), 0, seed=0, rank=0,
        prompt_sampler=train_sft.PromptSampler("visual", dataset.class_names,
                                               dataset.base_classes,
                                               model.text_encoder.name_tokens),
        clip_grad=0.1, after_step=measure)
    assert len(resident) == 60 and resident[0] > 0
    slope = np.polyfit(np.arange(20, 60), resident[20:], 1)[0]
    assert slope < 0.5, f"{slope:.2f} MB a step: {[round(value) for value in resident]}"


# ----------------------------------------------------------------------------- bad input

def test_missing_data_folder_exits_nonzero_with_one_line(tmp_path):
    absent = tmp_path / "absent"
    result = run_command([sys.executable, "train_sft.py", "--data", str(absent),
                          "--out", str(tmp_path / "run"), "--no-eval"])
    assert result.returncode == 1
    assert result.stderr.strip() == (f"cannot train on --data {absent}: data folder {absent} "
                                     f"not found")
    assert not (tmp_path / "run").exists()


def write_one_image_split(folder: Path, picture: Image.Image, bbox: list[float]) -> Path:
    """A COCO-format "val" split holding one image with one box [x, y, w, h]."""
    (folder / "val").mkdir(parents=True)
    (folder / "annotations").mkdir()
    picture.save(folder / "val" / "1.png")
    coco = {"images": [{"id": 1, "file_name": "1.png", "width": picture.width,
                        "height": picture.height}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": bbox,
                             "iscrowd": 0, "area": bbox[2] * bbox[3]}],
            "categories": [{"id": 1, "name": "thing"}]}
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return folder


@pytest.mark.parametrize("side", [6000, 13400])
def test_very_large_images_load_and_are_resized(tmp_path, side):
    """36 and 180 megapixels: the second is over the 179 at which PIL's decompression-bomb
    guard raises by default (data.py lifts it)."""
    folder = write_one_image_split(tmp_path, Image.new("L", (side, side), 90),
                                   [side / 10, side / 5, side / 10, side / 5])
    dataset = build_dataset(str(folder), "val", train=False, image_size=128, max_size=171)
    image, target = dataset[0]
    assert image.shape == (3, 128, 128)
    assert target.orig_size.tolist() == [side, side]
    assert torch.allclose(target.boxes, torch.tensor([[0.15, 0.3, 0.1, 0.2]]))


def test_images_over_the_pixel_limit_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)
    folder = write_one_image_split(tmp_path, Image.new("RGB", (60, 40)), [1, 1, 5, 5])
    strict = data.CocoDetection(folder, "val")
    with pytest.raises(data.DataError) as error:
        strict[0]
    assert str(error.value) == (f"image file {folder / 'val' / '1.png'} is 60x40 pixels, more "
                                f"than data.MAX_IMAGE_PIXELS = 1,000: resize it, or raise the "
                                f"limit if the memory allows")


def test_non_ascii_class_names_train_evaluate_and_save(shapes, tmp_path):
    """Class names in several scripts go through training, the final evaluation, the text
    prompts (the byte-level text encoder), config.json and metrics.json."""
    folder = tmp_path / "dataset"
    shutil.copytree(shapes, folder)
    renamed = {}
    for path in (folder / "annotations").glob("instances_*.json"):
        coco = json.loads(path.read_text(encoding="utf-8"))
        for category in coco["categories"]:
            renamed[category["name"]] = f"{category['name']} · 形 ü"
            category["name"] = renamed[category["name"]]
        path.write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    split_file = folder / "annotations" / "split.json"
    split = json.loads(split_file.read_text(encoding="utf-8"))
    split = {key: [renamed[name] for name in names] for key, names in split.items()}
    split_file.write_text(json.dumps(split, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "run"
    train_sft.main(["--data", str(folder), "--out", str(out), "--batch-size", "2",
                    "--max-steps", "2"])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert sorted(metrics["per_class"]) == sorted(renamed.values())
    assert json.loads((out / "config.json").read_text())["args"]["data"] == str(folder)
    text = evaluate.main(["--ckpt", str(out / "last.pt"), "--prompt", "text",
                          "--out", str(tmp_path / "text.json")])
    assert sorted(text["per_class"]) == sorted(renamed.values())


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A run folder of two steps (its last.pt is at step 2)."""
    out = tmp_path_factory.mktemp("trained")
    train_sft.main(run_args(shapes, out, "--max-steps", "2"))
    return out


def test_checkpoint_of_another_preset_names_the_mismatch(shapes, trained, tmp_path):
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    checkpoint.update(config=asdict(PRESETS["swin_t"]), args={**checkpoint["args"],
                                                              "model": "swin_t"})
    torch.save(checkpoint, tmp_path / "swin_t.pt")
    for option in ("--resume", "--init"):
        with pytest.raises(SystemExit) as error:
            train_sft.main(run_args(shapes, tmp_path / "run", option,
                                    str(tmp_path / "swin_t.pt"), "--model", "tiny"))
        message = str(error.value)
        assert message.startswith(f"{tmp_path / 'swin_t.pt'} was written with other model "
                                  f"settings (backbone: 'swin' there, 'tiny' here, "
                                  f"hidden_dim: 256 there, ")
        assert message.endswith("its run used --model swin_t, this one --model tiny")


def test_checkpoint_of_a_pretrained_backbone_run_needs_no_download(shapes, trained, tmp_path):
    """A --pretrained-backbone run's checkpoint holds every weight: evaluation and --init
    rebuild the detector without asking for ImageNet weights (which fails offline; the tiny
    backbone has none at all, so asking for them fails here too)."""
    from checkpoints import model_from_checkpoint
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    checkpoint["config"]["pretrained_backbone"] = True
    checkpoint["args"]["pretrained_backbone"] = True
    torch.save(checkpoint, tmp_path / "pretrained.pt")
    model = model_from_checkpoint(checkpoint)
    assert not model.config.pretrained_backbone
    metrics = evaluate.main(["--ckpt", str(tmp_path / "pretrained.pt"), "--data", str(shapes),
                             "--prompt", "text"])
    assert metrics["num_images"] == 4
    resumed = train_sft.main(run_args(shapes, tmp_path / "run", "--max-steps", "1",
                                      "--init", str(tmp_path / "pretrained.pt")))
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 1
    assert resumed.config == model.config


def test_a_checkpoint_of_an_earlier_format_is_refused_in_one_line(shapes, trained, tmp_path):
    """Written before checkpoints recorded their format (the model changed since)."""
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    assert checkpoint.pop("format") == 3
    torch.save(checkpoint, tmp_path / "old.pt")
    expected = (f"{tmp_path / 'old.pt'} is a checkpoint of format 1, written by an earlier "
                f"version of the detector; this version reads format 3: train again, or use "
                f"the version that wrote it")
    for command in (lambda: train_sft.main(run_args(shapes, tmp_path / "run", "--init",
                                                    str(tmp_path / "old.pt"))),
                    lambda: evaluate.main(["--ckpt", str(tmp_path / "old.pt")])):
        with pytest.raises(SystemExit) as error:
            command()
        assert str(error.value) == expected


def test_file_that_is_not_a_training_checkpoint(shapes, trained, tmp_path):
    """A bare state_dict (what torch.save(model.state_dict()) writes) is refused by name."""
    state_dict = torch.load(trained / "last.pt", weights_only=True)["model"]
    torch.save(state_dict, tmp_path / "weights.pt")
    with pytest.raises(SystemExit) as error:
        train_sft.main(run_args(shapes, tmp_path / "run", "--resume",
                                str(tmp_path / "weights.pt")))
    assert str(error.value) == (f"{tmp_path / 'weights.pt'} is not a checkpoint written by "
                                f"train_sft.py or train_grqo.py (it needs 'model', 'config' "
                                f"and 'args')")


def test_truncated_checkpoint_is_refused_by_training_and_evaluation(shapes, trained, tmp_path):
    whole = (trained / "last.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    expected = re.escape(f"cannot load checkpoint {truncated}: it is truncated, corrupt or "
                         f"holds more than tensors and plain values (")
    with pytest.raises(SystemExit, match="^" + expected):
        train_sft.main(run_args(shapes, tmp_path / "run", "--resume", str(truncated)))
    with pytest.raises(SystemExit, match="^" + expected):
        evaluate.main(["--ckpt", str(truncated)])


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_tampered_checkpoint_never_runs_its_pickled_code(shapes, trained, tmp_path):
    checkpoint = torch.load(trained / "last.pt", weights_only=True)
    tampered, marker = tmp_path / "tampered.pt", tmp_path / "code_ran"
    torch.save({**checkpoint, "objective": Payload(marker)}, tampered)
    expected = re.escape(f"cannot load checkpoint {tampered}: it is truncated, corrupt or holds "
                         f"more than tensors and plain values (UnpicklingError: "
                         f"WeightsUnpickler error: Unsupported global: GLOBAL exec was not an "
                         f"allowed global by default)")
    with pytest.raises(SystemExit, match="^" + expected):
        train_sft.main(run_args(shapes, tmp_path / "run", "--resume", str(tampered)))
    with pytest.raises(SystemExit, match="^" + expected):
        evaluate.main(["--ckpt", str(tampered)])
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tampered, weights_only=True)
    torch.load(tampered, weights_only=False)         # the payload is real: unsafe loading
    assert marker.exists()                           # runs it


def test_resume_of_a_missing_file(shapes, tmp_path):
    missing = tmp_path / "nothing" / "last.pt"
    with pytest.raises(SystemExit, match=f"^{re.escape(f'checkpoint not found: {missing}')}$"):
        train_sft.main(run_args(shapes, tmp_path / "run", "--resume", str(missing)))
    assert not (tmp_path / "run").exists()


def remove_all_images(coco):
    coco["images"], coco["annotations"] = [], []


def test_split_with_zero_images_in_training(shapes, tmp_path):
    folder = copy_dataset(shapes, tmp_path, "train", remove_all_images)
    annotation_file = folder / "annotations" / "instances_train.json"
    with pytest.raises(SystemExit) as error:
        train_sft.main(run_args(folder, tmp_path / "run"))
    assert str(error.value) == (f"cannot train on --data {folder}: {annotation_file} lists no "
                                f"images: split 'train' is empty")


def test_split_with_zero_images_in_evaluation(shapes, tmp_path):
    folder = copy_dataset(shapes, tmp_path, "val", remove_all_images)
    model = build_model("tiny", kernel="torch")
    with pytest.raises(data.DataError) as error:
        evaluate.evaluate(model, str(folder), split="val")
    assert str(error.value) == (f"{folder / 'annotations' / 'instances_val.json'} lists no "
                                f"images: split 'val' is empty")


def test_split_smaller_than_one_batch(shapes, tmp_path):
    def keep_one_image(coco):
        coco["images"] = coco["images"][:1]
        coco["annotations"] = [annotation for annotation in coco["annotations"]
                               if annotation["image_id"] == coco["images"][0]["id"]]

    folder = copy_dataset(shapes, tmp_path, "train", keep_one_image)
    with pytest.raises(SystemExit) as error:
        train_sft.main(run_args(folder, tmp_path / "run"))
    assert str(error.value) == ("the train split has 1 images: fewer than one batch of 2 per "
                                "process")


def test_split_without_boxes_in_training(shapes, tmp_path):
    def remove_annotations(coco):
        coco["annotations"] = []

    folder = copy_dataset(shapes, tmp_path, "train", remove_annotations)
    annotation_file = folder / "annotations" / "instances_train.json"
    with pytest.raises(SystemExit) as error:
        train_sft.main(run_args(folder, tmp_path / "run"))
    assert str(error.value) == f"{annotation_file} has no usable boxes to train on"


def test_class_without_exemplar_in_support_is_named_by_evaluation(shapes, tmp_path):
    support_file = shapes / "annotations" / "instances_support.json"
    categories = json.loads(support_file.read_text())["categories"]
    absent = categories[0]

    def remove_one_class(coco):
        coco["annotations"] = [annotation for annotation in coco["annotations"]
                               if annotation["category_id"] != absent["id"]]

    folder = copy_dataset(shapes, tmp_path, "support", remove_one_class)
    model = build_model("tiny", kernel="torch")
    expected = (f"no exemplars in {folder / 'annotations' / 'instances_support.json'} for "
                f"classes: {absent['name']}")
    with pytest.warns(UserWarning) as caught:
        metrics = evaluate.evaluate(model, str(folder), split="val")
    assert expected in [str(warning.message) for warning in caught]
    assert metrics["num_images"] == 4
