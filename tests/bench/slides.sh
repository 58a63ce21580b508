#!/usr/bin/env bash
# The slide benchmark (a command, not a test): `make bench-slides`.
#
# Makes a 20480 x 15360 JPEG pyramidal slide from a real IHC picture (once, in target/bench), then
# ROUNDS times, interleaved: onkos's whole slide pipeline (`onkos bench-slide`: mask, grid, read,
# resize, ONNX Runtime, aggregate) with the decode limit of the same level's tiles and onkos's own
# region reading, measured in the same run; then libjpeg-turbo (Pillow) decoding the same raw tiles
# and OpenSlide's read_region reading regions of the same size, one process per core. Prints
# medians and ratios.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-3}
SECONDS_EACH=${BENCH_SECONDS:-5}
BIN=target/release/onkos
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/target/onnxruntime-1.31.1/libonnxruntime.so.1.31.1}
VENV=target/bench-venv
SLIDE=target/bench/slide-20480x15360.tif

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r tests/bench/requirements.txt
fi
if [ ! -f "$SLIDE" ]; then
  mkdir -p target/bench
  "$VENV/bin/python" tests/bench/make_slide.py "$SLIDE.part" && mv "$SLIDE.part" "$SLIDE"
fi

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
field() { sed -E "s/.*[ ^]?$1=([0-9.]+).*/\1/"; }
DATA=$(mktemp -d); trap 'rm -rf "$DATA"' EXIT
for round in $(seq "$ROUNDS"); do
  onkos=$("$BIN" bench-slide --slide "$SLIDE")
  level=$(field level_used <<<"$onkos"); size=$(field read_size <<<"$onkos")
  reference=$("$VENV/bin/python" tests/bench/slide_reference.py "$SLIDE" "$level" "$size" "$SECONDS_EACH")
  echo "round $round: $onkos $reference"
  field pipeline_tiles_per_s <<<"$onkos" >> "$DATA/pipeline"
  field limit_tiles_per_s <<<"$onkos" >> "$DATA/limit"
  field regions_per_s <<<"$onkos" >> "$DATA/regions"
  field isolated_openslide_regions_per_s <<<"$onkos" >> "$DATA/isolated"
  awk -v m="$(field libjpeg_turbo_mpix_per_s <<<"$reference")" -v s="$size" \
    'BEGIN {printf "%.0f\n", m * 1e6 / (s * s)}' >> "$DATA/turbo"
  field openslide_regions_per_s <<<"$reference" >> "$DATA/openslide"
done
pipeline=$(median < "$DATA/pipeline"); limit=$(median < "$DATA/limit"); turbo=$(median < "$DATA/turbo")
regions=$(median < "$DATA/regions"); openslide=$(median < "$DATA/openslide")
isolated=$(median < "$DATA/isolated")
echo
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr); slide $SLIDE; $ROUNDS rounds"
echo "onkos pipeline, model tiles/s (median): $pipeline"
echo "decode limit of the same tiles in model tiles/s: onkos (zune-jpeg) $limit, libjpeg-turbo (Pillow) $turbo"
echo "region reading, regions/s: onkos $regions, OpenSlide read_region $openslide, OpenSlide in onkos's isolated reader processes $isolated"
awk -v p="$pipeline" -v t="$turbo" -v r="$regions" -v o="$openslide" 'BEGIN {
  printf "ratio pipeline / libjpeg-turbo decode limit: %.2f (goal >= 0.8)\n", p / t
  printf "ratio onkos region reading / OpenSlide read_region: %.1f (goal >= 5)\n", r / o
}'
awk -v i="$isolated" -v o="$openslide" 'BEGIN {
  printf "ratio OpenSlide isolated / in-process: %.2f (the cost of the crash isolation)\n", i / o
}'
