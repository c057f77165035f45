#!/usr/bin/env bash
# GPU check, in sections (all by default; SECTIONS="profile huggingface" picks some):
#   kernels      the Triton kernel against the reference on CUDA
#   bench        deform_attn/bench.py at the Swin-T encoder and decoder shapes, B = 1 and 2
#   step         swin_t training steps at 800x1333, batch 2, bf16, with each backend
#   profile      torch.profiler over swin_t training steps: where the step's time goes
#   huggingface  transformers' Grounding DINO Swin-T forward and step beside this swin_t's
#   same_weights one Grounding DINO Swin-T's weights in transformers and here: fp32 parity at
#                800x1333, then bf16 forward and step times side by side
#   tiny         a short tiny main job (SFT vs GRQO 1+5, one seed) on the GPU
#   syncs        the tests that need CUDA: a training step under set_sync_debug_mode("error")
# On one H100, kernels + bench + step take under 2 minutes and tiny about 7.5. The device
# machine's Python lacks pycocotools: wheels in .whl/ are installed first when present.
# Full logs go to $OUT (or ./gpu_check_out); the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
SECTIONS=${SECTIONS:-syncs kernels bench step profile huggingface same_weights tiny}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-deps .whl/*.whl; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
wants() { [[ " $SECTIONS " == *" $1 "* ]]; }

if wants syncs; then echo "== syncs: the tests that need CUDA"
python -m pytest -q -rs tests/test_train.py -k cuda 2>&1 | tee "$OUT/syncs.log"; fi

if wants kernels; then echo "== kernels: Triton vs reference on CUDA"
python benchmarks/gpu_check.py kernels --json "$OUT/kernels_check.json" 2>&1 | tee "$OUT/kernels_check.log"; fi

if wants bench; then echo "== bench: deform_attn/bench.py, encoder and decoder shapes, B = 1 and 2"
python -m deform_attn.bench --shape encoder decoder --batch 1 2 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"; fi

if wants step; then echo "== step: swin_t training steps, 800x1333, batch 2, bf16"
python benchmarks/gpu_check.py step --kernel torch triton --json "$OUT/swin_steps.json" 2>&1 | tee "$OUT/swin_steps.log"; fi

if wants profile; then echo "== profile: swin_t training step, 800x1333, batch 2, bf16, Triton kernel"
python benchmarks/gpu_check.py profile --kernel triton --steps 5 --json "$OUT/profile.json" 2>&1 \
    | grep -v "^USDT\|^ERROR:.*gpuGetDeviceCount" | tee "$OUT/profile.log"; fi

if wants huggingface; then echo "== huggingface: transformers' Grounding DINO Swin-T against this swin_t, 800x1333, batch 2, bf16"
python benchmarks/gpu_check.py huggingface --kernel triton torch --json "$OUT/huggingface.json" 2>&1 | tee "$OUT/huggingface.log"; fi

if wants same_weights; then echo "== same_weights: one Grounding DINO Swin-T's weights in transformers and here"
python benchmarks/gpu_check.py same_weights --kernel triton --json "$OUT/same_weights.json" 2>&1 \
    | grep -v "Loading weights\|Writing model" | tee "$OUT/same_weights.log"; fi

if wants tiny; then echo "== tiny: the tiny main job on the GPU: SFT vs GRQO 1+5, one seed"
started=$(date +%s)
# The runs' own folders stay out of $OUT (checkpoints are large; few files come back).
python benchmarks/sft_vs_grqo.py --seeds 0 --epochs 6 --jobs 1 --threads 8 --device cuda \
    --out runs/gpu_check_tiny 2>&1 | tail -n 12 | tee "$OUT/tiny.log"
echo "tiny wall time: $(( $(date +%s) - started )) s" | tee -a "$OUT/tiny.log"; fi

echo; echo "================ summary"
cat "$OUT/gpu.txt"
grep -h "FAIL\|ok" "$OUT/kernels_check.log" 2>/dev/null | awk '{print "kernel check:", $0}'
grep -h "^|" "$OUT/bench.log" 2>/dev/null
cat "$OUT/swin_steps.log" "$OUT/huggingface.log" "$OUT/same_weights.log" "$OUT/tiny.log" 2>/dev/null
grep -h "^==\|^   phase" "$OUT/profile.log" 2>/dev/null
