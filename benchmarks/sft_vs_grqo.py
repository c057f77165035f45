"""Does GRQO beat SFT at equal compute, and what does it cost? (METHOD.md section 6)

    python benchmarks/sft_vs_grqo.py                       # 3 seeds, report on val
    python benchmarks/sft_vs_grqo.py --split dev           # for tuning (never tune on val)
    python benchmarks/sft_vs_grqo.py --variants sft grqo grqo_no_kl grqo_no_mute grqo_pg
    python benchmarks/sft_vs_grqo.py --setting detached_binary_0.1 --epochs 6 --seeds 0 1 2 3 4 \
        --out benchmarks/results/sft_vs_grqo_val     # a setting chosen on dev, against its SFT

On `shapes` with the `tiny` preset: SFT for E epochs against GRQO for 1 + (E - 1) epochs,
same data, same steps, same seeds; each evaluated with generic prompts. `--setting` takes a
setting of benchmarks/grqo_sweep.py (chosen there, on dev) and its SFT baseline (the same
matching cost). Prints and writes a table of mean +- std over seeds of AP, AP50, AP_base,
AP_novel, and the median seconds per training step (GRQO: its GRQO epochs only) with the
ratio to SFT; and the paired differences, each variant minus the first (SFT) seed by seed.
A finished run is read back, and a run cut off continues from its last.pt.

Runs go two at a time, each limited to one CPU thread, so that paired runs share the
machine under the same conditions ("side by side"); with a GPU, use --jobs 1.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (script, extra arguments)
VARIANTS = {
    "sft": ("train_sft.py", []),
    "grqo": ("train_grqo.py", []),
    "grqo_no_kl": ("train_grqo.py", ["--beta", "0"]),
    "grqo_no_mute": ("train_grqo.py", ["--mute-fraction", "0"]),
    "grqo_pg": ("train_grqo.py", ["--grqo-form", "pg"]),
}
METRICS = ["AP", "AP50", "AP_base", "AP_novel", "AP50_base", "AP50_novel"]


def command(variant: str, seed: int, args) -> list[str]:
    script, extra = VARIANTS[variant]
    schedule = (["--epochs", str(args.epochs)] if script == "train_sft.py"
                else ["--sft-epochs", "1", "--grqo-epochs", str(args.epochs - 1)])
    folder = run_folder(args, variant, seed)
    resume = ["--resume", str(folder / "last.pt")] if (folder / "last.pt").exists() else []
    return [sys.executable, str(ROOT / script), "--data", args.data, "--model", "tiny",
            "--seed", str(seed), "--eval-split", args.split, "--device", args.device,
            "--out", str(folder), *schedule, *extra, *args.extra, *resume]


def use_sweep_setting(setting: str) -> list[str]:
    """Adds a grqo_sweep.py setting and its SFT baseline to VARIANTS; returns their names,
    baseline first."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grqo_sweep
    if setting not in grqo_sweep.SETTINGS:
        raise SystemExit(f"unknown setting {setting!r}; grqo_sweep.py has: "
                         + ", ".join(grqo_sweep.SETTINGS))
    reference = grqo_sweep.baseline(setting)
    VARIANTS.update({name: grqo_sweep.SETTINGS[name] for name in (reference, setting)})
    return [reference, setting]


def run_folder(args, variant: str, seed: int) -> Path:
    return Path(args.out) / f"{variant}_seed{seed}"


def run_all(jobs: list[tuple[str, int]], args) -> None:
    """Run the jobs `args.jobs` at a time; skip those already finished (metrics.json)."""
    pending = [job for job in jobs if not (run_folder(args, *job) / "metrics.json").exists()]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            variant, seed = pending.pop(0)
            folder = run_folder(args, variant, seed)
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "stdout.txt", "w")
            print(f"start {variant} seed {seed}", flush=True)
            running.append((variant, seed, log, subprocess.Popen(
                command(variant, seed, args), stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT, env=environment)))
        time.sleep(2)
        for item in list(running):
            variant, seed, log, process = item
            if process.poll() is not None:
                log.close()
                running.remove(item)
                if process.returncode != 0:
                    raise SystemExit(f"{variant} seed {seed} failed; see "
                                     f"{run_folder(args, variant, seed) / 'stdout.txt'}")
                print(f"done  {variant} seed {seed}", flush=True)


def median_step_seconds(folder: Path, grqo_only: bool) -> float:
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    if grqo_only:
        lines = [line for line in lines if "grqo" in line]
    return statistics.median(line["step_seconds"] for line in lines)


def summarise(args) -> dict:
    summary = {}
    for variant in args.variants:
        per_seed = [json.loads((run_folder(args, variant, seed) / "metrics.json").read_text())
                    for seed in args.seeds]
        row = {}
        for name in METRICS:       # a metric COCOeval could not compute (None) is left out
            by_seed = [None if m[name] is None else 100 * m[name] for m in per_seed]
            values = [value for value in by_seed if value is not None]
            row[name] = (statistics.mean(values) if values else float("nan"),
                         statistics.stdev(values) if len(values) > 1 else 0.0, by_seed)
        grqo = VARIANTS[variant][0] == "train_grqo.py"
        steps = [median_step_seconds(run_folder(args, variant, seed), grqo)
                 for seed in args.seeds]
        row["step_seconds"] = statistics.median(steps)
        summary[variant] = row
    return summary


def paired_differences(summary: dict) -> dict[str, dict[str, list[float]]]:
    """variant -> metric -> [variant minus the first variant, seed by seed], AP points; a
    seed where either could not compute the metric is left out."""
    first, *others = list(summary)
    differences = {}
    for variant in others:
        for name in ["AP", "AP_base", "AP_novel"]:
            pairs = zip(summary[variant][name][2], summary[first][name][2])   # by seed
            differences.setdefault(variant, {})[name] = [
                ours - theirs for ours, theirs in pairs
                if ours is not None and theirs is not None]
    return differences


def format_paired(summary: dict) -> str:
    def cell(values):
        if not values:
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):+.1f} ± {spread:.1f}"

    first = list(summary)[0]
    lines = [f"Paired by seed, each variant minus {first} (AP points, mean ± std over the "
             f"seeds' differences; per seed in brackets):", "",
             "| variant | AP | AP_base | AP_novel | AP_novel per seed |", "|---|---|---|---|---|"]
    for variant, metrics in paired_differences(summary).items():
        per_seed = ", ".join(f"{value:+.1f}" for value in metrics["AP_novel"])
        lines.append(f"| {variant} | {cell(metrics['AP'])} | {cell(metrics['AP_base'])} | "
                     f"{cell(metrics['AP_novel'])} | [{per_seed}] |")
    return "\n".join(lines)


def format_summary(summary: dict, args) -> str:
    header = ["variant"] + METRICS + ["s/step", "x SFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sft = [variant for variant in summary if VARIANTS[variant][0] == "train_sft.py"]
    base = summary[sft[0]]["step_seconds"] if sft else None      # "x SFT": the first SFT
    for variant, row in summary.items():
        cells = [variant] + [f"{row[n][0]:.1f} ± {row[n][1]:.1f}" for n in METRICS]
        cells += [f"{row['step_seconds']:.3f}",
                  f"{row['step_seconds'] / base:.2f}" if base else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"split {args.split}, seeds {args.seeds}, {args.epochs} epochs "
            f"(GRQO 1 + {args.epochs - 1}); AP in points, mean ± std over seeds\n\n"
            + "\n".join(lines) + "\n\n" + format_paired(summary))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="shapes")
    parser.add_argument("--split", default="val", help="dev for tuning, val for reporting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12, help="E: SFT E, GRQO 1 + (E - 1)")
    parser.add_argument("--variants", nargs="+", default=["sft", "grqo"], choices=list(VARIANTS),
                        help="the first is the baseline of the paired differences")
    parser.add_argument("--setting", help="a grqo_sweep.py setting against its SFT baseline "
                                          "(replaces --variants)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="default runs/benchmark_<split>_<epochs>ep (finished "
                                      "runs in it are read back, so never mix splits)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further arguments for every training run")
    args = parser.parse_args(argv)
    if args.setting:
        args.variants = use_sweep_setting(args.setting)
    args.out = args.out or f"runs/benchmark_{args.split}_{args.epochs}ep"
    started = time.time()
    run_all([(variant, seed) for seed in args.seeds for variant in args.variants], args)
    summary = summarise(args)
    table = format_summary(summary, args)
    print(table)
    print(f"wall time {time.time() - started:.0f} s")
    name = f"summary_{args.split}_{'_'.join(args.variants)}"
    Path(args.out, f"{name}.md").write_text(table + "\n")
    Path(args.out, f"{name}.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
