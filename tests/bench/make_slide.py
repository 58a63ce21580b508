"""Writes the benchmark slide: a real IHC picture (scikit-image's `immunohistochemistry()`,
public domain) tiled to 20480 x 15360 pixels, as a JPEG-compressed (Q 85) tiled pyramidal TIFF with
256 x 256 tiles and 0.25 µm/pixel, level by level down to below 512 pixels. Usage:
python make_slide.py OUT.tif
"""
import sys

import numpy as np
import tifffile
from skimage import data
from skimage.transform import downscale_local_mean

WIDTH, HEIGHT, TILE, MPP = 20480, 15360, 256, 0.25

picture = data.immunohistochemistry()  # 512 x 512 RGB
# Mirror the picture so that the tiling has no seams, then repeat it over the slide.
block = np.concatenate([picture, picture[:, ::-1]], axis=1)
block = np.concatenate([block, block[::-1]], axis=0)
level = np.tile(block, (HEIGHT // block.shape[0], WIDTH // block.shape[1], 1))
assert level.shape == (HEIGHT, WIDTH, 3)

per_cm = 10_000 / MPP
with tifffile.TiffWriter(sys.argv[1], bigtiff=False) as tif:
    scale = 1
    while True:
        tif.write(
            level,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": 85},
            resolution=(per_cm / scale, per_cm / scale),
            resolutionunit="CENTIMETER",
            subfiletype=0 if scale == 1 else 1,
            metadata=None,
        )
        if max(level.shape[:2]) < 512:
            break
        level = downscale_local_mean(level, (2, 2, 1)).round().astype(np.uint8)
        scale *= 2
