#!/usr/bin/env bash
# The GPU figures in README, in one run: operator throughput (every backend/precision/batch row beside
# the reference-style path), fine-tuning throughput (EfficientNetV2-M at 256 px, bf16), and `video embed`
# against the operator alone on the same frames (synthetic EfficientNetV2-M at 512 px, the published shape).
#     bash benchmarks/gpu.sh [OUT_DIR]        # at most 9 minutes (timeouts) on one H200
# Each step's table goes to OUT_DIR (default: ./gpu-figures); a failing step does not stop the others.
# On a GPU machine that has torch, timm, ONNX Runtime and Pillow but not the rest (no network), bring
# wheels for its Python and install them with --target: towhee 1.1.3 (with pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions, tenacity), av and faiss-cpu; then make the
# checkout importable as towhee_isc: mkdir -p /tmp/pkg && ln -s "$PWD" /tmp/pkg/towhee_isc, and put
# /tmp/pkg first on PYTHONPATH.
set -u
out=${1:-gpu-figures}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)' | tee -a "$out/gpu.txt"
timeout 200 $py benchmarks/throughput.py --device cuda --count 64 --rounds 3 --json "$out/throughput.json" \
    2>&1 | tee "$out/throughput.log"
for batch in 64 128; do
    timeout 80 $py benchmarks/train.py --arch tf_efficientnetv2_m.in21k_ft_in1k --input-size 256 \
        --batch-size $batch --steps 20 --device cuda --precision bf16 --workers 14 2>&1 | tee -a "$out/train.log"
done
# Videos: make and embed seeds 0-1 of benchmarks/video.py's set (kept outside OUT_DIR: videos and a
# 200 MB checkpoint), then time `video embed` against the operator on the same decoded frames.
video=${VIDEO_DIR:-/tmp/gpu-video}
arch=(--arch tf_efficientnetv2_m_in21ft1k --img-size 512 --device cuda --keep "$video" --seeds 0 1)
timeout 120 $py benchmarks/video.py "${arch[@]}" 2>&1 | tee "$out/video.log"
timeout 60 $py benchmarks/video.py "${arch[@]}" --embed-rate 2>&1 | tee -a "$out/video.log"
