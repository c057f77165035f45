"""Does GRQO beat SFT at equal compute, and what does it cost? (METHOD.md section 6)

    python benchmarks/sft_vs_grqo.py                       # 3 seeds, report on val
    python benchmarks/sft_vs_grqo.py --split dev           # for tuning (never tune on val)
    python benchmarks/sft_vs_grqo.py --variants sft grqo grqo_no_kl grqo_no_mute grqo_pg
    python benchmarks/sft_vs_grqo.py --setting detached_binary_0.1 --epochs 6 --seeds 0 1 2 3 4 \
        --out benchmarks/results/sft_vs_grqo_val     # a setting chosen on dev, against its SFT
    python benchmarks/sft_vs_grqo.py --setting detached_binary_0.1 --epochs 6 --seeds 0 1 2 3 4 \
        --out benchmarks/results/sft_vs_grqo_val --summary   # the tables, from what is recorded

On `shapes` with the `tiny` preset: SFT for E epochs against GRQO for 1 + (E - 1) epochs,
same data, same steps, same seeds; each evaluated with generic prompts. `--setting` takes a
setting of benchmarks/grqo_sweep.py (chosen there, on dev) and its SFT baseline (the same
matching cost). Prints a table of mean +- std over seeds of AP, AP50, AP_base, AP_novel, and
the median seconds per training step (GRQO: its GRQO epochs only) with the ratio to SFT; and
the paired differences, each variant minus the first (SFT) seed by seed.

The runs go through benchmarks/runner.py, as the sweep's do: `--out` is the study's summary
folder (default benchmarks/results/sft_vs_grqo_<split>_<E>ep; summary.json with every run's
row, the command and the commit, and summary.md with the tables), and the raw runs go to
runs/<name of OUT>/ (git-ignored; `--runs` to choose). A finished run, in its folder or only
in the summary, is read back and not rerun; a run cut off continues from its last.pt; a run
that fails is recorded with the line it stopped with, and the tables wait for it.

Runs go two at a time, each limited to one CPU thread, so that paired runs share the
machine under the same conditions ("side by side"); with a GPU, use --jobs 1.
"""

import argparse
import functools
import statistics
import sys
import time

import grqo_sweep
import runner

# name -> (script, extra arguments)
VARIANTS = {
    "sft": ("train_sft.py", []),
    "grqo": ("train_grqo.py", []),
    "grqo_no_kl": ("train_grqo.py", ["--beta", "0"]),
    "grqo_no_mute": ("train_grqo.py", ["--mute-fraction", "0"]),
    "grqo_pg": ("train_grqo.py", ["--grqo-form", "pg"]),
}
# Every run this benchmark can compare: its variants and the sweep's settings.
SETTINGS = {**VARIANTS, **grqo_sweep.SETTINGS}
METRICS = ["AP", "AP50", "AP_base", "AP_novel", "AP50_base", "AP50_novel"]
NOT_FINISHED = "Not finished:"      # how the tables start while runs they need are not done


def unfinished(rows: dict[tuple[str, int], dict], variants: list[str],
               seeds: list[int]) -> list[str]:
    """"variant seed K: status" for each run the comparison needs that is not done (a run
    `rows` lacks was not run)."""
    statuses = {(variant, seed): rows.get((variant, seed), {"status": "not run"})["status"]
                for seed in seeds for variant in variants}
    return [f"{variant} seed {seed}: {status}"
            for (variant, seed), status in statuses.items() if status != "done"]


def summarise(rows: dict[tuple[str, int], dict], variants: list[str], seeds: list[int]
              ) -> dict:
    """variant -> metric -> (mean, std, [per seed]) in AP points, and step_seconds: the median
    over seeds of each run's median step, from the finished runs' rows."""
    summary = {}
    for variant in variants:
        per_seed = [rows[(variant, seed)] for seed in seeds]
        row = {}
        for name in METRICS:       # a metric COCOeval could not compute (None) is left out
            by_seed = [None if run[name] is None else 100 * run[name] for run in per_seed]
            values = [value for value in by_seed if value is not None]
            row[name] = (statistics.mean(values) if values else float("nan"),
                         statistics.stdev(values) if len(values) > 1 else 0.0, by_seed)
        row["step_seconds"] = statistics.median(run["step_seconds"] for run in per_seed)
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
    """The table of paired_differences: mean ± std over seeds, and AP_novel seed by seed."""
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


def format_summary(summary: dict, study: runner.Study, seeds: list[int]) -> str:
    """The table of each variant's metrics and step time (x the first SFT variant's), then
    the paired differences."""
    header = ["variant"] + METRICS + ["s/step", "x SFT"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    sft = [variant for variant in summary if SETTINGS[variant][0] == "train_sft.py"]
    base = summary[sft[0]]["step_seconds"] if sft else None      # "x SFT": the first SFT
    for variant, row in summary.items():
        cells = [variant] + [f"{row[n][0]:.1f} ± {row[n][1]:.1f}" for n in METRICS]
        cells += [f"{row['step_seconds']:.3f}",
                  f"{row['step_seconds'] / base:.2f}" if base else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"split {study.split}, seeds {seeds}, {study.epochs} epochs "
            f"(GRQO 1 + {study.epochs - 1}); AP in points, mean ± std over seeds\n\n"
            + "\n".join(lines) + "\n\n" + format_paired(summary))


def comparison_tables(study: runner.Study, variants: list[str], seeds: list[int],
                      rows: list[dict]) -> str:
    """The tables of the comparison once every run it needs is done; until then, the
    runs that are not."""
    by_run = {(row["setting"], row["seed"]): row for row in rows}
    waiting = unfinished(by_run, variants, seeds)
    if waiting:
        return "\n".join([NOT_FINISHED, *waiting])
    return format_summary(summarise(by_run, variants, seeds), study, seeds)


def main(argv=None):
    """Runs what the comparison still needs (not with --summary), prints its tables, and
    writes OUT/summary.json and OUT/summary.md; exits 1 while a run it needs is not done."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["sft", "grqo"], choices=list(SETTINGS),
                        help="the first is the baseline of the paired differences")
    parser.add_argument("--setting", choices=list(grqo_sweep.SETTINGS),
                        help="a grqo_sweep.py setting against its SFT baseline (replaces "
                             "--variants)")
    runner.add_arguments(parser, out=None, split="val", epochs=12, device="auto")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further arguments for every training run")
    args = parser.parse_args(argv)
    variants = args.variants
    if args.setting:
        variants = [grqo_sweep.baseline(grqo_sweep.SETTINGS[args.setting][1]), args.setting]
    args.out = args.out or f"benchmarks/results/sft_vs_grqo_{args.split}_{args.epochs}ep"
    study = runner.study_from_arguments(args, SETTINGS, __file__, argv)
    jobs = [(variant, seed) for seed in args.seeds for variant in variants]
    render = functools.partial(comparison_tables, study, variants, args.seeds)
    started = time.time()
    if args.summary:
        tables = render(runner.collect(study, set(jobs)))
    else:
        runner.run_all(study, jobs, args.jobs, args.threads, render)
        tables = runner.report(study, set(jobs), render)
    print(tables)
    if tables.startswith(NOT_FINISHED):
        sys.exit(1)
    if not args.summary:
        print(f"wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
