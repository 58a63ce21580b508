#!/usr/bin/env bash
# Prepares what tests/gpu/run.sh needs on the GPU machine, in .gpu/ (ignored), from this machine:
#   ort.part.*, ort.sha256  onnxruntime-gpu 1.31.1's three libraries (PyPI wheel), tar.xz in parts
#                           small enough to travel one per device call (PART_MB, default 44)
#   onkos.tar.xz            target/release/onkos (stripped) and, in lib/, the shared libraries it
#                           links that a bare CUDA image lacks (OpenSlide and its dependencies)
#   slide.tif.xz            the benchmark slide (tests/bench/make_slide.py; it repeats one picture,
#                           so it compresses to a few MB)
# Usage: tests/gpu/pack.sh, then carry .gpu with each device call (see BENCHMARKS.md, GPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_MB=${PART_MB:-44}
CACHE=target/gpu-pack
mkdir -p "$CACHE" .gpu
rm -f .gpu/*
if [ ! -f "$CACHE/ort.tar.xz" ]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --dest "$CACHE" onnxruntime-gpu==1.31.1
  rm -rf "$CACHE/ort" && mkdir "$CACHE/ort"
  unzip -q -j -o "$CACHE"/onnxruntime_gpu-1.31.1-*.whl -d "$CACHE/ort" \
    onnxruntime/capi/libonnxruntime.so.1.31.1 onnxruntime/capi/libonnxruntime_providers_cuda.so \
    onnxruntime/capi/libonnxruntime_providers_shared.so
  tar cf - -C "$CACHE/ort" . | xz -9e -T0 > "$CACHE/ort.tar.xz.part" && mv "$CACHE/ort.tar.xz.part" "$CACHE/ort.tar.xz"
fi
split -b "${PART_MB}M" -a 2 "$CACHE/ort.tar.xz" .gpu/ort.part.
sha256sum < "$CACHE/ort.tar.xz" > .gpu/ort.sha256

# The binary and the libraries it needs beyond glibc, libgcc and libstdc++ (the image has those).
rm -rf "$CACHE/bin" && mkdir -p "$CACHE/bin/lib"
strip -o "$CACHE/bin/onkos" target/release/onkos
ldd target/release/onkos | awk '/=> \// {print $3}' \
  | grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*)\.so' \
  | xargs -I{} cp -L {} "$CACHE/bin/lib/"
tar cf - -C "$CACHE/bin" . | xz -9 -T0 > .gpu/onkos.tar.xz

SLIDE=target/bench/slide-20480x15360.tif
[ -f "$SLIDE" ] || { echo "$SLIDE is missing: run make bench-slides once (it makes it)"; exit 1; }
xz -9e --lzma2=preset=9e,dict=512MiB -T1 -c "$SLIDE" > .gpu/slide.tif.xz
ls -la .gpu
