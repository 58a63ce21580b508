"""The references for the slide benchmark, on the same cores: libjpeg-turbo (through Pillow)
decoding the raw JPEG tiles of one pyramid level, and OpenSlide's read_region reading regions of
the size onkos reads, both in one process per core for SECONDS each.
Usage: python slide_reference.py SLIDE LEVEL READ_SIZE SECONDS
Prints: libjpeg_turbo_mpix_per_s=... openslide_regions_per_s=...
"""
import io
import multiprocessing as mp
import os
import sys
import time

import openslide
import tifffile
from PIL import Image

PATH, LEVEL, SIZE, SECONDS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


def turbo(worker: int) -> int:
    page = tifffile.TiffFile(PATH).pages[LEVEL]
    tables = page.jpegtables
    with open(PATH, "rb") as f:
        tiles = []
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            f.seek(offset)
            tile = f.read(count)
            tiles.append(tables[:-2] + tile[2:] if tables else tile)
    pixels, i, end = 0, worker, time.perf_counter() + SECONDS
    while time.perf_counter() < end:
        image = Image.open(io.BytesIO(tiles[i % len(tiles)]))
        image.load()
        pixels += image.width * image.height
        i += os.cpu_count()
    return pixels


def regions(worker: int) -> int:
    slide = openslide.OpenSlide(PATH)
    width, height = slide.level_dimensions[LEVEL]
    scale = slide.level_downsamples[LEVEL]
    positions = [(x, y) for y in range(0, height - SIZE, SIZE) for x in range(0, width - SIZE, SIZE)]
    count, i, end = 0, worker, time.perf_counter() + SECONDS
    while time.perf_counter() < end:
        x, y = positions[i % len(positions)]
        slide.read_region((int(x * scale), int(y * scale)), LEVEL, (SIZE, SIZE))
        count += 1
        i += os.cpu_count()
    return count


if __name__ == "__main__":
    cores = os.cpu_count()
    with mp.Pool(cores) as pool:
        pixels = sum(pool.map(turbo, range(cores)))
    with mp.Pool(cores) as pool:
        count = sum(pool.map(regions, range(cores)))
    print(f"libjpeg_turbo_mpix_per_s={pixels / SECONDS / 1e6:.1f} openslide_regions_per_s={count / SECONDS:.1f}")
