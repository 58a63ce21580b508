"""Builds the bundled H&E stain quantification model: a fixed, non-learned ONNX graph.

Colour deconvolution (Ruifrok & Johnston 2001) of each tile into haematoxylin, eosin and DAB
optical densities; per tile it reports the fraction of tissue pixels (total optical density above
0.15) and the mean haematoxylin and eosin optical density over those pixels. The graph takes the
tile's optical density, which onkos computes from the RGB bytes by table lookup (the manifest's
`normalise.space: optical_density`). Nothing is learned,
so there is no training data and no held-out metric: it is a measurement, not a prediction.

Run: `python build.py` (onnx and onnxruntime as pinned in models/requirements.txt). It writes
model.onnx and manifest.json, and checks the graph against a NumPy implementation of the same
arithmetic on random and on synthetic stain tiles (|delta| < 1e-4).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = pathlib.Path(__file__).parent
TILE = 224
MPP = 0.5
OD_TISSUE = 0.15
OPSET = 17

# Stain vectors (rows: haematoxylin, eosin, DAB) from Ruifrok & Johnston, as in scikit-image's
# `rgb_from_hed`; each row normalised to unit length.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def reference(tiles: np.ndarray) -> dict[str, np.ndarray]:
    """The same arithmetic in NumPy (float64): tiles [N, 3, S, S] of RGB values 0..255."""
    n = tiles.shape[0]
    od = (np.log(256.0) - np.log(tiles.astype(np.float64) + 1.0)) / np.log(10.0)
    od = od.reshape(n, 3, -1)
    hed = np.einsum("ij,njp->nip", HED_FROM_RGB.T, od)
    mask = (od.sum(axis=1) > OD_TISSUE).astype(np.float64)
    tissue = mask.sum(axis=1)
    mean = lambda c: (np.maximum(hed[:, c, :], 0.0) * mask).sum(axis=1) / np.maximum(tissue, 1.0)
    return {
        "tissue_fraction": tissue / od.shape[2],
        "haematoxylin_od": mean(0),
        "eosin_od": mean(1),
    }


def optical_density(tiles: np.ndarray) -> np.ndarray:
    """The model's input as onkos writes it (manifest `normalise.space: optical_density`): each
    0-255 value's OD, −log10((v + 1) / 256), computed in float64 and stored as float32."""
    return (-np.log10((tiles.astype(np.float64) + 1.0) / 256.0)).astype(np.float32)


def graph() -> onnx.ModelProto:
    """The arithmetic of `reference` over optical density tiles in few full-tile operations. onkos
    turns each byte into its OD by table lookup while it writes the batch (the manifest's
    `normalise.space`), so the graph has no per-pixel logarithm: a 2 x 3 matrix gives haematoxylin
    and eosin, the channels' sum is the tissue test, and one batched matrix product of the clipped
    densities with the tissue mask sums them over the tissue pixels."""
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
    axes = lambda name, values: numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)
    pixels = TILE * TILE
    nodes = [
        helper.make_node("Reshape", ["tiles", "flat_shape"], ["od"]),  # [N, 3, P]
        helper.make_node("MatMul", ["he_from_od", "od"], ["he"]),  # [N, 2, P]
        helper.make_node("ReduceSum", ["od", "axis1"], ["od_total"], keepdims=1),  # [N, 1, P]
        helper.make_node("Greater", ["od_total", "od_tissue"], ["is_tissue"]),
        helper.make_node("Cast", ["is_tissue"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["mask", "column_shape"], ["mask_column"]),  # [N, P, 1]
        helper.make_node("ReduceSum", ["mask", "axes12"], ["tissue_pixels"], keepdims=0),  # [N]
        helper.make_node("Mul", ["tissue_pixels", "per_pixel"], ["tissue_fraction"]),
        helper.make_node("Max", ["tissue_pixels", "one"], ["tissue_count"]),
        helper.make_node("Relu", ["he"], ["density"]),
        helper.make_node("MatMul", ["density", "mask_column"], ["density_sum"]),  # [N, 2, 1]
        helper.make_node("Reshape", ["density_sum", "pair_shape"], ["pair"]),  # [N, 2]
        helper.make_node("Split", ["pair", "split2"], ["h_sum", "e_sum"], axis=1),
        helper.make_node("Squeeze", ["h_sum", "axis1"], ["h_total"]),
        helper.make_node("Squeeze", ["e_sum", "axis1"], ["e_total"]),
        helper.make_node("Div", ["h_total", "tissue_count"], ["haematoxylin_od"]),
        helper.make_node("Div", ["e_total", "tissue_count"], ["eosin_od"]),
    ]
    initializers = [
        const("one", 1.0),
        const("per_pixel", 1.0 / pixels),
        # hed = HED_FROM_RGB.T @ od; keep the H and E rows.
        const("he_from_od", HED_FROM_RGB.T[:2]),
        const("od_tissue", OD_TISSUE),
        axes("flat_shape", [0, 3, -1]),
        axes("column_shape", [0, -1, 1]),
        axes("pair_shape", [0, 2]),
        axes("axis1", [1]),
        axes("axes12", [1, 2]),
        axes("split2", [1, 1]),
    ]
    tiles = helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["N", 3, TILE, TILE])
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"])
        for name in ("tissue_fraction", "haematoxylin_od", "eosin_od")
    ]
    g = helper.make_graph(nodes, "he_stain_quantification", [tiles], outputs, initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onkos")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    model = graph()
    path = HERE / "model.onnx"
    path.write_bytes(model.SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(20261129)
    # Tiles as the slide gives them: bytes 0-255.
    random = rng.integers(0, 256, size=(4, 3, TILE, TILE)).astype(np.float64)
    white = np.full((1, 3, TILE, TILE), 255.0)
    # Pure stain tiles: the transmitted colour of 0.8 OD of each stain, rounded to bytes.
    pure = [np.round(255.0 * 10 ** (-0.8 * RGB_FROM_HED[s])) for s in range(2)]
    stains = np.stack([np.broadcast_to(p[:, None, None], (3, TILE, TILE)) for p in pure])
    run = lambda tiles: dict(
        zip(("tissue_fraction", "haematoxylin_od", "eosin_od"), session.run(None, {"tiles": optical_density(tiles)}))
    )
    for tiles in (random, white, stains):
        got = run(tiles)
        want = reference(tiles)
        for name, value in want.items():
            assert np.abs(got[name] - value).max() < 1e-4, (name, got[name], value)
    out = run(stains)
    assert out["haematoxylin_od"][0] > 0.7 and out["eosin_od"][0] < 0.1, out
    assert out["eosin_od"][1] > 0.7 and out["haematoxylin_od"][1] < 0.1, out
    assert run(white)["tissue_fraction"][0] == 0.0

    manifest = json.loads((HERE / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print("model.onnx", manifest["onnx"]["sha256"])


if __name__ == "__main__":
    main()
