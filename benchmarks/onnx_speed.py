"""Pictures a second, the eager detector against its export run by onnxruntime, side by side.

    python benchmarks/onnx_speed.py --ckpt runs/grqo/last.pt --batch 1 4 --json out.json
    python benchmarks/onnx_speed.py --batch 1 --repeats 3          # random tiny weights

The detector graph only (the prompts are ready-made: 24 class vectors, one token each, as
evaluate.py's generic prompts), on `val` pictures of the default data at the preset's size
(pictures resized up for a preset of 800 pixels; export.py takes the tiny backbone only for
now). Both use the same number of CPU threads (torch's); eager and onnxruntime alternate,
repeat by repeat; the medians and their ratio are printed and written. Run from the
project's root; export.py's packages must be installed.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402
from checkpoints import CHECKPOINT_FORMAT, load_detector  # noqa: E402
from data import (collate, make_sample, make_transforms, read_rgb_image,  # noqa: E402
                  resolve_data_root)
from model import build_model, one_token_per_class  # noqa: E402


def batches(model, batch_size: int, count: int):
    """`count` val pictures as the evaluation transforms make them, in batches."""
    root = resolve_data_root("shapes")
    files = sorted((root / "val").glob("*.png"))[:count]
    config = model.config
    transforms = make_transforms(False, config.image_size, config.max_size)
    samples = []
    for file in files:
        picture = read_rgb_image(file).resize((config.max_size, config.image_size)) \
            if config.image_size > 400 else read_rgb_image(file)
        samples.append(make_sample(picture, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                   transforms, image_id=0))
    return [collate(samples[start:start + batch_size], config.pad_multiple)
            for start in range(0, len(samples), batch_size)]


def seconds(run, groups, prompts) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for batch in groups:
            run(batch.images, batch.mask, prompts(batch.images.shape[0]))
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a checkpoint (default: --preset with random weights)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--onnx", help="an export of --ckpt already made (else exported here)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--pictures", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.ckpt
        if checkpoint is None:
            torch.manual_seed(0)
            model = build_model(args.preset, kernel="torch").eval()
            checkpoint = Path(scratch) / "random.pt"
            torch.save({"model": model.state_dict(), "config": asdict(model.config),
                        "format": CHECKPOINT_FORMAT}, checkpoint)
        folder = args.onnx or Path(scratch) / "onnx"
        started = time.perf_counter()
        if args.onnx is None:
            export.export(checkpoint, folder)
        export_seconds = time.perf_counter() - started
        runtime = export.OnnxDetector(folder, threads=torch.get_num_threads())
        model = load_detector(checkpoint, kernel="torch")[0].eval()
        vectors = torch.randn(1, 24, model.config.hidden_dim, generator=torch.Generator()
                              .manual_seed(0))

        def prompts(size):
            return one_token_per_class(vectors.expand(size, -1, -1))

        results = {"checkpoint": str(args.ckpt or f"random {args.preset}"),
                   "threads": torch.get_num_threads(), "export_seconds": export_seconds,
                   "pictures": args.pictures, "runs": []}
        for batch_size in args.batch:
            groups = batches(model, batch_size, args.pictures)
            seconds(model, groups[:1], prompts), seconds(runtime, groups[:1], prompts)  # warm-up
            timings = {"eager": [], "onnxruntime": []}
            for _ in range(args.repeats):
                timings["eager"].append(seconds(model, groups, prompts))
                timings["onnxruntime"].append(seconds(runtime, groups, prompts))
            rates = {name: args.pictures / statistics.median(values)
                     for name, values in timings.items()}
            results["runs"].append({"batch": batch_size, "size": list(groups[0].images.shape[-2:]),
                                    "pictures_per_second": rates, "seconds": timings,
                                    "ratio": rates["onnxruntime"] / rates["eager"]})
            print(f"batch {batch_size}, {tuple(groups[0].images.shape[-2:])}: eager "
                  f"{rates['eager']:.2f} pictures/s, onnxruntime {rates['onnxruntime']:.2f} "
                  f"({rates['onnxruntime'] / rates['eager']:.2f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
