"""Where does GRQO act without hacking its reward? A sweep of form, cost and weight on `dev`.

    python benchmarks/grqo_sweep.py                                # the coarse sweep, seed 0
    python benchmarks/grqo_sweep.py --settings sft_binary pull_binary_1 --seeds 1 2
    python benchmarks/grqo_sweep.py --settings sft_binary_release detached_binary_0.1_beta0 ...
    python benchmarks/grqo_sweep.py --summary                      # the tables of what finished

Every setting is one run of the `tiny` preset on the shapes data, "1+5" epochs (train_sft.py
for 6 epochs for the SFT baselines), evaluated on `dev` (never `val`: settings are chosen
here). Runs go two at a time with one CPU thread each, in the order of SETTINGS (most
informative first), through benchmarks/runner.py: the raw runs in runs/grqo_sweep_dev/
(git-ignored), the summary in benchmarks/results/grqo_sweep_dev/ (`--out`; kept in git). A
finished run (in its folder or in the summary) is read back, not rerun, and a run cut off
continues from its last checkpoint, so the sweep resumes where it stopped; a run that
diverges is recorded with the message it stopped with.

Per run: AP, AP_base, AP_novel and `duplicates` (share of detections >= 0.3 repeating a
higher-scored one of the same prompt, IoU > 0.7) from the final evaluation; the mean reward
over the last epoch (a reward that runs away is the sign of hacking); the median seconds per
step; and, for GRQO runs, the ratio of the advantage term's gradient norm to the supervised
one on training batches of the final checkpoint (benchmarks/grqo_gradients.py). After every
finished run, OUT/summary.json (every run's row, the command, the commit) and OUT/summary.md
(the tables: the runs, each setting paired with its SFT baseline, AP_novel against alpha)
are written again; `--summary` prints the tables and writes nothing.
"""

import argparse
import functools
import statistics

import runner


def grqo(form: str, cost: str, alpha: float, reward_cost: str | None = None
         ) -> tuple[str, list[str]]:
    """A GRQO setting: train_grqo.py with this form, matching cost, alpha (and reward cost)."""
    extra = ["--reward-cost", reward_cost] if reward_cost else []
    return ("train_grqo.py",
            ["--grqo-form", form, "--match-cost", cost, "--alpha", str(alpha), *extra])


# name -> (script, arguments). Settings that match with the binary focal cost compare with
# sft_binary, the others with sft_focal (`baseline`). "mixed" matches with the focal cost
# (the better SFT) and rewards with the bounded binary focal cost. These are what a plain
# `python benchmarks/grqo_sweep.py` runs.
COARSE_SETTINGS = {
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
RELEASE = ["--contrastive-weight", "100", "--dn-label-noise", "0.5"]   # the release's values


def flag_value(arguments: list[str], flag: str) -> str | None:
    """The value after `flag` in a command line, or None when the flag is absent."""
    return arguments[arguments.index(flag) + 1] if flag in arguments else None


def baseline(arguments: list[str]) -> str:
    """The SFT setting a setting with these arguments is compared with: the one that matches
    with the same cost (and uses the release's contrastive weight and DN noise where the
    setting does)."""
    binary = flag_value(arguments, "--match-cost") == "binary_focal"
    release = "_release" if all(flag in arguments for flag in RELEASE[::2]) else ""
    return ("sft_binary" if binary else "sft_focal") + release


def ablations(best: str, settings: runner.Settings) -> runner.Settings:
    """The ablations of the `best` of `settings`: no KL, no muting, KL weight x0.25 and x4
    (of the default --beta 0.24), and the release's contrastive weight and DN label noise,
    with an SFT baseline that uses them too."""
    script, arguments = settings[best]
    table = {f"{best}_{suffix}": (script, arguments + extra)
             for suffix, extra in [("beta0", ["--beta", "0"]),
                                   ("mute0", ["--mute-fraction", "0"]),
                                   ("beta0.06", ["--beta", "0.06"]),
                                   ("beta0.96", ["--beta", "0.96"]), ("release", RELEASE)]}
    reference = baseline(arguments)
    table[f"{reference}_release"] = (settings[reference][0], settings[reference][1] + RELEASE)
    return table


# Every setting the sweep knows; detached_binary_0.1 was chosen on dev with seeds 0-2 (README).
SETTINGS = {**COARSE_SETTINGS, **ablations("detached_binary_0.1", COARSE_SETTINGS)}


def runs_table(study: runner.Study, rows: list[dict]) -> list[str]:
    """One line per run: its metrics in points, reward, gradient ratio, s/step and status."""
    def cell(value, scale=1.0, digits=1):
        return "-" if value is None else f"{scale * value:.{digits}f}"

    lines = [f"split {study.split}, \"1+{study.epochs - 1}\" epochs (SFT: {study.epochs}); AP "
             f"in points; duplicates in % of detections >= 0.3; reward = mean over the last "
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
    return lines


def paired_differences(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """setting -> metric -> [setting minus its baseline, per seed where both finished]."""
    done = {(row["setting"], row["seed"]): row for row in rows if row["status"] == "done"}
    differences = {}
    for (setting, seed), row in done.items():
        reference = done.get((baseline(SETTINGS[setting][1]), seed))
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
        lines.append(f"| {setting} | {baseline(SETTINGS[setting][1])} | {seeds} | "
                     f"{cell(metrics.get('AP'))} | {cell(metrics.get('AP_base'))} | "
                     f"{cell(metrics.get('AP_novel'))} |")
    return lines


def alpha_series(rows: list[dict], metric: str, seed: int) -> dict[str, dict[float, float]]:
    """"form, cost" -> {alpha: `metric` in AP points} of one seed, for the finished runs of
    the settings that differ only in form, cost and alpha (no ablations, no mixed costs)."""
    series = {}
    for row in rows:
        arguments = SETTINGS[row["setting"]][1]
        if (row["seed"] == seed and row["status"] == "done" and row.get(metric) is not None
                and set(arguments[::2]) == {"--grqo-form", "--match-cost", "--alpha"}):
            key = f"{flag_value(arguments, '--grqo-form')}, {flag_value(arguments, '--match-cost')}"
            series.setdefault(key, {})[float(flag_value(arguments, "--alpha"))] = \
                100 * row[metric]
    return series


def alpha_table(rows: list[dict], metric: str = "AP_novel", seed: int = 0) -> list[str]:
    """`metric` against alpha for one seed, a line per form and cost, beside the SFT
    baselines of that seed: where GRQO acts and where it breaks. No lines when no run fits."""
    series = alpha_series(rows, metric, seed)
    if not series:
        return []
    alphas = sorted({alpha for values in series.values() for alpha in values})
    baselines = [f"{row['setting']} {100 * row[metric]:.1f}" for row in rows
                 if row["setting"] in ("sft_focal", "sft_binary") and row["seed"] == seed
                 and row["status"] == "done" and row.get(metric) is not None]
    lines = [f"{metric} (AP points) against alpha, seed {seed}, the settings that differ only "
             f"in form, cost and alpha (SFT: {', '.join(baselines) or '-'}):", "",
             "| form, cost | " + " | ".join(f"alpha {alpha:g}" for alpha in alphas) + " |",
             "|---|" + "---:|" * len(alphas)]
    for key, values in series.items():
        cells = [f"{values[alpha]:.1f}" if alpha in values else "-" for alpha in alphas]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def summary_tables(study: runner.Study, rows: list[dict]) -> str:
    """The sweep's tables: the runs, the paired differences, AP_novel against alpha."""
    alpha = alpha_table(rows)
    return "\n".join(runs_table(study, rows) + [""] + paired_table(rows)
                     + ([""] + alpha if alpha else []))


def main(argv=None):
    """Runs what the settings and seeds asked for still need, prints the tables and writes
    OUT/summary.json and OUT/summary.md; with --summary, only prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(COARSE_SETTINGS),
                        choices=list(SETTINGS), help="default: the coarse settings (not the "
                                                     "ablations)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--gradient-batches", type=int, default=4)
    runner.add_arguments(parser, out="benchmarks/results/grqo_sweep_dev", split="dev",
                         epochs=6, device="cpu")
    args = parser.parse_args(argv)
    study = runner.study_from_arguments(args, SETTINGS, __file__, argv, args.gradient_batches)
    if args.summary:
        print(summary_tables(study, runner.collect(study, set())))
        return
    jobs = [(setting, seed) for seed in args.seeds for setting in args.settings]
    render = functools.partial(summary_tables, study)
    runner.run_all(study, jobs, args.jobs, args.threads, render)
    print(runner.report(study, set(jobs), render))


if __name__ == "__main__":
    main()
