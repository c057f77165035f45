"""Whether two runs (or two predictions) are bit for bit the same: every tensor of two
checkpoints (the model, the optimiser's state, the GRQO reference), or two detections.json
files. Used to show that a change which should not touch the computation does not:

    python benchmarks/bit_identical.py runs/before/sft_visual/last.pt runs/after/sft_visual/last.pt
    python benchmarks/bit_identical.py before/detections.json after/detections.json

Prints one line per pair and exits 1 when anything differs.
"""

import argparse
import json
import sys

import torch


def tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint, by its path ("model.backbone.level_embed")."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, (list, tuple)) else [])
    found = {}
    for key, item in items:
        found.update(tensors(item, f"{prefix}.{key}" if prefix else str(key)))
    return found


def compare_checkpoints(first: str, second: str) -> list[str]:
    """The paths whose tensors differ (or exist in one file only)."""
    a, b = (tensors(torch.load(path, map_location="cpu", weights_only=True))
            for path in (first, second))
    differ = sorted(set(a) ^ set(b))
    differ += [name for name in sorted(set(a) & set(b))
               if a[name].shape != b[name].shape or not torch.equal(a[name], b[name])]
    print(f"{first} vs {second}: {len(set(a) & set(b))} tensors, {len(differ)} differ"
          + (f", the first {differ[0]}" if differ else " (bit-identical)"))
    floats = [name for name in differ if name in a and name in b and a[name].is_floating_point()
              and a[name].shape == b[name].shape]
    if floats:
        gaps = {name: (a[name].double() - b[name].double()).abs().max().item() for name in floats}
        largest = max(gaps, key=gaps.get)
        weights = [gaps[name] for name in floats if name.startswith("model.")]
        print(f"  largest difference {gaps[largest]:.3g} ({largest}); largest in the model's "
              f"weights {max(weights, default=0.0):.3g}")
    return differ


def compare_detections(first: str, second: str) -> bool:
    a, b = (json.loads(open(path).read()) for path in (first, second))
    same = a == b
    print(f"{first} vs {second}: {len(a)} and {len(b)} detections, "
          + ("identical" if same else "different"))
    return same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="FIRST SECOND [FIRST SECOND ...]")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give the files in pairs")
    same = True
    for first, second in zip(args.pairs[::2], args.pairs[1::2]):
        if first.endswith(".json"):
            same &= compare_detections(first, second)
        else:
            same &= not compare_checkpoints(first, second)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
