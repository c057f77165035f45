"""GRQO where the paper claims its gain: fine-tune a pretrained detector, then detect
zero-shot in domains it never saw (METHOD.md section 6, the paper's Table 1 in small).

    python benchmarks/transfer.py                          # everything, seeds 0-2 first
    python benchmarks/transfer.py --seeds 0 --settings sft_focal release
    python benchmarks/transfer.py --summary                # the tables of what is recorded

Three stages, each a study of benchmarks/runner.py (summaries in benchmarks/results/
transfer_STAGE/, raw runs in runs/transfer_STAGE/), on the `tiny` preset:

1. pretrained: P, trained with text prompts (--prompts text) on the default shapes `train`
   for 12 epochs: Grounding DINO's role. Its visual prompt encoder is never trained.
2. finetune: from P (--init), on the default `train` with visual instructions, Objects365's
   role: SFT for 6 epochs against GRQO for 1 + 5, same data, steps and seed, each GRQO
   setting against the SFT run that matches with the same cost.
3. users: the same from P on the one domain with a `train` split (shapes:outlines), the
   custom data a user brings: what is gained there, what is forgotten on the default data.

Every fine-tuned model is evaluated with generic prompts (10 shots a class from the support
split) on every domain's `val` and on the default `val`, and with text prompts on the
default `val` (drift: against P's). P is evaluated with text prompts everywhere.

The project's criterion, stated before any result: GRQO gains when its paired mean over the
domains is at least +1.0 AP with the mean above its std over seeds 0-4, and the default
`val` AP_base is not worse than -0.5. Runs go two at a time with one CPU thread each.
"""

import argparse
import functools
import statistics
import sys
from pathlib import Path

import grqo_sweep
import runner

sys.path.insert(0, str(runner.ROOT))
from shapes import DOMAINS as ALL_DOMAINS, FAR_DOMAINS  # noqa: E402

# The domains this study was run on: the mild ones (the far domains are benchmarks/shift.py's).
DOMAINS = [domain for domain in ALL_DOMAINS if domain not in FAR_DOMAINS]

PRETRAINED = {"P": ("train_sft.py", ["--prompts", "text"])}
SETTINGS = {
    "sft_focal": ("train_sft.py", []),
    "sft_binary": ("train_sft.py", ["--match-cost", "binary_focal"]),
    "release": ("train_grqo.py", []),                 # alpha 0.01, the paper's form, focal
    "detached_binary_0.1": grqo_sweep.SETTINGS["detached_binary_0.1"],
    "anchored": ("train_grqo.py", ["--reference", "anchored"]),
    "kl_only": ("train_grqo.py", ["--alpha", "0"]),
    "advantage_only": ("train_grqo.py", ["--beta", "0"]),
}
FIRST_SEEDS_ONLY = {"kl_only", "advantage_only"}     # GRQO's two terms apart: seeds 0-2
USERS_DOMAIN = "outlines"


def evaluations(prompt: str) -> dict[str, list[str]]:
    """evaluate.py's arguments on every domain's val and the default val: DOMAIN_PROMPT ->
    arguments (generic: 10 shots a class from the support split)."""
    shots = ["--shots", "10"] if prompt == "generic" else []
    return {f"{name}_{prompt}": ["--data", data, "--split", "val", "--prompt", prompt, *shots]
            for name, data in [("default", "shapes")]
            + [(domain, f"shapes:{domain}") for domain in DOMAINS]}


def studies(args, argv) -> dict[str, runner.Study]:
    """The three stages; the fine-tuning ones start from P's last.pt."""
    def study(stage, settings, epochs, data, extra, evaluated):
        runs = f"{args.runs}_{stage}" if args.runs else None       # default runs/transfer_STAGE
        stage_args = argparse.Namespace(**{**vars(args), "out": f"{args.out}_{stage}",
                                           "runs": runs, "epochs": epochs, "data": data,
                                           "extra": extra})
        made = runner.study_from_arguments(stage_args, settings, __file__, argv)
        made.evaluations = evaluated
        return made

    pretrained = study("pretrained", PRETRAINED, 12, "shapes", [], evaluations("text"))
    start = ["--init", str(runner.run_folder(pretrained, "P", 0) / "last.pt")]
    tuned = {**evaluations("generic"), "default_text": evaluations("text")["default_text"]}
    return {"pretrained": pretrained,
            "finetune": study("finetune", SETTINGS, 6, "shapes", start, tuned),
            "users": study("users", SETTINGS, 6, f"shapes:{USERS_DOMAIN}", start, tuned)}


def jobs_of(settings: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    return [(setting, seed) for seed in seeds for setting in settings
            if seed < 3 or setting not in FIRST_SEEDS_ONLY]


# ----------------------------------------------------------------------------- tables

def ap(row: dict, evaluation: str, metric: str = "AP") -> float | None:
    """An evaluation's metric in AP points, or None."""
    value = row.get("evaluations", {}).get(evaluation, {}).get(metric)
    return None if value is None else 100 * value


def columns(row: dict, text_reference: float | None, prompt: str = "generic",
            trained_on: str | None = None) -> dict:
    """A run's numbers: default val AP / base / novel, each domain's AP, the mean over the
    domains (but `trained_on`, whose train split the users' stage fine-tunes on: "other
    domains" then), and the text AP on the default val retained from P's (%)."""
    numbers = {"AP": ap(row, f"default_{prompt}"),
               "AP_base": ap(row, f"default_{prompt}", "AP_base"),
               "AP_novel": ap(row, f"default_{prompt}", "AP_novel")}
    domains = {domain: ap(row, f"{domain}_{prompt}") for domain in DOMAINS}
    numbers.update(domains)
    unseen = [value for domain, value in domains.items() if domain != trained_on]
    numbers["other domains" if trained_on else "domains"] = (
        statistics.mean(unseen) if None not in unseen else None)
    text = ap(row, "default_text")
    numbers["text kept %"] = (100 * text / text_reference
                              if text is not None and text_reference else None)
    return numbers


def cell(values: list) -> str:
    """mean ± std of the known values, in one decimal."""
    known = [value for value in values if value is not None]
    if not known:
        return "-"
    spread = f" ± {statistics.stdev(known):.1f}" if len(known) > 1 else ""
    return f"{statistics.mean(known):.1f}{spread}"


def table(rows: list[dict], pretrained: dict | None, trained_on: str | None = None) -> list[str]:
    """Mean ± std over seeds per setting; P's row (text prompts) first; the domain trained on
    (the users' stage) in the first column."""
    reference = ap(pretrained, "default_text") if pretrained else None
    names = list(columns({}, None, trained_on=trained_on))
    if trained_on:
        names.remove(trained_on)
        names.insert(0, trained_on)
    lines = ["| run | seeds | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    if pretrained:
        numbers = columns(pretrained, reference, prompt="text", trained_on=trained_on)
        lines.append("| P (text prompts) | 1 | "
                     + " | ".join(cell([numbers[name]]) for name in names) + " |")
    for setting in SETTINGS:
        done = [row for row in rows if row["setting"] == setting and row["status"] == "done"]
        if done:
            numbers = [columns(row, reference, trained_on=trained_on) for row in done]
            lines.append(f"| {setting} | {len(done)} | "
                         + " | ".join(cell([n[name] for n in numbers]) for name in names) + " |")
    return lines


def paired(rows: list[dict], pretrained: dict | None, trained_on: str | None = None
           ) -> list[str]:
    """Each GRQO setting minus the SFT run of the same seed and matching cost: mean ± std
    over seeds of the differences, the gain per seed (over the domains; the users' stage: on
    the domain trained on, then over the others too), and the step-time ratio."""
    reference = ap(pretrained, "default_text") if pretrained else None
    done = {(row["setting"], row["seed"]): row for row in rows if row["status"] == "done"}
    gained = trained_on or "domains"
    names = [gained, *(["other domains"] if trained_on else []), "AP_base", "AP_novel",
             "text kept %"]
    lines = ["| setting | against | seeds | " + " | ".join(f"Δ {n}" for n in names)
             + f" | Δ {gained} per seed | step time ratio |",
             "|---|---|---:|" + "---:|" * (len(names) + 2)]
    for setting, (script, arguments) in SETTINGS.items():
        if script != "train_grqo.py":
            continue
        base = grqo_sweep.baseline(arguments)
        pairs = [(row, done[(base, seed)]) for (name, seed), row in sorted(done.items())
                 if name == setting and (base, seed) in done]
        if not pairs:
            continue
        numbers = [(columns(grqo, reference, trained_on=trained_on),
                    columns(sft, reference, trained_on=trained_on)) for grqo, sft in pairs]
        deltas = {name: [None if ours[name] is None or theirs[name] is None
                         else ours[name] - theirs[name] for ours, theirs in numbers]
                  for name in names}
        ratios = [a["step_seconds"] / b["step_seconds"] for a, b in pairs]
        per_seed = ", ".join("-" if d is None else f"{d:+.1f}" for d in deltas[gained])
        lines.append(f"| {setting} | {base} | {len(pairs)} | "
                     + " | ".join(cell(deltas[name]) for name in names)
                     + f" | {per_seed} | {statistics.median(ratios):.2f}x |")
    return lines


def render(stage: str, pretrained: dict | None, rows: list[dict]) -> str:
    """A stage's tables, for its summary.md and the screen."""
    if stage == "pretrained":
        return "\n".join(["P, text prompts on every val (AP points):", ""]
                         + table([], rows[0] if rows else None))
    trained_on = None if stage == "finetune" else USERS_DOMAIN
    return "\n".join(
        [f"{stage}: generic prompts, 10 shots a class (AP points, mean ± std over seeds):",
         "", *table(rows, pretrained, trained_on), "",
         "Paired by seed, GRQO minus its SFT baseline:", "",
         *paired(rows, pretrained, trained_on)])


def pretrained_row(study: runner.Study) -> dict | None:
    rows = [row for row in runner.collect(study, set()) if row["status"] == "done"]
    return rows[0] if rows else None


def main(argv=None):
    """Runs what each stage still needs (not with --summary), P first; prints the tables and
    writes each stage's summary; exits 1 while P is not done."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--stages", nargs="+", default=["finetune", "users"],
                        choices=["finetune", "users"], help="after P, which to run")
    runner.add_arguments(parser, out="benchmarks/results/transfer", split="val", epochs=6,
                         device="cpu")
    args = parser.parse_args(argv)
    stages = studies(args, argv)
    if not args.summary:
        runner.run_all(stages["pretrained"], [("P", 0)], 1, args.threads * 2,
                       functools.partial(render, "pretrained", None))
    pretrained = pretrained_row(stages["pretrained"])
    print(render("pretrained", None, [pretrained] if pretrained else []))
    if pretrained is None:
        print("P is not done yet: the fine-tuning stages start from it")
        sys.exit(1)
    batches = [seeds for seeds in ([s for s in args.seeds if s < 3],
                                   [s for s in args.seeds if s >= 3]) if seeds]
    for seeds in batches:                  # seeds 0-2 of every stage first, then 3-4
        for stage in args.stages:
            study, jobs = stages[stage], jobs_of(args.settings, seeds)
            show = functools.partial(render, stage, pretrained)
            if not args.summary:
                runner.run_all(study, jobs, args.jobs, args.threads, show)
                runner.report(study, set(jobs), show)
    for stage in args.stages:
        print()
        print(render(stage, pretrained, runner.collect(stages[stage], set())))


if __name__ == "__main__":
    main()
