"""When does GRQO help? Fine-tuning across a large domain shift, against the shift's size.

    python benchmarks/shift.py                             # the P's and fine-tuning runs
    python benchmarks/shift.py --stages ablations          # once those are done
    python benchmarks/shift.py --stages pretrained         # the two starting points only
    python benchmarks/shift.py --seeds 0 1 2 --targets cells parts
    python benchmarks/shift.py --summary                   # the tables of what is recorded

Stages, each a study of benchmarks/runner.py (raw runs in runs/shift_*, summaries in
benchmarks/results/shift/), on the `tiny` preset:

1. pretrained: the two starting points, seed 0. P_visual is the main job (train_grqo.py, SFT
   1 + GRQO 11, visual prompts); P_text trains 12 SFT epochs with text prompts (the transfer
   study's P, Grounding DINO's role). Each is evaluated zero-shot on every domain's `val` and
   the default `val`: P_visual with generic prompts (10 shots a class from that data's support
   split), P_text with text prompts (its visual prompt encoder never trained). That AP is how
   far a domain is from the start: the lower, the farther.
2. finetune: from each P (--init), on each target (the far domains and `outlines`, the mild
   shift already measured from P_text): SFT for 6 epochs against GRQO for 0 + 6 at
   train_grqo.py's defaults (the release's alpha and beta), paired seeds 0-4. Every run is
   evaluated with generic prompts on every domain's `val` and the default `val`: the target
   (learned), the default (forgotten) and the others (transfer).
3. ablations: on the target and P with the largest paired gain when the stage runs (run it
   once seeds 0-4 of every target are done, so that the choice does not move), GRQO's terms
   apart (kl_only, advantage_only, seeds 0-2) and SFT with a plain L2 pull of the weights
   toward P (`--init-l2`, the simplest trust region), so that what GRQO adds beyond "stay
   near the start" is measured.

The criterion, stated before any result: GRQO gains on a target where the paired mean of
GRQO minus SFT on the target's `val` is at least +1.0 AP and above its std over seeds 0-4.
Runs go two at a time with one CPU thread each; a run cut off continues from its last.pt and
a finished one is read back, never rerun.
"""

import argparse
import statistics
import sys
from pathlib import Path

import runner
from transfer import cell      # mean ± std of the known values, one decimal

sys.path.insert(0, str(runner.ROOT))
from shapes import DOMAINS, FAR_DOMAINS  # noqa: E402

RESULTS = runner.ROOT / "benchmarks" / "results" / "shift"
STARTS = {"P_visual": ("train_grqo.py", []),
          "P_text": ("train_sft.py", ["--prompts", "text"])}
START_PROMPT = {"P_visual": "generic", "P_text": "text"}
MILD_TARGET = "outlines"
TARGETS = (*FAR_DOMAINS, MILD_TARGET)
SETTINGS = {"sft": ("train_sft.py", []), "grqo": ("train_grqo.py", [])}
# --init-l2 0.1: L2-SP's weight for the pretrained part (Li et al., 2018), chosen before any run.
ABLATIONS = {"kl_only": ("train_grqo.py", ["--alpha", "0"]),
             "advantage_only": ("train_grqo.py", ["--beta", "0"]),
             "sft_l2": ("train_sft.py", ["--init-l2", "0.1"])}
ABLATION_SEEDS = {"kl_only": [0, 1, 2], "advantage_only": [0, 1, 2], "sft_l2": [0, 1, 2, 3, 4]}
GAIN = 1.0                                       # AP points, and above the std over seeds


def evaluations(prompt: str) -> dict[str, list[str]]:
    """evaluate.py's arguments on every domain's val and the default val, by name."""
    shots = ["--shots", "10"] if prompt == "generic" else []
    return {name: ["--data", data, "--split", "val", "--prompt", prompt, *shots]
            for name, data in [("default", "shapes")]
            + [(domain, f"shapes:{domain}") for domain in DOMAINS]}


def make_study(args, argv, name: str, settings: runner.Settings, epochs: int, data: str,
               extra: list[str], prompt: str) -> runner.Study:
    """One study: runs in RUNS_NAME (default runs/shift_NAME), summary in OUT/NAME."""
    study_args = argparse.Namespace(**{
        **vars(args), "out": str(Path(args.out) / name), "epochs": epochs, "data": data,
        "extra": extra, "split": "val",
        "runs": str(Path(args.runs) / name) if args.runs else str(
            runner.ROOT / "runs" / f"shift_{name}")})
    study = runner.study_from_arguments(study_args, settings, __file__, argv)
    study.evaluations = evaluations(prompt)
    study.grqo_sft_epochs = 1 if name.startswith("pretrained") else 0
    return study


def starts(args, argv) -> dict[str, runner.Study]:
    """P -> the study that trains it (12 epochs on the default train split, seed 0)."""
    return {start: make_study(args, argv, f"pretrained_{start}", {start: STARTS[start]}, 12,
                              "shapes", [], START_PROMPT[start]) for start in STARTS}


def finetunes(args, argv) -> dict:
    """(P, target) -> the study of fine-tuning P on the target's train split: SFT and GRQO,
    and the ablations (run only where the gain is largest)."""
    made = {}
    for start, study in starts(args, argv).items():
        init = ["--init", str(runner.run_folder(study, start, 0) / "last.pt")]
        for target in TARGETS:
            made[start, target] = make_study(args, argv, f"{start}_{target}",
                                             {**SETTINGS, **ABLATIONS}, 6, f"shapes:{target}",
                                             init, "generic")
    return made


# ----------------------------------------------------------------------------- tables

def ap(row: dict | None, evaluation: str) -> float | None:
    """An evaluation's AP in points, or None."""
    value = (row or {}).get("evaluations", {}).get(evaluation, {}).get("AP")
    return None if value is None else 100 * value


def done_rows(study: runner.Study) -> dict[tuple[str, int], dict]:
    """The finished runs of a study by (setting, seed)."""
    return {(row["setting"], row["seed"]): row for row in runner.collect(study, set())
            if row["status"] == "done"}


def differences(study: runner.Study, target: str, setting: str = "grqo",
                against: str = "sft") -> dict[str, list[float]]:
    """Per seed, `setting` minus `against` (same seed) on the target, the default val and
    the mean of the other domains."""
    rows = done_rows(study)
    found = {"target": [], "default": [], "others": [], "seeds": []}
    for (name, seed), row in sorted(rows.items()):
        base = rows.get((against, seed))
        if name != setting or base is None:
            continue
        others = [domain for domain in DOMAINS if domain != target]
        values = [ap(row, target), ap(base, target), ap(row, "default"), ap(base, "default")]
        other = [ap(row, domain) for domain in others] + [ap(base, domain) for domain in others]
        if None in values or None in other:
            continue
        found["target"].append(values[0] - values[1])
        found["default"].append(values[2] - values[3])
        found["others"].append(statistics.mean(other[:len(others)])
                               - statistics.mean(other[len(others):]))
        found["seeds"].append(seed)
    return found


def gains(deltas: list[float]) -> bool:
    """The criterion: a paired mean of at least GAIN AP, above its std over the seeds."""
    if len(deltas) < 2:
        return False
    mean = statistics.mean(deltas)
    return mean >= GAIN and mean > statistics.stdev(deltas)


def distance_table(pretrained: dict[str, runner.Study]) -> list[str]:
    """Each P's zero-shot AP on every val: the distance of each domain from the start."""
    names = ["default", *DOMAINS]
    lines = ["| start (prompts) | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for start, study in pretrained.items():
        row = done_rows(study).get((start, 0))
        lines.append(f"| {start} ({START_PROMPT[start]}) | "
                     + " | ".join(cell([ap(row, name)]) for name in names) + " |")
    return lines


def shift_table(start: str, pretrained: runner.Study, tuned: dict) -> list[str]:
    """Rows = targets ordered by P's zero-shot AP (farthest first); GRQO minus SFT."""
    zero_shot = done_rows(pretrained).get((start, 0))
    order = sorted((target for (p, target) in tuned if p == start),
                   key=lambda target: ap(zero_shot, target) if ap(zero_shot, target)
                   is not None else float("inf"))
    lines = [f"From {start}, GRQO 0+6 minus SFT 6 (AP points, paired by seed):", "",
             "| target | P's zero-shot AP | SFT on target | seeds | Δ target | Δ target per seed "
             "| Δ default val | Δ other domains | gain |",
             "|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for target in order:
        study = tuned[start, target]
        found = differences(study, target)
        sft = [ap(row, target) for (name, _), row in done_rows(study).items() if name == "sft"]
        per_seed = ", ".join(f"{value:+.1f}" for value in found["target"]) or "-"
        lines.append(f"| {target} | {cell([ap(zero_shot, target)])} | {cell(sft)} | "
                     f"{len(found['target'])} | {cell(found['target'])} | {per_seed} | "
                     f"{cell(found['default'])} | {cell(found['others'])} | "
                     f"{'yes' if gains(found['target']) else 'no'} |")
    return lines


def largest_gain(tuned: dict) -> tuple[str, str] | None:
    """The (P, target) whose paired mean GRQO minus SFT on the target is largest."""
    means = {key: statistics.mean(found) for key, study in tuned.items()
             if (found := differences(study, key[1])["target"])}
    return max(means, key=means.get) if means else None


def ablation_table(tuned: dict) -> list[str]:
    """Where the gain is largest: each ablation and GRQO against SFT and the L2 pull."""
    chosen = largest_gain(tuned)
    if chosen is None:
        return []
    study, target = tuned[chosen], chosen[1]
    lines = [f"Ablations from {chosen[0]} on {target}, the largest paired gain (AP points):", "",
             "| setting | against | seeds | Δ target | Δ target per seed | Δ default val "
             "| Δ other domains |", "|---|---|---:|---:|---|---:|---:|"]
    for setting, against in (("grqo", "sft"), ("kl_only", "sft"), ("advantage_only", "sft"),
                             ("sft_l2", "sft"), ("grqo", "sft_l2")):
        found = differences(study, target, setting, against)
        per_seed = ", ".join(f"{value:+.1f}" for value in found["target"]) or "-"
        lines.append(f"| {setting} | {against} | {len(found['target'])} | "
                     f"{cell(found['target'])} | {per_seed} | {cell(found['default'])} | "
                     f"{cell(found['others'])} |")
    return lines


def render(pretrained: dict, tuned: dict) -> str:
    lines = ["Zero-shot AP of each starting point on every val (the distance; lower = "
             "farther):", "", *distance_table(pretrained)]
    for start in pretrained:
        lines += ["", *shift_table(start, pretrained[start], tuned)]
    ablations = ablation_table(tuned)
    return "\n".join(lines + ([""] + ablations if ablations else []))


def run_finetunes(args, pretrained: dict, tuned: dict, show) -> None:
    """SFT and GRQO from every P that is done, on every target: seed 0 everywhere first,
    then seeds 1-2, then 3-4, so that partial results cover every target."""
    ready = [start for start in args.starts if (start, 0) in done_rows(pretrained[start])]
    for seeds in ([0], [1, 2], [3, 4]):
        seeds = [seed for seed in seeds if seed in args.seeds]
        for start in ready:
            for target in args.targets:
                jobs = [(setting, seed) for seed in seeds for setting in SETTINGS]
                if jobs:
                    runner.run_all(tuned[start, target], jobs, args.jobs, args.threads, show)


def run_ablations(args, tuned: dict, show) -> None:
    """The ablations where GRQO's paired gain is largest so far."""
    chosen = largest_gain(tuned)
    if chosen is None:
        print("no paired SFT and GRQO runs yet: the ablations wait for them")
        return
    print(f"ablations from {chosen[0]} on {chosen[1]}")
    jobs = [(setting, seed) for setting, seeds in ABLATION_SEEDS.items() for seed in seeds
            if seed in args.seeds]
    runner.run_all(tuned[chosen], jobs, args.jobs, args.threads, show)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--stages", nargs="+", default=["pretrained", "finetune"],
                        choices=["pretrained", "finetune", "ablations"])
    runner.add_arguments(parser, out=str(RESULTS), split="val", epochs=6, device="cpu")
    args = parser.parse_args(argv)
    pretrained, tuned = starts(args, argv), finetunes(args, argv)
    def show(rows):
        return render(pretrained, tuned)

    if not args.summary and "pretrained" in args.stages:
        for start in args.starts:
            runner.run_all(pretrained[start], [(start, 0)], 1, args.threads, show)
    if not args.summary and "finetune" in args.stages:
        run_finetunes(args, pretrained, tuned, show)
    if not args.summary and "ablations" in args.stages:
        run_ablations(args, tuned, show)
    tables = render(pretrained, tuned)
    if not args.summary:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.md").write_text(tables + "\n")
    print(tables)


if __name__ == "__main__":
    main()
