"""Training and evaluation end to end (train_sft.py, train_grqo.py, evaluate.py) on a small
shapes dataset written to disk: checkpoints, exact resume, DDP on CPU, the COCOeval oracle,
and GRQO's reference model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train_grqo
import train_sft
from conftest import run_args
from data import build_dataset
from model import Detections, build_model, one_token_per_class

ROOT = Path(__file__).resolve().parents[1]


def assert_same_weights(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_two_steps_write_a_checkpoint_that_evaluate_loads(shapes, tmp_path):
    train_sft.main(run_args(shapes, tmp_path / "run", "--max-steps", "2"))
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 2
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2
    metrics = evaluate.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--split", "val",
                             "--out", str(tmp_path / "metrics.json"),
                             "--vis", str(tmp_path / "vis")])
    for key in ("AP", "AP50", "AP_base", "AP_novel"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_images"] == 4
    assert len(list((tmp_path / "vis").glob("*.png"))) == 4


@pytest.mark.parametrize("stop_at", [4, 3])     # at an epoch boundary; in mid-epoch
def test_resume_equals_an_uninterrupted_run(shapes, tmp_path, stop_at):
    """6 steps in a row against stop_at steps, then --resume to 6 (4 steps per epoch)."""
    whole = train_sft.main(run_args(shapes, tmp_path / "whole", "--max-steps", "6"))
    train_sft.main(run_args(shapes, tmp_path / "parts", "--max-steps", str(stop_at)))
    checkpoint = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch_in_epoch"]) == \
        ((1, 0) if stop_at == 4 else (0, 3))
    resumed = train_sft.main(run_args(shapes, tmp_path / "parts", "--max-steps", "6",
                                      "--resume", str(tmp_path / "parts" / "last.pt")))
    assert_same_weights(whole.state_dict(), resumed.state_dict())


def test_evaluation_oracle_gives_ap_one(shapes):
    """Ground truth fed as predictions through the code that formats predictions."""
    dataset = build_dataset(str(shapes), "val", train=False, image_size=128, max_size=171)
    detections = []
    for image_id in dataset.image_ids:
        annotations = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id]))
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([dataset.category_index[a["category_id"]] for a in annotations])
        detections.append(Detections(boxes, torch.ones(len(labels)), labels))
    results = [result for found, image_id in zip(detections, dataset.image_ids)
               for result in evaluate.coco_results(found, {"image_id": image_id}, "category_id",
                                                   dataset.category_ids)]
    metrics = evaluate.coco_metrics(dataset, results)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP_novel"] == pytest.approx(1.0) and metrics["AP_base"] == pytest.approx(1.0)
    # Without the novel classes' detections: base AP stays 1, novel AP and theirs drop to 0.
    novel = set(dataset.novel_classes)
    novel_ids = {dataset.category_ids[c] for c in novel}
    metrics_base = evaluate.coco_metrics(
        dataset, [r for r in results if r["category_id"] not in novel_ids])
    assert metrics_base["AP_base"] == pytest.approx(1.0) and metrics_base["AP_novel"] == 0.0
    for k, name in enumerate(dataset.class_names):
        if metrics_base["per_class"][name] is not None:
            assert metrics_base["per_class"][name] == pytest.approx(0.0 if k in novel else 1.0)
    # No object in these 128-px pictures is large: COCOeval says -1, we say None and "-".
    assert metrics["APl"] is None and metrics["APs"] == pytest.approx(1.0)
    header, _, values = evaluate.format_table(metrics).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), values.strip("| ").split(" | ")))
    assert cells["APl"].strip() == "-" and cells["AP"].strip() == "100.0"


def test_duplicate_counts_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10], [0, 0, 10, 9.5],
                          [20, 20, 30, 30]], dtype=torch.float)
    found = Detections(boxes, torch.tensor([0.9, 0.8, 0.7, 0.2, 0.5]),
                       torch.tensor([0, 0, 1, 0, 0]))
    # scoring >= 0.3: boxes 0, 1, 2, 4. Box 1 repeats box 0 (IoU 0.9, same prompt); box 2
    # is box 0 for another prompt; box 3 scores too low; box 4 is elsewhere.
    assert evaluate.duplicate_counts(found) == (4, 1)
    assert evaluate.duplicate_counts(found, iou_threshold=0.95) == (4, 0)
    assert evaluate.duplicate_counts(found, score_threshold=0.1) == (5, 2)


def test_chunked_prompts_map_each_chunk_to_its_classes(shapes):
    """More classes than one prompt set holds (5 prompts, chunks of 2): each chunk is run
    on its own (queries are selected per chunk), its labels mapped to the classes of that
    chunk, and the chunks merged. The reference here calls the model directly."""
    from data import collate
    from model import postprocess
    torch.manual_seed(0)
    model = build_model("tiny", kernel="torch").eval()
    dataset = build_dataset(str(shapes), "val", train=False, image_size=128, max_size=171)
    batch = collate([dataset[0], dataset[1]])
    prompts = torch.randn(5, model.config.hidden_dim)
    classes = [3, 1, 4, 0, 2]
    chunked = evaluate.detect(model, batch, prompts, classes, chunk_size=2, top_k=50)
    sizes = torch.stack([t.orig_size for t in batch.targets])
    expected = [[] for _ in range(2)]
    with torch.no_grad():
        for start in (0, 2, 4):
            chunk = prompts[start:start + 2][None].expand(2, -1, -1)
            output = model(batch.images, batch.mask, one_token_per_class(chunk))
            for b, found in enumerate(postprocess(output.logits[-1], output.boxes[-1], sizes, 50)):
                labels = torch.tensor([classes[start + k] for k in found.labels.tolist()])
                expected[b].append(Detections(found.boxes, found.scores, labels))
    for b in range(2):
        merged = evaluate.keep_top(expected[b], 50)
        torch.testing.assert_close(chunked[b].scores, merged.scores)
        torch.testing.assert_close(chunked[b].boxes, merged.boxes)
        assert chunked[b].labels.tolist() == merged.labels.tolist()
        assert len(set(merged.labels.tolist())) > 2     # from more than one chunk of 2
    whole = evaluate.detect(model, batch, prompts, classes, chunk_size=5, top_k=50)
    with torch.no_grad():
        output = model(batch.images, batch.mask,
                       one_token_per_class(prompts[None].expand(2, -1, -1)))
    once = postprocess(output.logits[-1], output.boxes[-1], sizes, 50)
    for b in range(2):
        torch.testing.assert_close(whole[b].scores, once[b].scores)
        assert whole[b].labels.tolist() == [classes[k] for k in once[b].labels.tolist()]


def test_ddp_on_cpu_keeps_identical_weights(shapes, tmp_path):
    # GRQO prompts with text (its steps leave the visual prompt encoder without gradient:
    # DDP must not wait for it).
    grqo = ["--sft-epochs", "1", "--grqo-epochs", "1", "--prompts", "text"]
    for script, extra in (("train_sft", []), ("train_grqo", grqo)):
        out = tmp_path / script
        program = (f"import sys, torch, torch.distributed as dist; sys.path.insert(0, {str(ROOT)!r}); "
                   f"import {script} as s; model = s.main(sys.argv[1:]); "
                   f"torch.save(model.state_dict(), "
                   f"{str(out)!r} + '/rank' + __import__('os').environ['RANK'] + '.pt')")
        (tmp_path / f"{script}_entry.py").write_text(program)
        args = ["--data", str(shapes), "--out", str(out), "--batch-size", "2", "--max-steps", "3",
                "--no-eval", "--device", "cpu"] + (["--epochs", "2"] if script == "train_sft" else extra)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(29500 + (os.getpid() % 1000)),
                                 str(tmp_path / f"{script}_entry.py"), *args],
                                capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        rank0 = torch.load(out / "rank0.pt", weights_only=True)
        rank1 = torch.load(out / "rank1.pt", weights_only=True)
        assert_same_weights(rank0, rank1)
        assert torch.load(out / "last.pt", weights_only=True)["step"] == 3


def test_grqo_reference_fixed_within_an_epoch_refreshed_at_the_next(shapes):
    args = train_grqo.parse_grqo_args(["--sft-epochs", "1"])
    objective = train_grqo.GRQOObjective(args)
    model = build_model("tiny", kernel="torch")
    objective.start_epoch(model, 0)                      # an SFT epoch: no reference yet
    assert objective.reference is None
    objective.start_epoch(model, 1)
    reference = objective.reference
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)                          # the policy moves during the epoch
    assert_same_weights(frozen, reference.state_dict())
    objective.start_epoch(model, 2)                       # the next epoch: a fresh copy
    assert_same_weights(objective.reference.state_dict(), model.state_dict())


def test_an_anchored_reference_is_held_from_the_first_grqo_epoch_and_through_a_resume():
    objective = train_grqo.GRQOObjective(train_grqo.parse_grqo_args(
        ["--sft-epochs", "1", "--reference", "anchored"]))
    model = build_model("tiny", kernel="torch")
    objective.start_epoch(model, 0)
    assert objective.reference is None                   # SFT first
    objective.start_epoch(model, 1)
    anchor = {k: v.clone() for k, v in objective.reference.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    objective.start_epoch(model, 2)
    assert_same_weights(anchor, objective.reference.state_dict())
    resumed = train_grqo.GRQOObjective(train_grqo.parse_grqo_args(["--reference", "anchored"]))
    resumed.load_state_dict(objective.state_dict(), model)
    resumed.start_epoch(model, 3)
    assert_same_weights(anchor, resumed.reference.state_dict())


def grqo_step(shapes, *argv: str):
    """A tiny model in training, a batch of two train images with visual instructions, and a
    GRQO objective (train_grqo.py --sft-epochs 0 and `argv`) at its first epoch."""
    from data import collate, sample_prompts
    torch.manual_seed(0)
    model = build_model("tiny", kernel="torch").train()
    dataset = build_dataset(str(shapes), "train", train=False, image_size=128, max_size=171)
    batch = collate([dataset[0], dataset[1]])
    instructions, targets = sample_prompts(batch, dataset.class_names,
                                           torch.Generator().manual_seed(0))
    objective = train_grqo.GRQOObjective(
        train_grqo.parse_grqo_args(["--sft-epochs", "0", *argv]))
    objective.start_epoch(model, 0)
    return model, batch, instructions, targets, objective


def test_grqo_objective_adds_its_term_with_the_reward_cost(shapes, monkeypatch):
    """The GRQO loss reaches the optimiser (L_all = L_SFT + L_contra + L_GRQO) and its
    rewards come from the --reward-cost matcher, one cost per decoder layer (in one call)."""
    from losses import HungarianMatcher
    model, batch, instructions, targets, objective = grqo_step(
        shapes, "--reward-cost", "binary_focal", "--alpha", "1")
    calls = []
    reward_cost = HungarianMatcher.pairwise_cost

    def counted(matcher, logits, *args, **kwargs):
        calls.append((matcher.class_cost, logits.shape[:-3]))
        return reward_cost(matcher, logits, *args, **kwargs)

    monkeypatch.setattr(HungarianMatcher, "pairwise_cost", counted)
    loss, terms = objective(model, batch, instructions, targets, 4.0)
    layers = model.config.num_decoder_layers
    assert calls == [("focal", (layers + 1,)), ("binary_focal", (layers,))]
    assert terms["grqo"].abs() > 0
    torch.testing.assert_close(loss, terms["sft"] + terms["grqo"])


def test_match_and_reward_costs_are_chosen_separately():
    def costs(*argv):
        objective = train_grqo.GRQOObjective(train_grqo.parse_grqo_args(list(argv)))
        return objective.criterion.matcher.class_cost, objective.reward_matcher.class_cost
    assert costs() == ("focal", "focal")                              # unchanged by default
    assert costs("--match-cost", "binary_focal") == ("binary_focal", "binary_focal")
    assert costs("--reward-cost", "binary_focal") == ("focal", "binary_focal")
    assert costs("--match-cost", "binary_focal", "--reward-cost", "focal") == \
        ("binary_focal", "focal")
    sft_args = train_sft.make_parser().parse_args(["--match-cost", "binary_focal"])
    sft = train_sft.SFTObjective(sft_args.match_cost)
    assert sft.criterion.matcher.class_cost == "binary_focal"


def test_release_contrastive_weight_and_dn_label_noise_reach_the_loss_and_the_model(
        monkeypatch):
    argv = ["--contrastive-weight", "100", "--dn-label-noise", "0.5"]
    for script in (train_sft, train_grqo):             # what each main() hands to train()
        monkeypatch.setattr(script, "train", lambda args, objective: objective)
        assert script.main(argv).criterion.contrastive_weight == 100
    sft_args = train_sft.finish_args(train_sft.make_parser().parse_args(argv), "sft")
    assert train_sft.build_detector(sft_args).config.dn_label_noise == 0.5
    defaults = train_sft.finish_args(train_sft.make_parser().parse_args([]), "sft")
    assert train_sft.build_detector(defaults).config.dn_label_noise == 0.25     # the preset's


@pytest.mark.parametrize("argv", [["--dn-label-noise", "1.5"], ["--mute-fraction", "-0.1"]])
def test_a_share_outside_zero_to_one_is_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit):
        train_grqo.make_grqo_parser().parse_args(argv)
    assert f"{argv[0]}: {argv[1]} is not between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--match-cost", "binary_focal",
                                         "--grqo-form", "advantage_pull"]])
def test_a_few_grqo_steps_have_finite_losses(shapes, tmp_path, extra):
    train_grqo.main(["--data", str(shapes), "--out", str(tmp_path / "grqo"), "--batch-size", "2",
                     "--sft-epochs", "0", "--grqo-epochs", "1", "--max-steps", "3",
                     "--log-every", "1", "--no-eval", *extra])
    lines = [json.loads(line) for line in (tmp_path / "grqo" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        for key in ("sft", "grqo", "grqo_kl", "grqo_reward"):
            assert key in line and line[key] == line[key] and abs(line[key]) < 1e6
    assert lines[0]["grqo_kl"] == pytest.approx(0.0, abs=1e-6)   # reference = policy at step 1


def test_the_grqo_term_acts_on_the_update(shapes, tmp_path):
    """From the same weights, batches and noise, two GRQO steps end elsewhere than two SFT
    steps, and only through the GRQO term: with alpha = beta = 0 they end on SFT's weights,
    bit for bit."""
    common = ["--data", str(shapes), "--batch-size", "2", "--max-steps", "2", "--no-eval",
              "--seed", "3", "--log-every", "1"]
    sft = train_sft.main([*common, "--out", str(tmp_path / "sft"), "--epochs", "1"])

    def grqo(name, *extra):
        return train_grqo.main([*common, "--out", str(tmp_path / name), "--sft-epochs", "0",
                                "--grqo-epochs", "1", *extra])

    silent = grqo("silent", "--alpha", "0", "--beta", "0")
    assert_same_weights(sft.state_dict(), silent.state_dict())
    acting = grqo("acting")
    lines = [json.loads(line) for line in (tmp_path / "acting" / "log.jsonl").read_text().splitlines()]
    assert all(line["grqo_policy_term"] != 0 for line in lines)   # (their sum may round to 0)
    assert lines[1]["grqo_kl"] > 0                # the policy has moved from its reference
    moved = [name for name, value in acting.state_dict().items()
             if not torch.equal(value, sft.state_dict()[name])]
    assert len(moved) > 0.5 * len(sft.state_dict())


def test_sft_epochs_under_init_default_to_zero_and_an_explicit_value_is_kept():
    assert train_grqo.parse_grqo_args([]).sft_epochs == 1
    assert train_grqo.parse_grqo_args([]).epochs == 12
    assert train_grqo.parse_grqo_args(["--init", "p.pt"]).sft_epochs == 0
    assert train_grqo.parse_grqo_args(["--init", "p.pt"]).grqo_epochs == 12
    resumed = train_grqo.parse_grqo_args(["--init", "p.pt", "--sft-epochs", "1",
                                          "--grqo-epochs", "5"])
    assert (resumed.sft_epochs, resumed.grqo_epochs, resumed.epochs) == (1, 5, 6)
    assert train_grqo.parse_grqo_args([]).reward_cost == "focal"
    assert train_grqo.parse_grqo_args(["--match-cost", "binary_focal"]).reward_cost == \
        "binary_focal"


@pytest.mark.parametrize("script, mode", [(train_sft, "text"), (train_grqo, "text"),
                                          (train_grqo, "both")])
def test_training_with_text_prompts_learns_through_the_text_encoder(shapes, tmp_path, script,
                                                                    mode):
    """--prompts text: class names are the prompts (no exemplar, so no contrastive term); the
    text encoder is trained, the visual prompt encoder is not; GRQO's reference scores the
    same names. "both" draws visual or text per step."""
    schedule = ["--epochs", "1"] if script is train_sft else ["--sft-epochs", "0",
                                                               "--grqo-epochs", "1"]
    torch.manual_seed(3)                 # the run's initial weights (set_up seeds the same)
    start = build_model("tiny", kernel="torch").state_dict()
    trained = script.main(["--data", str(shapes), "--out", str(tmp_path / "run"),
                           "--batch-size", "2", "--max-steps", "4", "--no-eval", "--seed", "3",
                           "--log-every", "1", "--prompts", mode, *schedule])
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(math.isfinite(line["sft"]) for line in lines)
    with_contrast = sum("contrastive" in line for line in lines)
    moved = {name.split(".")[0] for name, value in trained.state_dict().items()
             if not torch.equal(value, start[name])}
    assert "text_encoder" in moved
    with_outside = sum("outside_tokens" in line for line in lines)   # a caption's [CLS], ".",
    if mode == "text":                                               # [SEP] as negatives
        assert with_contrast == 0 and "prompt_encoder" not in moved and with_outside == 4
    else:
        assert 0 < with_contrast < 4 and "prompt_encoder" in moved
        assert with_outside == 4 - with_contrast
    if script is train_grqo:       # the reference scores the same prompts: no KL at step 1
        assert lines[0]["grqo_kl"] == pytest.approx(0.0, abs=1e-6)


def test_a_caption_over_budget_mid_training_stops_in_one_line(shapes, tmp_path, monkeypatch):
    """A batch whose classes overflow the caption is refused in one line that says what to
    change and where the last checkpoint is, not in a traceback."""
    argv = ["--data", str(shapes), "--out", str(tmp_path / "run"), "--batch-size", "2",
            "--no-eval", "--prompts", "text", "--epochs", "1"]
    train_sft.main([*argv, "--max-steps", "1"])
    monkeypatch.setattr(train_sft, "MAX_TEXT_TOKENS", 3)      # no class name fits any more
    with pytest.raises(SystemExit, match=r"after step 1: .* smaller --batch-size; .*last.pt "
                                         r"holds the last checkpoint"):
        train_sft.main([*argv, "--max-steps", "2", "--resume", str(tmp_path / "run" / "last.pt")])


def test_an_unreadable_split_in_a_loader_worker_stops_in_one_line(shapes, tmp_path):
    """A DataError raised in a DataLoader worker arrives with the worker's traceback in its
    message; training still ends in one line that says why."""
    import shutil

    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    for image in (data / "train").iterdir():
        image.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as stopped, pytest.warns(UserWarning, match="replaced"):
        train_sft.main(run_args(data, tmp_path / "run", "--workers", "1", "--max-steps", "1"))
    message = str(stopped.value)
    assert message.startswith("training stopped after step 0: no image listed in ")
    assert "\n" not in message and "Traceback" not in message


def test_freeze_keeps_the_backbone_and_the_text_encoder_as_they_start(shapes, tmp_path):
    """--freeze backbone --freeze text: those parameters leave training unchanged (and hold
    no optimiser state); the rest moves."""
    start = train_sft.main(run_args(shapes, tmp_path / "start", "--max-steps", "1"))
    tuned = train_sft.main(run_args(shapes, tmp_path / "tuned", "--max-steps", "2",
                                    "--init", str(tmp_path / "start" / "last.pt"),
                                    "--freeze", "backbone", "--freeze", "text"))
    before, after = start.state_dict(), tuned.state_dict()
    frozen = [name for name in before if name.startswith(("backbone.body.", "text_encoder."))]
    assert frozen and all(torch.equal(before[name], after[name]) for name in frozen)
    assert not torch.equal(before["decoder.box_head.layers.0.weight"],
                           after["decoder.box_head.layers.0.weight"])
    optimizer = torch.load(tmp_path / "tuned" / "last.pt", weights_only=True)["optimizer"]
    trainable = sum(p.requires_grad for p in tuned.parameters())
    assert len(optimizer["state"]) == trainable < len(list(tuned.parameters()))
    assert not tuned.backbone.body.training and not tuned.text_encoder.training
    assert tuned.decoder.training


@pytest.mark.parametrize("form", train_grqo.FORMS)
def test_grqo_shares_the_matching_costs_without_changing_its_gradients(shapes, form):
    """With --reward-cost equal to --match-cost (the default) the costs are computed once,
    with gradient, for the matching and the rewards; the gradients equal those of the costs
    computed apart (the matching's without gradient, the rewards' per decoder layer), in
    every --grqo-form."""
    model, batch, instructions, targets, objective = grqo_step(
        shapes, "--grqo-form", form, "--alpha", "1")

    def gradients(loss: torch.Tensor) -> dict:
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()
                if p.grad is not None}

    shared, _ = objective(model, batch, instructions, targets, 4.0,
                          torch.Generator().manual_seed(1))
    shared = gradients(shared)
    output = model(batch.images, batch.mask, instructions, dn_targets=targets,
                   generator=torch.Generator().manual_seed(1))
    sft = objective.criterion(output, targets, 4.0)["sft"]
    costs, gt_mask = objective.reward_matcher.layer_costs(output, targets)
    with torch.no_grad():
        reference = objective.reference.selected_objectness(
            batch.images, batch.mask, instructions, output.selection.indices)
    grqo, _ = train_grqo.grqo_loss(costs, output.selection.objectness_logits, reference,
                                   gt_mask=gt_mask, **objective.settings)
    apart = gradients(sft + grqo)
    assert shared.keys() == apart.keys()
    for name in shared:
        torch.testing.assert_close(shared[name], apart[name], rtol=1e-4, atol=1e-7, msg=name)


def test_a_checkpoint_of_the_unfused_optimiser_resumes_fused(shapes, tmp_path):
    """Checkpoints written before AdamW was fused hold groups with fused=None: a resumed run
    takes this device's fused AdamW, with the moments and step counts it saved."""
    train_sft.main(run_args(shapes, tmp_path, "--max-steps", "2", "--kernel", "torch"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(group["fused"] for group in checkpoint["optimizer"]["param_groups"])
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = None
    torch.save(checkpoint, tmp_path / "last.pt")
    train_sft.main(run_args(shapes, tmp_path, "--max-steps", "3", "--kernel", "torch",
                            "--resume", str(tmp_path / "last.pt")))
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]
    assert resumed["param_groups"][0]["fused"] is True
    assert all(state["step"].item() == 3 for state in resumed["state"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_training_step_waits_for_the_device_only_where_it_must(shapes, tmp_path,
                                                                      monkeypatch):
    """Two SFT steps on CUDA with torch.cuda.set_sync_debug_mode("error"): anything that makes
    the host wait raises, except the matching's transfer of the costs, the non-finite check
    and the logged losses (one read each)."""
    from losses import HungarianMatcher

    def allowed(function):
        def run(*arguments, **keywords):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return function(*arguments, **keywords)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return run

    monkeypatch.setattr(HungarianMatcher, "assign", staticmethod(allowed(HungarianMatcher.assign)))
    for name in ("finite_in_every_process", "log_step"):
        monkeypatch.setattr(train_sft, name, allowed(getattr(train_sft, name)))
    epoch = train_sft.train_one_epoch

    def strict_epoch(*arguments, **keywords):          # the steps only, not the checkpoint
        torch.cuda.set_sync_debug_mode("error")
        try:
            return epoch(*arguments, **keywords)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(train_sft, "train_one_epoch", strict_epoch)
    train_sft.main(run_args(shapes, tmp_path / "run", "--max-steps", "2", "--device", "cuda",
                            "--workers", "0"))


def test_a_pull_to_the_start_holds_the_weights_near_it_and_resumes_exactly(shapes, tmp_path):
    """--init-l2: SFT plus (weight / 2) * ||w - w_start||^2 toward the --init weights; a run
    cut off and resumed pulls toward the same start (the checkpoint holds it)."""
    train_sft.main(run_args(shapes, tmp_path / "start", "--max-steps", "2"))
    init = ["--init", str(tmp_path / "start" / "last.pt")]
    start = torch.load(tmp_path / "start" / "last.pt", weights_only=True)["model"]

    def distance(model):
        return sum((value.detach() - start[name]).pow(2).sum().item()
                   for name, value in model.named_parameters())

    free = train_sft.main(run_args(shapes, tmp_path / "free", *init, "--max-steps", "6"))
    pull = [*init, "--init-l2", "1000"]
    pulled = train_sft.main(run_args(shapes, tmp_path / "pulled", *pull, "--max-steps", "6"))
    assert distance(pulled) < 0.5 * distance(free)
    log = [json.loads(line) for line in (tmp_path / "pulled" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["pull"] > 0
    train_sft.main(run_args(shapes, tmp_path / "parts", *pull, "--max-steps", "3"))
    resumed = train_sft.main(run_args(shapes, tmp_path / "parts", *pull, "--max-steps", "6",
                                      "--resume", str(tmp_path / "parts" / "last.pt")))
    assert_same_weights(pulled.state_dict(), resumed.state_dict())
