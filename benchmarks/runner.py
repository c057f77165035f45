"""The runner that benchmarks/grqo_sweep.py and benchmarks/sft_vs_grqo.py share: it launches a
study's training runs, resumes them, reads them back and keeps the study's summary.

A study runs settings (name -> (training script, its arguments)) for some seeds, each with
the `tiny` preset on one split of the data, SFT for E epochs and GRQO for 1 + (E - 1) (or
S + (E - S), Study.grqo_sft_epochs). It has
two folders:

    --out benchmarks/results/NAME   the summary, kept in git: summary.json, summary.md
    --runs runs/NAME (the default)  the raw runs, git-ignored: one folder per run,
                                    SETTING_seedK/ with config.json, log.jsonl,
                                    metrics.json, last.pt, stdout.txt, launch.json and,
                                    for the GRQO runs of the sweep, gradients.json

so `--out benchmarks/results/sft_vs_grqo_val` trains in runs/sft_vs_grqo_val/ (under the
project's root, whatever the current folder), and `--out runs/NAME` keeps both in runs/NAME/.

summary.json is {"command", "commit", "runs"}: the invocation that last wrote it, `git
rev-parse HEAD` then, and one row per run that started: setting, seed, status ("done",
"unfinished (logged to step N)" or "diverged: " and the line the run stopped with), every
number and word of its metrics.json (per-class AP left out), reward (the mean over the last
epoch), step_seconds (the median; for GRQO runs, over their GRQO steps), gradient_ratio (GRQO
runs of the sweep: |grad advantage term| / |grad supervised|, benchmarks/grqo_gradients.py),
evaluations (a study's further evaluate.py runs on the trained model, each a name -> its
metrics), and the command and commit that first launched it (its launch.json). summary.md
holds the tables the benchmark prints.

A run is read from its folder when the folder holds a finished or diverged run, else from
summary.json: a run recorded only in the summary (its folder deleted) is reported and never
rerun. Runs go `jobs_at_once` at a time with `threads` CPU threads each; a run cut off
continues from its last.pt; a run that fails is recorded with the line it stopped with; a run
that another live process is running (its folder's `running` marker) is skipped.
"""

import json
import os
import shlex
import subprocess
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
Settings = dict[str, tuple[str, list[str]]]      # name -> (training script, its arguments)


@dataclass
class Study:
    """What a study runs and where its runs and its summary go."""
    settings: Settings
    results: Path                  # summary.json, summary.md
    runs: Path                     # the run folders, SETTING_seedK/
    split: str                     # the split every run is evaluated on
    epochs: int                    # SFT: epochs; GRQO: 1 + (epochs - 1)
    data: str = "shapes"
    device: str = "cpu"
    extra: list[str] = field(default_factory=list)   # further arguments of every run
    gradient_batches: int = 0      # > 0: measure each GRQO run's gradient ratio after training
    command: str = ""              # the invocation, recorded in summary.json and launch.json
    # Further evaluations of every finished run: name -> evaluate.py's arguments (beside
    # --ckpt and --out), written to the run's evaluation_NAME.json.
    evaluations: dict[str, list[str]] = field(default_factory=dict)
    grqo_sft_epochs: int = 1       # GRQO runs: this many SFT epochs, then GRQO to `epochs`


def add_arguments(parser, out: str | None, split: str, epochs: int, device: str) -> None:
    """The options both benchmarks take, with the defaults of the one that calls."""
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--split", default=split, help="dev for choosing, val for reporting")
    parser.add_argument("--epochs", type=int, default=epochs, help="E: SFT E, GRQO 1 + (E - 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--device", default=device)
    parser.add_argument("--out", default=out, help="the summary's folder (summary.json, "
                                                   "summary.md)")
    parser.add_argument("--runs", help="the run folders' parent; default runs/<name of OUT> "
                                       "under the project's root")
    parser.add_argument("--summary", action="store_true",
                        help="only print the tables of the runs recorded (in RUNS, then in "
                             "OUT/summary.json); run nothing, write nothing")


def study_from_arguments(args, settings: Settings, script: str, argv: list[str] | None,
                         gradient_batches: int = 0) -> Study:
    """The study that parsed options (add_arguments) describe; `script` and `argv` (None: this
    process's) make the command recorded in summary.json."""
    results = Path(args.out).resolve()
    runs = Path(args.runs).resolve() if args.runs else ROOT / "runs" / results.name
    argv = sys.argv[1:] if argv is None else argv
    return Study(settings, results, runs, args.split, args.epochs, args.data, args.device,
                 list(getattr(args, "extra", [])), gradient_batches,
                 shlex.join(["python", f"benchmarks/{Path(script).name}", *argv]))


def git_commit() -> str | None:
    """`git rev-parse HEAD` of the project, or None outside a git checkout."""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def run_folder(study: Study, setting: str, seed: int) -> Path:
    """RUNS/SETTING_seedK: where a run's training writes."""
    return study.runs / f"{setting}_seed{seed}"


def is_grqo(study: Study, setting: str) -> bool:
    """Whether a setting trains with train_grqo.py (S + (E - S) epochs) or SFT."""
    return study.settings[setting][0] == "train_grqo.py"


def train_command(study: Study, setting: str, seed: int) -> list[str]:
    """The training command of a run; one cut off (its last.pt) continues, exactly."""
    script, arguments = study.settings[setting]
    schedule = (["--sft-epochs", str(study.grqo_sft_epochs),
                 "--grqo-epochs", str(study.epochs - study.grqo_sft_epochs)]
                if is_grqo(study, setting) else ["--epochs", str(study.epochs)])
    folder = run_folder(study, setting, seed)
    resume = ["--resume", str(folder / "last.pt")] if (folder / "last.pt").exists() else []
    return [sys.executable, str(ROOT / script), "--data", study.data, "--model", "tiny",
            "--seed", str(seed), "--eval-split", study.split, "--device", study.device,
            "--out", str(folder), *schedule, *arguments, *study.extra, *resume]


def gradient_command(study: Study, setting: str, seed: int) -> list[str]:
    """benchmarks/grqo_gradients.py on a run's last.pt, writing its gradients.json."""
    folder = run_folder(study, setting, seed)
    return [sys.executable, str(ROOT / "benchmarks" / "grqo_gradients.py"),
            "--ckpt", str(folder / "last.pt"), "--batches", str(study.gradient_batches),
            "--json", str(folder / "gradients.json")]


def evaluate_command(study: Study, setting: str, seed: int, name: str) -> list[str]:
    """evaluate.py on a run's last.pt, as study.evaluations[name] says."""
    folder = run_folder(study, setting, seed)
    return [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", str(folder / "last.pt"),
            "--out", str(folder / f"evaluation_{name}.json"), *study.evaluations[name]]


def held_by_another(folder: Path) -> int | None:
    """The id of another live process that is running this folder's run (its `running`
    marker), else None: two benchmarks on one study never train the same run twice."""
    try:
        owner = int((folder / "running").read_text())
        os.kill(owner, 0)                          # raises if no such process
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None                                # no marker, or a stale one
    except PermissionError:
        return owner
    return owner if owner != os.getpid() else None


def read_log(folder: Path) -> list[dict]:
    """The lines of a run's log.jsonl."""
    text = (folder / "log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def last_epoch_reward(lines: list[dict]) -> float | None:
    """The mean GRQO reward over the last epoch logged; None for SFT."""
    if not lines:
        return None
    last = max(line["epoch"] for line in lines)
    rewards = [line["grqo_reward"] for line in lines
               if line["epoch"] == last and "grqo_reward" in line]
    return statistics.mean(rewards) if rewards else None


def median_step_seconds(lines: list[dict]) -> float:
    """The median seconds per step; a GRQO run's over its GRQO steps only."""
    grqo_lines = [line for line in lines if "grqo" in line]
    return statistics.median(line["step_seconds"] for line in (grqo_lines or lines))


def folder_row(folder: Path) -> dict:
    """A run's state as its folder tells it (see the module docstring for the fields)."""
    row, lines = {"status": "not run"}, []
    if (folder / "log.jsonl").exists():
        lines = read_log(folder)
        row["status"] = f"unfinished (logged to step {lines[-1]['step'] if lines else 0})"
    if (folder / "diverged.txt").exists():
        row["status"] = "diverged: " + (folder / "diverged.txt").read_text().strip()
    elif (folder / "metrics.json").exists():
        metrics = json.loads((folder / "metrics.json").read_text())
        row.update({name: value for name, value in metrics.items()
                    if not isinstance(value, (dict, list))})
        row.update(status="done", reward=last_epoch_reward(lines),
                   step_seconds=median_step_seconds(lines))
        if (folder / "gradients.json").exists():
            medians = json.loads((folder / "gradients.json").read_text())["medians"]
            row["gradient_ratio"] = medians["ratio"]
        evaluations = {path.stem.removeprefix("evaluation_"): {
            name: value for name, value in json.loads(path.read_text()).items()
            if not isinstance(value, (dict, list))}
            for path in sorted(folder.glob("evaluation_*.json"))}
        if evaluations:
            row["evaluations"] = evaluations
    if (folder / "launch.json").exists():
        row.update(json.loads((folder / "launch.json").read_text()))
    return row


def settled(row: dict) -> bool:
    """Finished or diverged: nothing more to run."""
    return row["status"] == "done" or row["status"].startswith("diverged")


def committed_rows(study: Study) -> dict[tuple[str, int], dict]:
    """The rows of OUT/summary.json by (setting, seed); none before the first summary."""
    path = study.results / "summary.json"
    if not path.exists():
        return {}
    return {(row["setting"], row["seed"]): row for row in json.loads(path.read_text())["runs"]}


def read_run(study: Study, setting: str, seed: int,
             committed: dict[tuple[str, int], dict]) -> dict:
    """A run's row: from its folder when that holds a finished or diverged run, else from
    the summary when that does, else from the folder (unfinished, or not run)."""
    row = {"setting": setting, "seed": seed, **folder_row(run_folder(study, setting, seed))}
    recorded = committed.get((setting, seed))
    return recorded if recorded and settled(recorded) and not settled(row) else row


def collect(study: Study, asked: set[tuple[str, int]]) -> list[dict]:
    """One row per run found (a folder in RUNS, a row in OUT/summary.json) or asked for, in
    the order of seeds, then of the settings table; settings the table lacks are left out."""
    committed = committed_rows(study)
    folders = [folder.name.rpartition("_seed") for folder in study.runs.glob("*_seed*")]
    found = {(setting, int(seed)) for setting, _, seed in folders if seed.isdigit()}
    wanted = {run for run in found | set(committed) | asked if run[0] in study.settings}
    return [read_run(study, setting, seed, committed)
            for seed in sorted({seed for _, seed in wanted})
            for setting in study.settings if (setting, seed) in wanted]


def report(study: Study, asked: set[tuple[str, int]],
           render: Callable[[list[dict]], str]) -> str:
    """Writes OUT/summary.json (this invocation, HEAD, and the row of every run found or
    asked for that started) and OUT/summary.md (`render` of those rows and of the runs asked
    for that did not start); returns the latter."""
    rows = collect(study, asked)
    tables = render(rows)
    study.results.mkdir(parents=True, exist_ok=True)
    started = [row for row in rows if row["status"] != "not run"]
    (study.results / "summary.json").write_text(json.dumps(
        {"command": study.command, "commit": git_commit(), "runs": started}, indent=2) + "\n")
    (study.results / "summary.md").write_text(tables + "\n")
    return tables


def next_step(study: Study, setting: str, seed: int) -> list[str] | None:
    """The command this run still needs (training, then for a GRQO run of a study that
    measures gradients, the gradient ratio), or None when it is finished (in its folder or in
    OUT/summary.json), diverged, or being run by another process."""
    row = read_run(study, setting, seed, committed_rows(study))
    folder = run_folder(study, setting, seed)
    if row["status"].startswith("diverged"):
        return None
    owner = held_by_another(folder)
    if owner is not None:
        print(f"skip  {setting} seed {seed}: process {owner} is running it", flush=True)
        return None
    if row["status"] != "done":
        return train_command(study, setting, seed)
    if (study.gradient_batches and is_grqo(study, setting)
            and row.get("gradient_ratio") is None and (folder / "last.pt").exists()):
        return gradient_command(study, setting, seed)
    missing = [name for name in study.evaluations if name not in row.get("evaluations", {})]
    if missing and (folder / "last.pt").exists():
        return evaluate_command(study, setting, seed, missing[0])
    return None


def launch(study: Study, job: tuple[str, int], command: list[str], environment: dict):
    """Starts one step of a run: marks its folder `running` with this process's id, records
    the invocation and commit of the run's first launch (launch.json), and sends the step's
    output to stdout.txt (training) or gradients.txt. Returns (job, log file, process)."""
    folder = run_folder(study, *job)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "running").write_text(str(os.getpid()))
    if not (folder / "launch.json").exists():
        (folder / "launch.json").write_text(json.dumps(
            {"command": study.command, "commit": git_commit()}) + "\n")
    script = Path(command[1]).name
    logs = {"grqo_gradients.py": "gradients.txt", "evaluate.py": "evaluate.txt"}
    log = open(folder / logs.get(script, "stdout.txt"), "w")
    print(f"start {job[0]} seed {job[1]}: {script}", flush=True)
    return job, log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env=environment)


def finish(study: Study, job: tuple[str, int], log, process) -> bool:
    """Closes a step that ended and removes the `running` marker; a training stopped by a
    non-finite loss is recorded in diverged.txt with the line it stopped with and never
    rerun; any other failure (killed, out of memory, a bad flag) is printed, and the run
    continues from its last.pt on the next invocation. True when the step succeeded."""
    log.close()
    folder = run_folder(study, *job)
    (folder / "running").unlink(missing_ok=True)
    if process.returncode == 0:
        print(f"done  {job[0]} seed {job[1]}", flush=True)
        return True
    reason = failure_reason(Path(log.name))
    if Path(log.name).name == "stdout.txt" and "non-finite loss" in reason:
        (folder / "diverged.txt").write_text(reason + "\n")
        print(f"stop  {job[0]} seed {job[1]}: diverged: {reason}", flush=True)
    else:
        print(f"stop  {job[0]} seed {job[1]}: failed, resumes on the next invocation: "
              f"{reason}", flush=True)
    return False


def failure_reason(log_file: Path) -> str:
    """The line a run stopped with (e.g. "non-finite loss at step 812: ...")."""
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if "non-finite loss" in line or "Error" in line]
    return (named or lines or ["no output"])[-1][:300]


def run_all(study: Study, jobs: list[tuple[str, int]], jobs_at_once: int, threads: int,
            render: Callable[[list[dict]], str]) -> None:
    """Runs what each (setting, seed) job still needs (next_step), in order, `jobs_at_once` at
    a time with `threads` CPU threads each; after every step that ends, writes the summary
    (report, with `render`)."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < jobs_at_once:
            job = pending.pop(0)
            command = next_step(study, *job)
            if command is not None:
                running.append(launch(study, job, command, environment))
        if running:
            time.sleep(2)
        for item in [item for item in running if item[2].poll() is not None]:
            running.remove(item)
            if finish(study, *item):
                pending.insert(0, item[0])            # its next step, if any, goes first
            report(study, set(jobs), render)
