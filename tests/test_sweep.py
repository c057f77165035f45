"""benchmarks/grqo_sweep.py: what it reads back, what it still has to run, what it reports."""

import argparse
import json
import sys
from pathlib import Path

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
