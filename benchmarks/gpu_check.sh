#!/usr/bin/env bash
# GPU check: kernel correctness on CUDA, the kernel benchmark at the Swin-T encoder and
# decoder shapes, swin_t training steps at 800x1333 with each deformable-attention backend,
# and a short tiny main job (SFT vs GRQO) on the GPU. Measured on one H100: sections 1-3
# take under 2 minutes, section 4 about 7.5 (TINY=0 skips it). Section 4 needs
# pycocotools. Full logs go to $OUT (or ./gpu_check_out); the summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "== 1. Triton vs reference on CUDA"
python benchmarks/gpu_check.py kernels --json "$OUT/kernels_check.json" 2>&1 | tee "$OUT/kernels_check.log"

echo "== 2. kernels/bench.py, encoder and decoder shapes, B = 1 and 2"
python -m kernels.bench --shape encoder decoder --batch 1 2 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

echo "== 3. swin_t training steps, 800x1333, batch 2, bf16"
python benchmarks/gpu_check.py step --kernel torch triton --json "$OUT/swin_steps.json" 2>&1 | tee "$OUT/swin_steps.log"

if [ "${TINY:-1}" != 0 ]; then
echo "== 4. tiny main job on the GPU: SFT vs GRQO 1+5, one seed"
started=$(date +%s)
# The runs' own folders stay out of $OUT (checkpoints are large; few files come back).
python benchmarks/sft_vs_grqo.py --seeds 0 --epochs 6 --jobs 1 --threads 8 --device cuda \
    --out runs/gpu_check_tiny 2>&1 | tail -n 12 | tee "$OUT/tiny.log"
echo "tiny wall time: $(( $(date +%s) - started )) s" | tee -a "$OUT/tiny.log"
fi

echo; echo "================ summary"
cat "$OUT/gpu.txt"
grep -h "FAIL\|ok" "$OUT/kernels_check.log" | awk '{print "kernel check:", $0}'
grep "^|" "$OUT/bench.log"
cat "$OUT/swin_steps.log"
cat "$OUT/tiny.log" 2>/dev/null
