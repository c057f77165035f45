"""benchmarks/grqo_sweep.py and sft_vs_grqo.py: what they read back, still run and report."""

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import grqo_sweep  # noqa: E402


def args_for(out: Path):
    return argparse.Namespace(
        settings=["sft_binary", "pull_binary_1", "pg_focal_10"], seeds=[0], data="shapes",
        split="dev", epochs=6, jobs=2, threads=1, gradient_batches=4, out=str(out))


def write_run(folder: Path, rewards_by_epoch: dict | None, ap: float):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(
        {"AP": ap, "AP_base": ap, "AP_novel": None, "duplicates": 0.25}))
    lines = []
    for epoch, rewards in (rewards_by_epoch or {0: [None]}).items():
        for reward in rewards:
            line = {"step": len(lines) + 1, "epoch": epoch, "step_seconds": 0.5}
            if reward is not None:
                line.update(grqo=0.1, grqo_reward=reward)
            lines.append(json.dumps(line))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")


def test_finished_runs_are_read_back_and_the_rest_scheduled(tmp_path):
    args = args_for(tmp_path)
    write_run(tmp_path / "sft_binary_seed0", None, 0.2)
    write_run(tmp_path / "pull_binary_1_seed0", {0: [None], 1: [-5.0], 5: [-3.0, -2.0]}, 0.1)
    (tmp_path / "pg_focal_10_seed0").mkdir()
    (tmp_path / "pg_focal_10_seed0" / "diverged.txt").write_text("non-finite loss at step 7\n")
    assert grqo_sweep.next_step(args, "sft_binary", 0) is None            # finished
    command = grqo_sweep.next_step(args, "pull_binary_1", 0)             # needs its gradients
    assert Path(command[1]).name == "grqo_gradients.py"
    assert grqo_sweep.next_step(args, "pg_focal_10", 0) is None          # diverged: not rerun
    (tmp_path / "pull_binary_1_seed0" / "last.pt").write_bytes(b"")
    (tmp_path / "pull_binary_1_seed0" / "metrics.json").unlink()        # cut off mid-run
    command = grqo_sweep.next_step(args, "pull_binary_1", 0)
    assert command[command.index("--resume") + 1].endswith("pull_binary_1_seed0/last.pt")
    assert command[command.index("--alpha") + 1] == "1"
    assert command[command.index("--grqo-form") + 1] == "advantage_pull"


def test_summary_reports_last_epoch_reward_and_divergence(tmp_path):
    args = args_for(tmp_path)
    write_run(tmp_path / "pull_binary_1_seed0", {0: [None], 1: [-5.0], 5: [-3.0, -2.0]}, 0.1)
    (tmp_path / "pull_binary_1_seed0" / "gradients.json").write_text(
        json.dumps({"medians": {"ratio": 0.125}}))
    (tmp_path / "pg_focal_10_seed0").mkdir()
    (tmp_path / "pg_focal_10_seed0" / "diverged.txt").write_text("non-finite loss at step 7\n")
    rows = {row["setting"]: row for row in grqo_sweep.collect(args)}
    assert rows["pull_binary_1"]["reward"] == -2.5                       # epoch 5 only
    assert rows["pull_binary_1"]["gradient_ratio"] == 0.125
    assert rows["pg_focal_10"]["status"] == "diverged: non-finite loss at step 7"
    assert rows["sft_binary"]["status"] == "not run"
    table = grqo_sweep.write_summary(args)
    assert "| pull_binary_1 | 0 | 10.0 | 10.0 | - | 25.0 | -2.50 | 0.1250 |" in table
    assert json.loads((tmp_path / "summary.json").read_text())[1]["AP"] == 0.1


def test_summary_keeps_other_runs_and_pairs_each_setting_with_its_baseline(tmp_path):
    args = args_for(tmp_path)
    args.settings, args.seeds = ["pull_binary_1"], [1]                # a sweep of one more seed
    for seed, (grqo_ap, sft_ap) in enumerate([(0.20, 0.18), (0.15, 0.19)]):
        write_run(tmp_path / f"pull_binary_1_seed{seed}", {1: [-3.0]}, grqo_ap)
        write_run(tmp_path / f"sft_binary_seed{seed}", None, sft_ap)
    write_run(tmp_path / "sft_focal_seed0", None, 0.5)              # not pull's baseline
    write_run(tmp_path / "detached_mixed_0.1_seed0", {1: [-3.0]}, 0.45)
    rows = grqo_sweep.collect(args)
    assert [(row["setting"], row["seed"]) for row in rows] == [
        ("sft_focal", 0), ("sft_binary", 0), ("pull_binary_1", 0), ("detached_mixed_0.1", 0),
        ("sft_binary", 1), ("pull_binary_1", 1)]
    differences = grqo_sweep.paired_differences(rows)
    assert differences["pull_binary_1"]["AP"] == pytest.approx([2.0, -4.0])
    assert differences["detached_mixed_0.1"]["AP"] == pytest.approx([-5.0])  # vs sft_focal
    table = grqo_sweep.write_summary(args)
    assert "| pull_binary_1 | sft_binary | 2 | -1.0 +- 4.2 | -1.0 +- 4.2 | - |" in table
    (tmp_path / "pg_focal_1_seed3").mkdir()                     # cut off after 20 steps
    (tmp_path / "pg_focal_1_seed3" / "log.jsonl").write_text('{"step": 20, "epoch": 0}\n')
    args.settings = ["pg_focal_10"]                              # asked for, never run
    assert [row["status"] for row in grqo_sweep.collect(args)
            if row["setting"] == "pg_focal_10"] == ["not run"]
    args.summary = True                                          # runs on disk only
    rows = grqo_sweep.collect(args)
    assert len(rows) == 7 and not any(row["status"] == "not run" for row in rows)
    assert rows[-1]["status"] == "unfinished (logged to step 20)"


def test_ablations_of_the_best_setting_compare_with_the_matching_sft_run():
    assert grqo_sweep.baseline("detached_binary_0.1_beta0") == "sft_binary"
    assert grqo_sweep.baseline("detached_mixed_0.1") == "sft_focal"
    release = grqo_sweep.SETTINGS["detached_binary_0.1_release"][1]
    assert release[release.index("--contrastive-weight") + 1] == "100"
    assert grqo_sweep.baseline("detached_binary_0.1_release") == "sft_binary_release"
    grqo_sweep.SETTINGS["half_release"] = ("train_grqo.py", ["--contrastive-weight", "100"])
    try:
        assert grqo_sweep.baseline("half_release") == "sft_focal"   # not the release's SFT
    finally:
        del grqo_sweep.SETTINGS["half_release"]
    assert grqo_sweep.SETTINGS["sft_binary_release"] == (
        "train_sft.py", ["--match-cost", "binary_focal", *grqo_sweep.RELEASE])


def test_final_comparison_pairs_a_sweep_setting_with_its_baseline_seed_by_seed(tmp_path,
                                                                              monkeypatch):
    import sft_vs_grqo
    monkeypatch.setattr(sft_vs_grqo, "VARIANTS", dict(sft_vs_grqo.VARIANTS))
    variants = sft_vs_grqo.use_sweep_setting("detached_binary_0.1")
    assert variants == ["sft_binary", "detached_binary_0.1"]
    args = argparse.Namespace(variants=variants, seeds=[0, 1, 2], out=str(tmp_path), epochs=6,
                              data="shapes", split="val", device="cpu", extra=[])
    novel = {"sft_binary": [None, 0.10, 0.20], "detached_binary_0.1": [0.30, 0.15, 0.19]}
    for variant, values in novel.items():
        for seed, value in enumerate(values):
            folder = tmp_path / f"{variant}_seed{seed}"
            write_run(folder, {1: [-3.0]} if variant != "sft_binary" else None, 0.2)
            metrics = json.loads((folder / "metrics.json").read_text())
            metrics.update(AP50=0.3, AP50_base=0.3, AP50_novel=0.3, AP_novel=value)
            (folder / "metrics.json").write_text(json.dumps(metrics))
    summary = sft_vs_grqo.summarise(args)
    differences = sft_vs_grqo.paired_differences(summary)
    # seed 0 has no SFT AP_novel, so it leaves the pairs: +5 and -1, never 30 - 10
    assert differences["detached_binary_0.1"]["AP_novel"] == pytest.approx([5.0, -1.0])
    assert "| detached_binary_0.1 | +0.0 ± 0.0 | +0.0 ± 0.0 | +2.0 ± 4.2 | [+5.0, -1.0] |" \
        in sft_vs_grqo.format_summary(summary, args)
    (tmp_path / "sft_binary_seed1" / "last.pt").write_bytes(b"")          # cut off: resumes
    command = sft_vs_grqo.command("sft_binary", 1, args)
    assert command[command.index("--match-cost") + 1] == "binary_focal"
    assert command[-2:] == ["--resume", str(tmp_path / "sft_binary_seed1" / "last.pt")]


def test_figure_plots_one_seed_of_form_and_cost_against_alpha_without_ablations(tmp_path):
    args = args_for(tmp_path)
    for setting, seed, ap in [("pull_binary_1", 0, 0.10), ("pull_binary_1", 1, 0.20),
                              ("pull_binary_0.1", 0, 0.30), ("detached_binary_0.1_beta0", 0, 0.5),
                              ("detached_mixed_0.1", 0, 0.5), ("sft_binary", 0, 0.4)]:
        write_run(tmp_path / f"{setting}_seed{seed}", {1: [-3.0]}, ap)
    rows = grqo_sweep.collect(args)
    series = grqo_sweep.alpha_series(rows, "AP")
    assert series == {"advantage_pull, binary_focal": [(0.1, pytest.approx(30.0)),
                                                       (1.0, pytest.approx(10.0))]}
    assert grqo_sweep.alpha_series(rows, "AP", seed=1) == {
        "advantage_pull, binary_focal": [(1.0, pytest.approx(20.0))]}
    from PIL import Image
    picture = tmp_path / "figure.png"
    grqo_sweep.draw_figure(rows, picture, "AP")
    colours = {colour for _, colour in Image.open(picture).getcolors(1 << 20)}
    assert (0x1f, 0x77, 0xb4) in colours                   # the one series, in its colour
    for row in rows:                            # all zero, one alpha: still a picture
        row["AP"] = 0.0
    grqo_sweep.draw_figure(rows, picture, "AP", seed=1)
    assert Image.open(picture).size == (720, 440)
    grqo_sweep.draw_figure(rows, picture, "AP", seed=7)          # nothing to draw
    assert not picture.exists()


def test_a_run_another_live_sweep_holds_is_skipped_and_a_stale_marker_is_not(tmp_path):
    import subprocess
    args = args_for(tmp_path)
    folder = tmp_path / "pull_binary_1_seed0"
    folder.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / "running").write_text(str(other.pid))
        assert grqo_sweep.next_step(args, "pull_binary_1", 0) is None      # held: skipped
    finally:
        other.kill()
        other.wait()
    assert Path(grqo_sweep.next_step(args, "pull_binary_1", 0)[1]).name == "train_grqo.py"
