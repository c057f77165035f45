"""What a training step costs, by phase: operators dispatched, points that would block the host
on CUDA, and milliseconds, per step of a real `train_sft.py` or `train_grqo.py` run.

Run it from the root of the checkout to measure (it imports that checkout's code), so that two
commits are measured by the same script:

    python benchmarks/step_profile.py --preset tiny --steps 30 --warmup 10
    python benchmarks/step_profile.py --grqo --json runs/profile/grqo.json
    cd ../other-checkout && python ../project/benchmarks/step_profile.py --grqo

Phases: forward (the detector's forward), reference (the GRQO reference model), losses (the
SFT criterion, GRQO's costs and loss), backward, clip (gradient clipping), optimizer, and
other (data, prompt sampling, logging). Operators are counted with a TorchDispatchMode after
autograd, views and empty allocations left out, so backward's operators count too. Would-be
syncs: the operators whose output size depends on values (nonzero, masked_select, unique,
bincount, boolean indexing, `item`) and the host reads `.tolist()`, `.cpu()` and `.numpy()`.
On the CPU these block nothing; on CUDA those that read a device tensor wait for the GPU, but
not those that read host tensors (the data pipeline's, or AdamW's step counts, which the
non-fused optimiser keeps on the host), which this count cannot tell apart on the CPU. Timing
runs without the counting mode (which slows every operator), in the same process,
afterwards; on CUDA it synchronises at every change of phase.
"""

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path.cwd()))      # the checkout being measured

PHASES = ("forward", "reference", "losses", "backward", "clip", "optimizer", "other")
SYNC_OPERATORS = {"nonzero", "masked_select", "unique", "_unique", "_unique2",
                  "unique_consecutive", "unique_dim", "bincount", "_local_scalar_dense",
                  "repeat_interleave"}
HOST_READS = ("tolist", "cpu", "numpy")


class Recorder:
    """Which phase the program is in, the current step, and what each phase of each measured
    step cost."""

    def __init__(self, warmup: int):
        self.warmup, self.step, self.phase = warmup, 0, "other"
        self.operators, self.syncs = Counter(), Counter()
        self.seconds = defaultdict(float)
        self.operator_names = Counter()
        self.entered = time.perf_counter()

    @property
    def measuring(self) -> bool:
        return self.step >= self.warmup

    def switch(self, phase: str) -> str:
        """Enter `phase`; returns the phase left, for `switch` back."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()                # the phase's kernels, not their launch
        now = time.perf_counter()
        if self.measuring:
            self.seconds[self.phase] += now - self.entered
        self.entered, previous, self.phase = now, self.phase, phase
        return previous


def in_phase(recorder: Recorder, phase: str, function):
    """`function`, run in `phase` unless an enclosing phase (other than "other") holds."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        if recorder.phase != "other":
            return function(*args, **kwargs)
        previous = recorder.switch(phase)
        try:
            return function(*args, **kwargs)
        finally:
            recorder.switch(previous)
    return wrapped


class CountOperators(TorchDispatchMode):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        recorder = self.recorder
        if recorder.measuring:
            name = func._schema.name.split("::")[-1]
            if not func.is_view and not name.startswith(("empty", "new_empty")):
                recorder.operators[recorder.phase] += 1
                recorder.operator_names[name] += 1
            boolean_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool
                for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple))
                              else []))
            if name in SYNC_OPERATORS or boolean_index:
                recorder.syncs[recorder.phase] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def patched(target, name: str, replacement):
    original = getattr(target, name)
    setattr(target, name, replacement(original))
    try:
        yield
    finally:
        setattr(target, name, original)


def first_attribute(modules: list[str], name: str):
    """The class `name` from the first of `modules` that defines it (the code moves between
    files from one commit to another)."""
    for module in modules:
        try:
            found = getattr(__import__(module), name, None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    raise ImportError(f"none of {modules} defines {name}")


def run(arguments: list[str], grqo: bool, recorder: Recorder, count: bool) -> None:
    """One training run of `arguments`, every phase recorded."""
    import model
    import train_grqo
    import train_sft

    criterion = first_attribute(["losses", "model"], "SetCriterion")
    matcher = first_attribute(["losses", "model"], "HungarianMatcher")
    reference_method = ("selected_objectness" if hasattr(model.DINOR1, "selected_objectness")
                        else "objectness_logits")

    def host_read(original):
        @functools.wraps(original)
        def wrapped(self, *args, **kwargs):
            if recorder.measuring:
                recorder.syncs[recorder.phase] += 1
            return original(self, *args, **kwargs)
        return wrapped

    def optimizer_step(original):
        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            try:
                return in_phase(recorder, "optimizer", original)(*args, **kwargs)
            finally:
                recorder.step += 1
        return wrapped

    with contextlib.ExitStack() as stack:
        for target, name, phase in [
                (model.DINOR1, "forward", "forward"), (model.DINOR1, reference_method, "reference"),
                (criterion, "__call__", "losses"), (matcher, "pairwise_cost", "losses"),
                (train_grqo, "grqo_loss", "losses"), (torch.Tensor, "backward", "backward"),
                (torch.nn.utils, "clip_grad_norm_", "clip")]:
            stack.enter_context(patched(target, name,
                                        lambda original, p=phase: in_phase(recorder, p, original)))
        for optimizer in (torch.optim.AdamW, torch.optim.Adam):
            stack.enter_context(patched(optimizer, "step", optimizer_step))
        for name in HOST_READS:
            stack.enter_context(patched(torch.Tensor, name, host_read))
        if count:
            stack.enter_context(CountOperators(recorder))
        (train_grqo if grqo else train_sft).main(arguments)
    recorder.switch("other")


def profile(preset: str, grqo: bool, steps: int, warmup: int, threads: int, seed: int,
            extra: list[str], passes=(True, False)) -> dict:
    """Each pass a run: counting operators and syncs (True), or timing (False)."""
    torch.set_num_threads(threads)
    results = {key: {p: float("nan") for p in PHASES} for key in ("operators", "syncs", "ms")}
    results["top_operators"] = {}
    for count in passes:
        recorder = Recorder(warmup)
        with tempfile.TemporaryDirectory() as folder:
            arguments = ["--model", preset, "--max-steps", str(warmup + steps), "--no-eval",
                         "--seed", str(seed), "--out", folder, "--workers", "0",
                         "--log-every", "1000", *extra]
            if grqo:
                arguments += ["--sft-epochs", "0"]
            run(arguments, grqo, recorder, count)
        measured = recorder.step - warmup
        if count:
            results["operators"] = {p: recorder.operators[p] / measured for p in PHASES}
            results["syncs"] = {p: recorder.syncs[p] / measured for p in PHASES}
            results["top_operators"] = {name: number / measured for name, number
                                        in recorder.operator_names.most_common(15)}
        else:
            results["ms"] = {p: 1000 * recorder.seconds[p] / measured for p in PHASES}
    for key in ("operators", "syncs", "ms"):
        results[key]["step"] = sum(results[key][p] for p in PHASES)
    results.update(preset=preset, objective="grqo" if grqo else "sft", steps=steps,
                   warmup=warmup, threads=threads, torch=torch.__version__)
    return results


def table(results: dict) -> str:
    rows = ["| per step | " + " | ".join(PHASES) + " | step |",
            "|---|" + "---:|" * (len(PHASES) + 1)]
    for key, form in (("operators", "{:.0f}"), ("syncs", "{:.1f}"), ("ms", "{:.1f}")):
        rows.append(f"| {key} | " + " | ".join(form.format(results[key][p])
                                               for p in (*PHASES, "step")) + " |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--grqo", action="store_true", help="train_grqo.py --sft-epochs 0")
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-only", action="store_true", help="skip the counting run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --, more arguments for the training script")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    results = profile(args.preset, args.grqo, args.steps, args.warmup, args.threads,
                      args.seed, extra, (False,) if args.time_only else (True, False))
    print(f"{args.preset} {results['objective']}, {args.steps} steps after {args.warmup}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(table(results))
    print("most frequent operators a step:", ", ".join(
        f"{name} {number:.0f}" for name, number in results["top_operators"].items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
