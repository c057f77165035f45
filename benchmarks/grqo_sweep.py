"""Where does GRQO act without hacking its reward? A sweep of form, cost and weight on `dev`.

    python benchmarks/grqo_sweep.py                                # the coarse sweep, seed 0
    python benchmarks/grqo_sweep.py --settings sft_binary pull_binary_1 --seeds 1 2
    python benchmarks/grqo_sweep.py --settings sft_binary_release detached_binary_0.1_beta0 ...
    python benchmarks/grqo_sweep.py --summary                      # the table of what finished

Every setting is one run of the `tiny` preset on the shapes data, "1+5" epochs (train_sft.py
for 6 epochs for the SFT baselines), evaluated on `dev` (never `val`: settings are chosen
here). Runs go two at a time with one CPU thread each, in the order of SETTINGS (most
informative first). A finished run (its metrics.json) is read back, not rerun, and a run
cut off continues from its last checkpoint (--resume), so the sweep resumes where it
stopped; a run that diverges is recorded with the message it stopped with.

Per run: AP, AP_base, AP_novel and `duplicates` (share of detections >= 0.3 repeating a
higher-scored one of the same prompt, IoU > 0.7) from the final evaluation; the mean reward
over the last epoch (a reward that runs away is the sign of hacking); the median seconds per
step; and, for GRQO runs, the ratio of the advantage term's gradient norm to the supervised
one on training batches of the final checkpoint (benchmarks/grqo_gradients.py). The table
goes to OUT/summary.md and OUT/summary.json after every finished run. OUT is kept in git
(checkpoints, pictures and stdout excepted), so that a finished run is read back in a later
session: commit it as results come.
"""

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grqo(form: str, cost: str, alpha: float, reward_cost: str | None = None
         ) -> tuple[str, list[str]]:
    extra = ["--reward-cost", reward_cost] if reward_cost else []
    return ("train_grqo.py",
            ["--grqo-form", form, "--match-cost", cost, "--alpha", str(alpha), *extra])


# name -> (script, arguments). Settings that match with the binary focal cost compare with
# sft_binary, the others with sft_focal (`baseline`). "mixed" matches with the focal cost
# (the better SFT) and rewards with the bounded binary focal cost.
SETTINGS = {
    "sft_focal": ("train_sft.py", []),
    "sft_binary": ("train_sft.py", ["--match-cost", "binary_focal"]),
    "detached_binary_1": grqo("detached_stats", "binary_focal", 1),
    "pull_binary_1": grqo("advantage_pull", "binary_focal", 1),
    "pg_focal_10": grqo("pg", "focal", 10),
    "paper_binary_1": grqo("paper", "binary_focal", 1),
    "detached_binary_0.1": grqo("detached_stats", "binary_focal", 0.1),
    "pull_binary_0.1": grqo("advantage_pull", "binary_focal", 0.1),
    "detached_binary_10": grqo("detached_stats", "binary_focal", 10),
    "pull_binary_10": grqo("advantage_pull", "binary_focal", 10),
    "pg_focal_1": grqo("pg", "focal", 1),
    "pg_focal_100": grqo("pg", "focal", 100),
    "paper_binary_10": grqo("paper", "binary_focal", 10),
    "paper_focal_10": grqo("paper", "focal", 10),
    "pg_focal_0.1": grqo("pg", "focal", 0.1),
    "detached_mixed_0.1": grqo("detached_stats", "focal", 0.1, reward_cost="binary_focal"),
}
COARSE = list(SETTINGS)                  # what a plain `python benchmarks/grqo_sweep.py` runs
RELEASE = ["--contrastive-weight", "100", "--dn-label-noise", "0.5"]   # the release's values


def add_ablations(best: str) -> None:
    """The ablations of the best setting: no KL, no muting, KL weight x0.25 and x4 (of the
    default --beta 0.24), and the release's contrastive weight and DN label noise (with an SFT
    baseline that uses them too)."""
    script, arguments = SETTINGS[best]
    for suffix, extra in [("beta0", ["--beta", "0"]), ("mute0", ["--mute-fraction", "0"]),
                          ("beta0.06", ["--beta", "0.06"]), ("beta0.96", ["--beta", "0.96"]),
                          ("release", RELEASE)]:
        SETTINGS[f"{best}_{suffix}"] = (script, arguments + extra)
    reference = baseline(best)
    SETTINGS[f"{reference}_release"] = (SETTINGS[reference][0],
                                        SETTINGS[reference][1] + RELEASE)

COLUMNS = ["AP", "AP_base", "AP_novel", "duplicates"]


def flag_value(arguments: list[str], flag: str) -> str | None:
    """The value after `flag` in a command line, or None when the flag is absent."""
    return arguments[arguments.index(flag) + 1] if flag in arguments else None


def baseline(setting: str) -> str:
    """The SFT run a setting is compared with: the one that matches with the same cost (and
    uses the release's contrastive weight and DN noise where the setting does)."""
    arguments = SETTINGS[setting][1]
    binary = flag_value(arguments, "--match-cost") == "binary_focal"
    release = "_release" if all(flag in arguments for flag in RELEASE[::2]) else ""
    return ("sft_binary" if binary else "sft_focal") + release


add_ablations("detached_binary_0.1")      # chosen on dev with seeds 0-2 (README)


def run_folder(args, setting: str, seed: int) -> Path:
    return Path(args.out) / f"{setting}_seed{seed}"


def train_command(args, setting: str, seed: int) -> list[str]:
    script, extra = SETTINGS[setting]
    schedule = (["--epochs", str(args.epochs)] if script == "train_sft.py"
                else ["--sft-epochs", "1", "--grqo-epochs", str(args.epochs - 1)])
    folder = run_folder(args, setting, seed)
    # A run cut off (a session's end, a crash) continues from its last checkpoint, exactly.
    resume = ["--resume", str(folder / "last.pt")] if (folder / "last.pt").exists() else []
    return [sys.executable, str(ROOT / script), "--data", args.data, "--model", "tiny",
            "--seed", str(seed), "--eval-split", args.split, "--device", "cpu",
            "--out", str(folder), *schedule, *extra, *resume]


def gradient_command(args, setting: str, seed: int) -> list[str]:
    folder = run_folder(args, setting, seed)
    return [sys.executable, str(ROOT / "benchmarks" / "grqo_gradients.py"),
            "--ckpt", str(folder / "last.pt"), "--batches", str(args.gradient_batches),
            "--json", str(folder / "gradients.json")]


def held_by_another(folder: Path) -> int | None:
    """The id of another live sweep process that is running this folder's run (its
    `running` marker), else None: two sweeps on one OUT never train the same run twice."""
    try:
        owner = int((folder / "running").read_text())
        os.kill(owner, 0)                          # raises if no such process
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None                                # no marker, or a stale one
    except PermissionError:
        return owner
    return owner if owner != os.getpid() else None


def next_step(args, setting: str, seed: int) -> list[str] | None:
    """The command this run still needs (training, then for GRQO the gradient ratio), or
    None when it is finished, diverged or being run by another sweep."""
    folder = run_folder(args, setting, seed)
    if (folder / "diverged.txt").exists():
        return None
    owner = held_by_another(folder)
    if owner is not None:
        print(f"skip  {setting} seed {seed}: process {owner} is running it", flush=True)
        return None
    if not (folder / "metrics.json").exists():
        return train_command(args, setting, seed)
    if SETTINGS[setting][0] == "train_grqo.py" and not (folder / "gradients.json").exists():
        return gradient_command(args, setting, seed)
    return None


def run_all(args, jobs: list[tuple[str, int]]) -> None:
    """Two (args.jobs) at a time, one thread each; each job runs its steps in turn."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            command = next_step(args, *job)
            if command is None:
                continue
            folder = run_folder(args, *job)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "running").write_text(str(os.getpid()))
            name = "stdout.txt" if "train" in Path(command[1]).name else "gradients.txt"
            log = open(folder / name, "w")
            print(f"start {job[0]} seed {job[1]}: {Path(command[1]).name}", flush=True)
            running.append((job, log, subprocess.Popen(command, stdout=log,
                                                       stderr=subprocess.STDOUT, cwd=ROOT,
                                                       env=environment)))
        time.sleep(5)
        for item in list(running):
            job, log, process = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            folder = run_folder(args, *job)
            (folder / "running").unlink(missing_ok=True)
            if process.returncode != 0:
                reason = failure_reason(Path(log.name))
                if Path(log.name).name == "stdout.txt":
                    (folder / "diverged.txt").write_text(reason + "\n")
                print(f"stop  {job[0]} seed {job[1]}: {reason}", flush=True)
            else:
                print(f"done  {job[0]} seed {job[1]}", flush=True)
                pending.insert(0, job)            # its next step, if any, goes first
            write_summary(args)


def failure_reason(log_file: Path) -> str:
    """The line a run stopped with (e.g. "non-finite loss at step 812: ...")."""
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if "non-finite loss" in line or "Error" in line]
    return (named or lines or ["no output"])[-1][:300]


def last_epoch_reward(folder: Path) -> float | None:
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    last = max(line["epoch"] for line in lines)
    rewards = [line["grqo_reward"] for line in lines if line["epoch"] == last
               and "grqo_reward" in line]
    return statistics.mean(rewards) if rewards else None


def median_step_seconds(folder: Path) -> float:
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    grqo_lines = [line for line in lines if "grqo" in line]
    return statistics.median(line["step_seconds"] for line in (grqo_lines or lines))


def collect(args) -> list[dict]:
    """One row per run asked for or found in OUT (so a sweep of a few settings or seeds
    never drops the others' rows from the summary), in the order of seeds, then SETTINGS."""
    folders = [folder.name.rpartition("_seed") for folder in Path(args.out).glob("*_seed*")]
    found = {(setting, int(seed)) for setting, _, seed in folders
             if setting in SETTINGS and seed.isdigit()}
    wanted = found
    if not getattr(args, "summary", False):
        wanted = found | {(setting, seed) for setting in args.settings for seed in args.seeds}
    rows = []
    for seed in sorted({seed for _, seed in wanted}):
        for setting in [setting for setting in SETTINGS if (setting, seed) in wanted]:
            folder = run_folder(args, setting, seed)
            row = {"setting": setting, "seed": seed, "status": "not run"}
            if (folder / "log.jsonl").exists():
                steps = (folder / "log.jsonl").read_text().splitlines()
                last = json.loads(steps[-1])["step"] if steps else 0
                row["status"] = f"unfinished (logged to step {last})"
            if (folder / "diverged.txt").exists():
                row["status"] = "diverged: " + (folder / "diverged.txt").read_text().strip()
            elif (folder / "metrics.json").exists():
                metrics = json.loads((folder / "metrics.json").read_text())
                row.update({name: metrics.get(name) for name in COLUMNS}, status="done",
                           reward=last_epoch_reward(folder),
                           step_seconds=median_step_seconds(folder))
                if (folder / "gradients.json").exists():
                    medians = json.loads((folder / "gradients.json").read_text())["medians"]
                    row["gradient_ratio"] = medians["ratio"]
            rows.append(row)
    return rows


def write_summary(args) -> str:
    def cell(value, scale=1.0, digits=1):
        return "-" if value is None else f"{scale * value:.{digits}f}"

    rows = collect(args)
    lines = [f"split {args.split}, \"1+{args.epochs - 1}\" epochs (SFT: {args.epochs}); AP in "
             f"points; duplicates in % of detections >= 0.3; reward = mean over the last "
             f"epoch; ratio = |grad advantage term| / |grad supervised|",
             "",
             "| setting | seed | AP | AP_base | AP_novel | duplicates | reward | ratio | "
             "s/step | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        lines.append(
            f"| {row['setting']} | {row['seed']} | {cell(row.get('AP'), 100)} | "
            f"{cell(row.get('AP_base'), 100)} | {cell(row.get('AP_novel'), 100)} | "
            f"{cell(row.get('duplicates'), 100)} | {cell(row.get('reward'), 1, 2)} | "
            f"{cell(row.get('gradient_ratio'), 1, 4)} | {cell(row.get('step_seconds'), 1, 3)} "
            f"| {row['status']} |")
    table = "\n".join(lines + [""] + paired_table(rows))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "summary.md").write_text(table + "\n")
    Path(args.out, "summary.json").write_text(json.dumps(rows, indent=2))
    draw_figure(rows, Path(args.out, "ap_novel_vs_alpha.png"))
    return table


def paired_differences(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """setting -> metric -> [setting minus its baseline, per seed where both finished]."""
    done = {(row["setting"], row["seed"]): row for row in rows if row["status"] == "done"}
    differences = {}
    for (setting, seed), row in done.items():
        reference = done.get((baseline(setting), seed))
        if SETTINGS[setting][0] != "train_grqo.py" or reference is None:
            continue
        for metric in ["AP", "AP_base", "AP_novel"]:
            if row.get(metric) is not None and reference.get(metric) is not None:
                differences.setdefault(setting, {}).setdefault(metric, []).append(
                    100 * (row[metric] - reference[metric]))
    return differences


def paired_table(rows: list[dict]) -> list[str]:
    """Mean (+- std over seeds) of each setting's difference to its baseline, in AP points."""
    def cell(values):
        if not values:
            return "-"
        spread = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):+.1f}{spread}"

    lines = ["Paired with the SFT run of the same seed and matching cost (setting minus "
             "baseline, AP points, mean +- std over seeds):", "",
             "| setting | baseline | seeds | AP | AP_base | AP_novel |",
             "|---|---|---:|---:|---:|---:|"]
    for setting, metrics in paired_differences(rows).items():
        seeds = max(len(values) for values in metrics.values())
        lines.append(f"| {setting} | {baseline(setting)} | {seeds} | "
                     f"{cell(metrics.get('AP'))} | {cell(metrics.get('AP_base'))} | "
                     f"{cell(metrics.get('AP_novel'))} |")
    return lines


SERIES_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def alpha_series(rows: list[dict], metric: str = "AP_novel", seed: int = 0
                 ) -> dict[str, list[tuple]]:
    """"form, cost" -> [(alpha, `metric` in AP points)] of one seed, for the settings that
    differ only in form, cost and alpha (no ablations, no mixed costs), alpha > 0."""
    series = {}
    for row in rows:
        arguments = SETTINGS[row["setting"]][1]
        if (row["seed"] != seed or row["status"] != "done" or row.get(metric) is None
                or set(arguments[::2]) != {"--grqo-form", "--match-cost", "--alpha"}):
            continue
        alpha = float(flag_value(arguments, "--alpha"))
        if alpha > 0:
            key = f"{flag_value(arguments, '--grqo-form')}, {flag_value(arguments, '--match-cost')}"
            series.setdefault(key, []).append((alpha, 100 * row[metric]))
    return {key: sorted(points) for key, points in series.items()}


def draw_figure(rows: list[dict], path: Path, metric: str = "AP_novel", seed: int = 0) -> None:
    """`metric` against alpha (log scale) for one seed, one line per form and cost, the SFT
    baselines of the same seed as dashed lines: where GRQO acts and where it breaks. PIL
    only. Nothing to draw removes an old picture."""
    from PIL import Image, ImageDraw
    series = alpha_series(rows, metric, seed)
    sft = {row["setting"]: 100 * row[metric] for row in rows
           if row["setting"] in ("sft_focal", "sft_binary") and row["seed"] == seed
           and row["status"] == "done" and row.get(metric) is not None}
    if not series:
        path.unlink(missing_ok=True)
        return
    width, height, left, right, top, bottom = 720, 440, 60, 200, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    alphas = [alpha for points in series.values() for alpha, _ in points]
    low, high = math.floor(math.log10(min(alphas))), math.ceil(math.log10(max(alphas)))
    high = max(high, low + 1)
    top_value = max(5, 5 * math.ceil(max([v for pts in series.values() for _, v in pts]
                                         + list(sft.values())) / 5))

    def x(alpha):
        return left + (math.log10(alpha) - low) / (high - low) * (width - left - right)

    def y(value):
        return height - bottom - value / top_value * (height - top - bottom)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for exponent in range(low, high + 1):
        draw.line([x(10 ** exponent), height - bottom, x(10 ** exponent), height - bottom + 5],
                  fill="black")
        draw.text((x(10 ** exponent) - 10, height - bottom + 8), f"{10 ** exponent:g}",
                  fill="black")
    for value in range(0, top_value + 1, 5):
        draw.line([left - 5, y(value), left, y(value)], fill="black")
        draw.text((left - 25, y(value) - 6), f"{value}", fill="black")
    draw.text((left + 150, height - 22), "alpha (advantage weight, log scale)", fill="black")
    draw.text((left, 8), f"dev {metric} (AP points) after 1+5 epochs, seed {seed}",
              fill="black")
    legend = top + 5
    for (name, value), colour in zip(sft.items(), ["#555555", "#aaaaaa"]):
        for start in range(left, width - right, 12):                # dashed
            draw.line([start, y(value), min(start + 6, width - right), y(value)],
                      fill=colour, width=2)
        draw.text((width - right + 10, legend), f"-- {name} {value:.1f}", fill=colour)
        legend += 16
    for (name, points), colour in zip(series.items(), itertools.cycle(SERIES_COLOURS)):
        corners = [(x(alpha), y(value)) for alpha, value in points]
        if len(corners) > 1:
            draw.line(corners, fill=colour, width=2)
        for cx, cy in corners:
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((width - right + 10, legend), f"o {name}", fill=colour)
        legend += 16
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=COARSE, choices=list(SETTINGS),
                        help="default: the coarse settings (not the ablations)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--split", default="dev", help="dev: settings are chosen on it")
    parser.add_argument("--epochs", type=int, default=6, help="E: SFT E, GRQO 1 + (E - 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--gradient-batches", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/grqo_sweep_dev",
                        help="tracked by git, except checkpoints, pictures and stdout")
    parser.add_argument("--summary", action="store_true",
                        help="only print the table of the runs in OUT")
    args = parser.parse_args(argv)
    if not args.summary:
        run_all(args, [(setting, seed) for seed in args.seeds for setting in args.settings])
    print(write_summary(args))


if __name__ == "__main__":
    main()
