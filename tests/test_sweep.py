"""benchmarks/runner.py, grqo_sweep.py and sft_vs_grqo.py: what they read back, still run and
report, from run folders and from a study's committed summary."""

import argparse
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import grqo_sweep  # noqa: E402
import runner  # noqa: E402
import sft_vs_grqo  # noqa: E402
import shift  # noqa: E402


def sweep_study(tmp_path: Path) -> runner.Study:
    return runner.Study(grqo_sweep.SETTINGS, tmp_path / "results", tmp_path / "runs", "dev", 6,
                        gradient_batches=4, command="python benchmarks/grqo_sweep.py")


def write_run(folder: Path, rewards_by_epoch: dict | None, ap: float, **metrics):
    """A finished run's files as the training scripts write them: config.json, log.jsonl
    (reward None: an SFT step) and metrics.json (AP_novel None unless given)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"args": {"out": str(folder)}}))
    (folder / "metrics.json").write_text(json.dumps(
        {"AP": ap, "AP_base": ap, "AP_novel": None, "duplicates": 0.25,
         "per_class": {"red circle": ap}, **metrics}))
    lines = []
    for epoch, rewards in (rewards_by_epoch or {0: [None]}).items():
        for reward in rewards:
            line = {"step": len(lines) + 1, "epoch": epoch, "step_seconds": 0.5}
            if reward is not None:
                line.update(grqo=0.1, grqo_reward=reward)
            lines.append(json.dumps(line))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")


def write_diverged(folder: Path, reason: str):
    folder.mkdir(parents=True)
    (folder / "diverged.txt").write_text(reason + "\n")


def test_finished_runs_are_read_back_and_the_rest_scheduled(tmp_path):
    study = sweep_study(tmp_path)
    write_run(study.runs / "sft_binary_seed0", None, 0.2)
    write_run(study.runs / "pull_binary_1_seed0", {0: [None], 1: [-5.0], 5: [-3.0, -2.0]}, 0.1)
    (study.runs / "pull_binary_1_seed0" / "last.pt").write_bytes(b"")
    write_diverged(study.runs / "pg_focal_10_seed0", "non-finite loss at step 7")
    assert runner.next_step(study, "sft_binary", 0) is None              # finished
    command = runner.next_step(study, "pull_binary_1", 0)               # needs its gradients
    assert Path(command[1]).name == "grqo_gradients.py"
    assert runner.next_step(study, "pg_focal_10", 0) is None            # diverged: not rerun
    (study.runs / "pull_binary_1_seed0" / "metrics.json").unlink()     # cut off mid-run
    command = runner.next_step(study, "pull_binary_1", 0)
    assert command[command.index("--resume") + 1].endswith("pull_binary_1_seed0/last.pt")
    assert command[command.index("--alpha") + 1] == "1"
    assert command[command.index("--grqo-form") + 1] == "advantage_pull"


def test_summary_reports_last_epoch_reward_and_divergence(tmp_path):
    study = sweep_study(tmp_path)
    write_run(study.runs / "pull_binary_1_seed0", {0: [None], 1: [-5.0], 5: [-3.0, -2.0]}, 0.1)
    (study.runs / "pull_binary_1_seed0" / "gradients.json").write_text(
        json.dumps({"medians": {"ratio": 0.125}}))
    write_diverged(study.runs / "pg_focal_10_seed0", "non-finite loss at step 7")
    asked = {("sft_binary", 0)}
    rows = {row["setting"]: row for row in runner.collect(study, asked)}
    assert rows["pull_binary_1"]["reward"] == -2.5                       # epoch 5 only
    assert rows["pull_binary_1"]["gradient_ratio"] == 0.125
    assert "per_class" not in rows["pull_binary_1"]
    assert rows["pg_focal_10"]["status"] == "diverged: non-finite loss at step 7"
    assert rows["sft_binary"]["status"] == "not run"
    table = runner.report(study, asked, lambda rows: grqo_sweep.summary_tables(study, rows))
    assert "| pull_binary_1 | 0 | 10.0 | 10.0 | - | 25.0 | -2.50 | 0.1250 |" in table
    summary = json.loads((study.results / "summary.json").read_text())
    assert [row["setting"] for row in summary["runs"]] == ["pull_binary_1", "pg_focal_10"]
    assert summary["runs"][0]["AP"] == 0.1 and summary["runs"][0]["step_seconds"] == 0.5
    assert (study.results / "summary.md").read_text() == table + "\n"


def test_summary_keeps_other_runs_and_pairs_each_setting_with_its_baseline(tmp_path):
    study = sweep_study(tmp_path)
    for seed, (grqo_ap, sft_ap) in enumerate([(0.20, 0.18), (0.15, 0.19)]):
        write_run(study.runs / f"pull_binary_1_seed{seed}", {1: [-3.0]}, grqo_ap)
        write_run(study.runs / f"sft_binary_seed{seed}", None, sft_ap)
    write_run(study.runs / "sft_focal_seed0", None, 0.5)              # not pull's baseline
    write_run(study.runs / "detached_mixed_0.1_seed0", {1: [-3.0]}, 0.45)
    rows = runner.collect(study, {("pull_binary_1", 1)})              # a sweep of one more seed
    assert [(row["setting"], row["seed"]) for row in rows] == [
        ("sft_focal", 0), ("sft_binary", 0), ("pull_binary_1", 0), ("detached_mixed_0.1", 0),
        ("sft_binary", 1), ("pull_binary_1", 1)]
    differences = grqo_sweep.paired_differences(rows)
    assert differences["pull_binary_1"]["AP"] == pytest.approx([2.0, -4.0])
    assert differences["detached_mixed_0.1"]["AP"] == pytest.approx([-5.0])  # vs sft_focal
    assert "| pull_binary_1 | sft_binary | 2 | -1.0 +- 4.2 | -1.0 +- 4.2 | - |" \
        in grqo_sweep.summary_tables(study, rows)
    (study.runs / "pg_focal_1_seed3").mkdir()                   # cut off after 20 steps
    (study.runs / "pg_focal_1_seed3" / "log.jsonl").write_text('{"step": 20, "epoch": 0}\n')
    assert [row["status"] for row in runner.collect(study, {("pg_focal_10", 0)})
            if row["setting"] == "pg_focal_10"] == ["not run"]  # asked for, never run
    rows = runner.collect(study, set())                          # runs on disk only
    assert len(rows) == 7 and not any(row["status"] == "not run" for row in rows)
    assert rows[-1]["status"] == "unfinished (logged to step 20)"


def test_settings_tables_are_built_once_and_ablations_compare_with_the_matching_sft():
    assert grqo_sweep.baseline(grqo_sweep.SETTINGS["detached_binary_0.1_beta0"][1]) \
        == "sft_binary"
    assert grqo_sweep.baseline(grqo_sweep.SETTINGS["detached_mixed_0.1"][1]) == "sft_focal"
    release = grqo_sweep.SETTINGS["detached_binary_0.1_release"][1]
    assert release[release.index("--contrastive-weight") + 1] == "100"
    assert grqo_sweep.baseline(release) == "sft_binary_release"
    assert grqo_sweep.baseline(["--contrastive-weight", "100"]) == "sft_focal"  # half: not it
    assert grqo_sweep.SETTINGS["sft_binary_release"] == (
        "train_sft.py", ["--match-cost", "binary_focal", *grqo_sweep.RELEASE])
    coarse = copy.deepcopy(grqo_sweep.COARSE_SETTINGS)
    ablations = grqo_sweep.ablations("pull_binary_1", grqo_sweep.COARSE_SETTINGS)
    assert grqo_sweep.COARSE_SETTINGS == coarse                  # returned, nothing changed
    assert ablations["pull_binary_1_beta0"][1][-2:] == ["--beta", "0"]
    assert "pull_binary_1_beta0" not in grqo_sweep.SETTINGS


def test_out_names_the_summary_folder_and_the_runs_go_to_runs_of_the_same_name(tmp_path):
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser, out="benchmarks/results/grqo_sweep_dev", split="dev",
                         epochs=6, device="cpu")
    study = runner.study_from_arguments(parser.parse_args([]), grqo_sweep.SETTINGS,
                                        "grqo_sweep.py", [])
    assert study.results == Path("benchmarks/results/grqo_sweep_dev").resolve()
    assert study.runs == ROOT / "runs" / "grqo_sweep_dev"
    study = runner.study_from_arguments(
        parser.parse_args(["--out", str(tmp_path / "x"), "--runs", str(tmp_path / "y")]),
        grqo_sweep.SETTINGS, "grqo_sweep.py", ["--summary"])
    assert (study.results, study.runs) == (tmp_path / "x", tmp_path / "y")
    assert study.command == "python benchmarks/grqo_sweep.py --summary"


def test_a_study_is_read_back_from_its_summary_once_its_run_folders_are_deleted(tmp_path,
                                                                             capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    write_run(runs / "sft_binary_seed0", None, 0.2, AP_novel=0.3)
    write_run(runs / "pull_binary_1_seed0", {0: [None], 5: [-3.0, -2.0]}, 0.1)
    (runs / "pull_binary_1_seed0" / "gradients.json").write_text(
        json.dumps({"medians": {"ratio": 0.125}}))
    write_diverged(runs / "pg_focal_10_seed0", "non-finite loss at step 7")
    argv = ["--settings", "sft_binary", "pull_binary_1", "pg_focal_10", "--out", str(results),
            "--runs", str(runs), "--data", str(tmp_path / "none")]  # a rerun would fail fast
    grqo_sweep.main(argv)                               # nothing to run: reads back, writes
    from_folders = capsys.readouterr().out
    assert "start" not in from_folders and "| pull_binary_1 | 0 | 10.0 |" in from_folders
    summary = json.loads((results / "summary.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert summary["command"] == "python benchmarks/grqo_sweep.py " + " ".join(argv)
    assert summary["commit"] == (head or None)
    assert [row["status"] for row in summary["runs"]] == [
        "done", "done", "diverged: non-finite loss at step 7"]
    assert summary["runs"][1]["reward"] == -2.5
    assert summary["runs"][1]["gradient_ratio"] == 0.125
    shutil.rmtree(runs)
    grqo_sweep.main(argv + ["--summary"])
    assert capsys.readouterr().out == from_folders      # the same tables from the summary
    grqo_sweep.main(argv)                               # and nothing is rerun
    assert capsys.readouterr().out == from_folders
    assert not runs.exists()
    assert json.loads((results / "summary.json").read_text())["runs"] == summary["runs"]


def test_final_comparison_pairs_a_sweep_setting_with_its_baseline_seed_by_seed(tmp_path):
    study = runner.Study(sft_vs_grqo.SETTINGS, tmp_path / "results", tmp_path / "runs", "val",
                         6, device="cpu", extra=["--workers", "0"])
    variants, seeds = ["sft_binary", "detached_binary_0.1"], [0, 1, 2]
    novel = {"sft_binary": [None, 0.10, 0.20], "detached_binary_0.1": [0.30, 0.15, 0.19]}
    for variant, values in novel.items():
        for seed, value in enumerate(values):
            write_run(study.runs / f"{variant}_seed{seed}",
                      {1: [-3.0]} if variant != "sft_binary" else None, 0.2, AP50=0.3,
                      AP50_base=0.3, AP50_novel=0.3, AP_novel=value)
    rows = runner.collect(study, set())
    summary = sft_vs_grqo.summarise({(row["setting"], row["seed"]): row for row in rows},
                                    variants, seeds)
    differences = sft_vs_grqo.paired_differences(summary)
    # seed 0 has no SFT AP_novel, so it leaves the pairs: +5 and -1, never 30 - 10
    assert differences["detached_binary_0.1"]["AP_novel"] == pytest.approx([5.0, -1.0])
    assert "| detached_binary_0.1 | +0.0 ± 0.0 | +0.0 ± 0.0 | +2.0 ± 4.2 | [+5.0, -1.0] |" \
        in sft_vs_grqo.comparison_tables(study, variants, seeds, rows)
    assert sft_vs_grqo.comparison_tables(study, variants, [0, 3], rows).splitlines() == [
        sft_vs_grqo.NOT_FINISHED, "sft_binary seed 3: not run",
        "detached_binary_0.1 seed 3: not run"]
    (study.runs / "sft_binary_seed1" / "metrics.json").unlink()           # cut off: resumes
    (study.runs / "sft_binary_seed1" / "last.pt").write_bytes(b"")
    command = runner.next_step(study, "sft_binary", 1)
    assert command[command.index("--match-cost") + 1] == "binary_focal"
    assert command[-4:] == ["--workers", "0", "--resume",
                            str(study.runs / "sft_binary_seed1" / "last.pt")]


def test_sft_vs_grqo_runs_its_comparison_through_the_shared_runner(tmp_path, capsys):
    """Read back from the committed summary, skip what another process holds, record a
    failure and go on, keep the summary: the sweep's runner, not a copy."""
    runs, results = tmp_path / "runs", tmp_path / "results"
    tables = copy.deepcopy((grqo_sweep.SETTINGS, sft_vs_grqo.SETTINGS))
    for variant in ["sft_binary", "detached_binary_0.1"]:
        write_run(runs / f"{variant}_seed0", {1: [-3.0]}, 0.2, AP50=0.3, AP50_base=0.3,
                  AP50_novel=0.3, AP_novel=0.2)
    argv = ["--setting", "detached_binary_0.1", "--epochs", "6", "--out", str(results),
            "--runs", str(runs), "--device", "cpu"]
    failing = ["--extra", "--no-such-flag"]            # whatever starts, stops at once
    sft_vs_grqo.main(argv + ["--seeds", "0"] + failing)
    assert "| detached_binary_0.1 | +0.0 ± 0.0 |" in capsys.readouterr().out
    shutil.rmtree(runs)                                      # now only in summary.json
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (runs / "detached_binary_0.1_seed1").mkdir(parents=True)
        (runs / "detached_binary_0.1_seed1" / "running").write_text(str(other.pid))
        with pytest.raises(SystemExit):
            sft_vs_grqo.main(argv + ["--seeds", "0", "1"] + failing)
    finally:
        other.kill()
        other.wait()
    printed = capsys.readouterr().out
    assert f"skip  detached_binary_0.1 seed 1: process {other.pid} is running it" in printed
    assert printed.count("start ") == 1                     # sft_binary seed 1 only
    assert sorted(path.name for path in runs.iterdir()) == [
        "detached_binary_0.1_seed1", "sft_binary_seed1"]
    assert ("stop  sft_binary seed 1: failed, resumes on the next invocation: train_sft.py: "
            "error: unrecognized arguments: --no-such-flag") in printed
    assert not (runs / "sft_binary_seed1" / "diverged.txt").exists()   # not a divergence
    statuses = {(row["setting"], row["seed"]): row["status"]
                for row in json.loads((results / "summary.json").read_text())["runs"]}
    assert statuses == {("sft_binary", 0): "done", ("detached_binary_0.1", 0): "done"}
    assert (grqo_sweep.SETTINGS, sft_vs_grqo.SETTINGS) == tables    # no table was changed


def test_alpha_table_shows_one_seed_of_form_and_cost_against_alpha_without_ablations(
        tmp_path):
    study = sweep_study(tmp_path)
    for setting, seed, ap in [("pull_binary_1", 0, 0.10), ("pull_binary_1", 1, 0.20),
                              ("pull_binary_0.1", 0, 0.30), ("detached_binary_0.1_beta0", 0, 0.5),
                              ("detached_mixed_0.1", 0, 0.5), ("sft_binary", 0, 0.4),
                              ("pg_focal_10", 0, 0.05)]:
        write_run(study.runs / f"{setting}_seed{seed}", {1: [-3.0]}, ap)
    rows = runner.collect(study, set())
    assert grqo_sweep.alpha_series(rows, "AP", seed=0) == {
        "advantage_pull, binary_focal": {0.1: pytest.approx(30.0), 1.0: pytest.approx(10.0)},
        "pg, focal": {10.0: pytest.approx(5.0)}}
    assert grqo_sweep.alpha_table(rows, "AP", seed=0)[2:] == [
        "| form, cost | alpha 0.1 | alpha 1 | alpha 10 |", "|---|---:|---:|---:|",
        "| advantage_pull, binary_focal | 30.0 | 10.0 | - |", "| pg, focal | - | - | 5.0 |"]
    assert "(SFT: sft_binary 40.0)" in grqo_sweep.alpha_table(rows, "AP", seed=0)[0]
    assert grqo_sweep.alpha_table(rows, "AP", seed=7) == []          # nothing to show


def test_a_run_another_live_process_holds_is_skipped_and_a_stale_marker_is_not(tmp_path):
    study = sweep_study(tmp_path)
    folder = study.runs / "pull_binary_1_seed0"
    folder.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / "running").write_text(str(other.pid))
        assert runner.next_step(study, "pull_binary_1", 0) is None      # held: skipped
    finally:
        other.kill()
        other.wait()
    assert Path(runner.next_step(study, "pull_binary_1", 0)[1]).name == "train_grqo.py"


# ----------------------------------------------------------------------------- transfer

import transfer  # noqa: E402


def transfer_studies(tmp_path: Path) -> dict[str, runner.Study]:
    args = argparse.Namespace(out=str(tmp_path / "results" / "transfer"),
                              runs=str(tmp_path / "runs" / "transfer"), split="val", epochs=6,
                              data="shapes", device="cpu")
    return transfer.studies(args, ["--summary"])


def write_evaluations(folder: Path, prompt: str, default: float, domains: list[float],
                      text: float | None = None):
    """evaluation_NAME.json files as evaluate.py --out writes them (AP in [0, 1])."""
    values = {"default": default, **dict(zip(transfer.DOMAINS, domains))}
    for name, value in values.items():
        (folder / f"evaluation_{name}_{prompt}.json").write_text(json.dumps(
            {"AP": value, "AP_base": value + 0.01, "AP_novel": value - 0.01,
             "per_class": {"x": value}}))
    if text is not None and prompt != "text":
        (folder / "evaluation_default_text.json").write_text(json.dumps({"AP": text}))


def test_transfer_stages_start_from_p_and_evaluate_every_domain(tmp_path):
    stages = transfer_studies(tmp_path)
    pretrained, finetune, users = stages["pretrained"], stages["finetune"], stages["users"]
    assert pretrained.settings["P"][1] == ["--prompts", "text"] and pretrained.epochs == 12
    p_checkpoint = str(runner.run_folder(pretrained, "P", 0) / "last.pt")
    for study, data in ((finetune, "shapes"), (users, "shapes:outlines")):
        command = runner.train_command(study, "release", 3)
        assert command[command.index("--init") + 1] == p_checkpoint
        assert command[command.index("--data") + 1] == data
        assert command[command.index("--sft-epochs") + 1] == "1"      # 1 + 5 from P
        assert command[command.index("--grqo-epochs") + 1] == "5"
    assert set(finetune.evaluations) == {"default_generic", "default_text"} | {
        f"{domain}_generic" for domain in transfer.DOMAINS}
    assert finetune.evaluations["crowded_generic"] == [
        "--data", "shapes:crowded", "--split", "val", "--prompt", "generic", "--shots", "10"]
    folder = runner.run_folder(finetune, "release", 0)       # trained, evaluations pending
    write_run(folder, {0: [None], 1: [-3.0]}, 0.3)
    (folder / "last.pt").write_bytes(b"")
    write_evaluations(folder, "generic", 0.3, [0.1] * len(transfer.DOMAINS))
    command = runner.next_step(finetune, "release", 0)
    assert Path(command[1]).name == "evaluate.py"
    assert command[command.index("--out") + 1] == str(folder / "evaluation_default_text.json")
    assert command[command.index("--prompt") + 1] == "text"
    (folder / "evaluation_default_text.json").write_text(json.dumps({"AP": 0.2}))
    assert runner.next_step(finetune, "release", 0) is None
    assert transfer.jobs_of(["release", "kl_only"], [2, 3]) == [
        ("release", 2), ("kl_only", 2), ("release", 3)]


def test_transfer_tables_pair_each_grqo_setting_with_its_sft_seed_by_seed(tmp_path):
    stages = transfer_studies(tmp_path)
    p_folder = runner.run_folder(stages["pretrained"], "P", 0)
    write_run(p_folder, None, 0.5)
    write_evaluations(p_folder, "text", 0.4, [0.2] * len(transfer.DOMAINS), text=0.4)
    finetune = stages["finetune"]
    domains = len(transfer.DOMAINS)
    for seed, (sft, grqo) in enumerate([(0.10, 0.13), (0.10, 0.12)]):   # domains' AP
        for setting, value in (("sft_focal", sft), ("release", grqo)):
            folder = runner.run_folder(finetune, setting, seed)
            write_run(folder, {0: [None]}, 0.3)
            write_evaluations(folder, "generic", 0.3 + (setting == "release") * 0.01,
                              [value] * domains, text=0.2)
    rows = runner.collect(finetune, set())
    pretrained = transfer.pretrained_row(stages["pretrained"])
    text = transfer.render("finetune", pretrained, rows)
    assert "| P (text prompts) | 1 | 40.0 | 41.0 | 39.0 | " + " | ".join(["20.0"] * domains) \
        + " | 20.0 | 100.0 |" in text
    assert "| sft_focal | 2 | 30.0 ± 0.0 | 31.0 ± 0.0 | 29.0 ± 0.0 | " \
        + " | ".join(["10.0 ± 0.0"] * domains) + " | 10.0 ± 0.0 | 50.0 ± 0.0 |" in text
    # release minus sft_focal: domains +3 and +2 (2.5 ± 0.7), AP_base +1, text kept 0
    assert "| release | sft_focal | 2 | 2.5 ± 0.7 | 1.0 ± 0.0 | 1.0 ± 0.0 | 0.0 ± 0.0 | " \
           "+3.0, +2.0 | 1.00x |" in text


def test_the_users_table_puts_the_domain_trained_on_apart_from_the_others(tmp_path):
    """The users' stage fine-tunes on outlines' train split: outlines comes first, and the
    mean over the domains ("other domains", what transfer survives) leaves it out."""
    stages = transfer_studies(tmp_path)
    users, others = stages["users"], len(transfer.DOMAINS) - 1
    assert next(iter(transfer.DOMAINS)) == transfer.USERS_DOMAIN    # first, as written below
    for setting, (trained, elsewhere) in (("sft_focal", (0.5, 0.1)), ("release", (0.6, 0.12))):
        folder = runner.run_folder(users, setting, 0)
        write_run(folder, {0: [None]}, 0.3)
        write_evaluations(folder, "generic", 0.3, [trained] + [elsewhere] * others, text=0.2)
    text = transfer.render("users", None, runner.collect(users, set()))
    assert "| run | seeds | outlines | AP | AP_base | AP_novel | " in text
    assert "| other domains | text kept % |" in text
    assert "| sft_focal | 1 | 50.0 | 30.0 | 31.0 | 29.0 | " + "10.0 | " * others + "10.0 | - |" \
        in text
    # release minus sft_focal: outlines +10, the other domains +2, the default val 0
    assert "| release | sft_focal | 1 | 10.0 | 2.0 | 0.0 | 0.0 | - | +10.0 | 1.00x |" in text


# ----------------------------------------------------------------------------- shift

def shift_studies(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "results" / "shift"),
                              runs=str(tmp_path / "runs"), split="val", epochs=6,
                              data="shapes", device="cpu")
    return shift.starts(args, ["--summary"]), shift.finetunes(args, ["--summary"])


def write_shift_evaluations(folder: Path, values: dict[str, float]):
    """evaluation_NAME.json for the default val and every domain (AP 0.05 where not given)."""
    for name in ["default", *shift.DOMAINS]:
        (folder / f"evaluation_{name}.json").write_text(
            json.dumps({"AP": values.get(name, 0.05)}))


def test_shift_starts_from_each_p_and_fine_tunes_sft_6_against_grqo_0_plus_6(tmp_path):
    pretrained, tuned = shift_studies(tmp_path)
    visual = runner.train_command(pretrained["P_visual"], "P_visual", 0)
    assert Path(visual[1]).name == "train_grqo.py"               # the main job: 1 + 11
    assert visual[visual.index("--sft-epochs") + 1] == "1"
    assert visual[visual.index("--grqo-epochs") + 1] == "11"
    text = runner.train_command(pretrained["P_text"], "P_text", 0)
    assert text[text.index("--prompts") + 1] == "text" and "--epochs" in text
    assert pretrained["P_text"].evaluations["cells"] == [
        "--data", "shapes:cells", "--split", "val", "--prompt", "text"]
    assert set(shift.FAR_DOMAINS) < set(pretrained["P_visual"].evaluations)
    assert set(tuned) == {(p, target) for p in shift.STARTS for target in shift.TARGETS}
    study = tuned["P_text", "parts"]
    grqo, sft = (runner.train_command(study, setting, 3) for setting in ("grqo", "sft"))
    for command in (grqo, sft):
        assert command[command.index("--init") + 1] == str(
            runner.run_folder(pretrained["P_text"], "P_text", 0) / "last.pt")
        assert command[command.index("--data") + 1] == "shapes:parts"
    assert grqo[grqo.index("--sft-epochs") + 1] == "0"
    assert grqo[grqo.index("--grqo-epochs") + 1] == "6"
    assert sft[sft.index("--epochs") + 1] == "6" and "--init-l2" not in sft
    l2 = runner.train_command(study, "sft_l2", 0)
    assert float(l2[l2.index("--init-l2") + 1]) > 0
    assert study.evaluations["default"][-2:] == ["--shots", "10"]


def test_shift_tables_order_targets_by_distance_and_apply_the_gain_criterion(tmp_path):
    pretrained, tuned = shift_studies(tmp_path)
    zero_shot = {"default": 0.5, "parts": 0.02, "cells": 0.10, "documents": 0.04,
                 "outlines": 0.30}
    for start in shift.STARTS:
        folder = runner.run_folder(pretrained[start], start, 0)
        write_run(folder, None, 0.5)
        write_shift_evaluations(folder, zero_shot)
    # From P_visual: on cells GRQO gains +2, +3, +1.5 (a gain); on parts +1, -1, +2 (none).
    gains = {"cells": [2.0, 3.0, 1.5], "parts": [1.0, -1.0, 2.0]}
    for target, deltas in gains.items():
        for seed, delta in enumerate(deltas):
            for setting, ap in (("sft", 0.30), ("grqo", 0.30 + delta / 100)):
                folder = runner.run_folder(tuned["P_visual", target], setting, seed)
                write_run(folder, {0: [None]}, ap)
                write_shift_evaluations(folder, {target: ap, "default": 0.2 - (setting == "grqo")
                                                 * 0.01})
    text = shift.render(pretrained, tuned)
    assert "| P_visual (generic) | 50.0 | " in text
    table = text[text.index("From P_visual"):text.index("From P_text")]
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| parts", "| documents", "| cells",
                                                       "| outlines"]         # farthest first
    assert "| cells | 10.0 | 30.0 ± 0.0 | 3 | 2.2 ± 0.8 | +2.0, +3.0, +1.5 | -1.0 ± 0.0 | " \
           "0.0 ± 0.0 | yes |" in table
    assert "| parts | 2.0 | 30.0 ± 0.0 | 3 | 0.7 ± 1.5 | +1.0, -1.0, +2.0 |" in table
    assert table.split("| parts |")[1].splitlines()[0].endswith("| no |")
    assert shift.largest_gain(tuned) == ("P_visual", "cells")
    assert "Ablations from P_visual on cells" in text
