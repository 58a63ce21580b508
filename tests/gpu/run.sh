#!/usr/bin/env bash
# The GPU checks of issue 7, in one call on a lent GPU machine (device tool `run`), from the repo
# root: CPU/CUDA parity, ResNet-50 tiles/s through onkos against PyTorch on the same GPU, and the
# whole slide pipeline on CUDA. Needs what `tests/gpu/pack.sh` puts in .gpu/ (the onnxruntime-gpu
# libraries in parts, the onkos binary with the libraries it links, the benchmark slide); parts
# carried by earlier calls wait in $WORK/parts (`run.sh stash` puts them there and exits).
# Writes everything to $OUT/gpu.log (or ./gpu.log) and ends with a summary. STEPS (default: all of
# "preload parity features torch tiles pipeline-parity slides") picks the measurements.
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=/tmp/onkos-gpu
STEPS=" ${STEPS:-preload parity features torch tiles pipeline-parity slides} "
want() { [[ $STEPS == *" $1 "* ]]; }
LOG=${OUT:-.}/gpu.log
mkdir -p "$WORK/parts"
if [ "${1:-}" = stash ]; then cp "${2:-.gpu}"/ort.* "$WORK/parts/" && ls -la "$WORK/parts"; exit; fi
cp .gpu/ort.* "$WORK/parts/" 2>/dev/null
exec > >(tee "$LOG") 2>&1
unxz() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"; }
step() { echo; echo "== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
nproc; free -g | head -2; uname -r

step "assemble onnxruntime-gpu 1.31.1"
(cd "$WORK/parts" && cat ort.part.* > ../ort.tar.xz && cd .. && sha256sum ort.tar.xz && cat parts/ort.sha256) || exit 1
[ "$(sha256sum < "$WORK/ort.tar.xz" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$WORK/parts/ort.sha256")" ] || { echo "ORT parts: sha256 mismatch"; exit 1; }
mkdir -p "$WORK/ort" && unxz "$WORK/ort.tar.xz" | tar x -C "$WORK/ort" && ls -la "$WORK/ort"
mkdir -p "$WORK/bin" "$WORK/lib" && unxz .gpu/onkos.tar.xz | tar x -C "$WORK/bin"
# Only the libraries this image lacks: its own (newer) ones stay in use.
ldconfig -p | awk 'NR > 1 {print $1}' > "$WORK/system-libraries"
for f in "$WORK"/bin/lib/*; do
  grep -qxF "$(basename "$f")" "$WORK/system-libraries" || cp "$f" "$WORK/lib/"
done
echo "carried libraries used: $(ls "$WORK/lib" | paste -sd' ')"
[ -f "$WORK/slide.tif" ] || unxz .gpu/slide.tif.xz > "$WORK/slide.tif"; ls -la "$WORK/slide.tif"

NVIDIA=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')
NVLIBS=$(find "$NVIDIA" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
CUDART_DIR=$(dirname "$(find "$NVIDIA" -name 'libcudart.so.13*' | head -1)")
CUDNN_DIR=$(dirname "$(find "$NVIDIA" -name 'libcudnn.so.9*' | head -1)")
echo "CUDA runtime: $CUDART_DIR; cuDNN: $CUDNN_DIR"
export ORT_DYLIB_PATH=$WORK/ort/libonnxruntime.so.1.31.1
export ONKOS_DATA_DIR=$WORK/data ONKOS_LOG=warn ONKOS_MODELS_DIR=$WORK/models
mkdir -p "$WORK/models" && cp -r models/* "$WORK/models/"

want preload && step "preloading CUDA and cuDNN from configured folders (ONKOS_CUDA_LIBRARY_DIR, no LD_LIBRARY_PATH to them)"
want preload && LD_LIBRARY_PATH=$WORK/lib ONKOS_EXECUTION_PROVIDER=cuda ONKOS_CUDA_LIBRARY_DIR=$CUDART_DIR \
  ONKOS_CUDNN_LIBRARY_DIR=$CUDNN_DIR timeout 120 "$WORK/bin/onkos" bench-inference --seconds 1 && echo "preload: ok"
# onkos alone gets the carried libraries and the CUDA wheels' folders; Python keeps the image's.
printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$WORK/lib:$NVLIBS" "$WORK/bin/onkos" > "$WORK/onkos"
chmod +x "$WORK/onkos"

step "export the ResNet-50 throughput fixture (random weights)"
timeout 300 python3 tests/gpu/export_resnet.py "$WORK/models" || exit 1

if want parity; then
  step "parity CPU vs CUDA (float32, TF32 off)"
  ONKOS_EXECUTION_PROVIDER=cuda timeout 300 "$WORK/onkos" bench-parity --tile-model he-stain-quantification --tile-model resnet50-fixture
  step "parity CPU vs CUDA with ONKOS_CUDA_TF32=true"
  ONKOS_EXECUTION_PROVIDER=cuda ONKOS_CUDA_TF32=true timeout 300 "$WORK/onkos" bench-parity --tile-model resnet50-fixture
fi
if want features; then
  step "feature model rows/s, breast-fna-malignancy, batch 64: CPU then CUDA"
  for p in cpu cuda; do echo "$p: $(ONKOS_EXECUTION_PROVIDER=$p timeout 60 "$WORK/onkos" bench-inference --seconds 2) rows/s"; done
fi
BATCHES=1,8,32,64,128,256,512
if want torch; then
  step "PyTorch, same network and GPU, input on the GPU"
  timeout 300 python3 tests/gpu/torch_bench.py $BATCHES
fi
if want tiles; then
  step "onkos ResNet-50 tiles/s (model tf32 nhwc [--pinned])"
  for run in "resnet50-fixture false false" "resnet50-fixture true false" \
             "resnet50-fixture true false --pinned" "resnet50-fixture true true --pinned" \
             "resnet50-fixture-fp16 false false" "resnet50-fixture-fp16 false false --pinned" \
             "resnet50-fixture-fp16 false true --pinned"; do
    set -- $run
    ONKOS_EXECUTION_PROVIDER=cuda ONKOS_CUDA_TF32=$2 ONKOS_CUDA_PREFER_NHWC=$3 timeout 300 "$WORK/onkos" \
      bench-tiles --model "$1" --batches $BATCHES --seconds 1 ${4:-} | sed "s/^/tf32=$2 nhwc=$3 /"
  done
fi
if want pipeline-parity; then
  step "the slide pipeline's measures on CUDA (pinned, padded last batch) and on the CPU"
  for run in "cuda 64" "cuda 256" "cpu 64" "cpu 256"; do
    set -- $run
    echo "slide-parity provider=$1 batch=$2 $(ONKOS_EXECUTION_PROVIDER=$1 timeout 300 "$WORK/onkos" bench-slide --slide "$WORK/slide.tif" --batch "$2" | grep -o 'pipeline_tiles=[0-9]*.*')"
  done
  ONKOS_EXECUTION_PROVIDER=cuda ONKOS_CUDA_PREFER_NHWC=true timeout 300 "$WORK/onkos" bench-tiles --model resnet50-fixture \
    --batches $BATCHES --seconds 1 --pinned | sed "s/^/tf32=false nhwc=true /"
fi
if want slides; then
  step "whole slide on CUDA (bench-slide), with nvidia-smi dmon"
  nvidia-smi dmon -s u -d 1 > "${OUT:-.}/dmon.log" 2>&1 &
  DMON=$!
  for run in "he-stain-quantification 64 false false" "he-stain-quantification 256 false false" \
             "resnet50-fixture-fp16 128 false true" "resnet50-fixture-fp16 256 false true" \
             "resnet50-fixture 128 true false"; do
    set -- $run
    echo "slide model=$1 batch=$2 tf32=$3 nhwc=$4 $(ONKOS_EXECUTION_PROVIDER=cuda ONKOS_CUDA_TF32=$3 ONKOS_CUDA_PREFER_NHWC=$4 timeout 300 "$WORK/onkos" bench-slide --slide "$WORK/slide.tif" --model "$1" --batch "$2")"
  done
  kill $DMON
  step "CPU pipeline on this machine, for comparison"
  echo "slide model=he-stain-quantification batch=64 cpu $(ONKOS_EXECUTION_PROVIDER=cpu timeout 300 "$WORK/onkos" bench-slide --slide "$WORK/slide.tif" --batch 64)"
fi
step "summary"
grep -E '^(parity|tf32=|torch|slide|cpu:|cuda:|preload)' "$LOG" | cut -c1-400
