"""Builds the bundled H&E stain quantification model: a fixed, non-learned ONNX graph.

Colour deconvolution (Ruifrok & Johnston 2001) of each RGB tile into haematoxylin, eosin and DAB
optical densities; per tile it reports the fraction of tissue pixels (total optical density above
0.15) and the mean haematoxylin and eosin optical density over those pixels. Nothing is learned,
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


def graph() -> onnx.ModelProto:
    """The arithmetic of `reference` in few full-tile operations: OD is linear in ln((I + 1) / 256),
    so its scale, sign and the stain matrix fold into one 2 x 3 matrix (H and E rows only), and the
    tissue test becomes a threshold on the channels' summed logarithm."""
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
    axes = lambda name, values: numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)
    k = 1.0 / np.log(10.0)
    # hed = HED_FROM_RGB.T @ od, od = -k * ln((I + 1) / 256); keep the H and E rows.
    he_from_log = -k * HED_FROM_RGB.T[:2]
    # Total OD > OD_TISSUE  <=>  sum over channels of ln((I + 1) / 256) < -OD_TISSUE / k.
    log_sum_max = -OD_TISSUE / k
    nodes = [
        helper.make_node("Add", ["tiles", "one"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "inv256"], ["transmitted"]),
        helper.make_node("Log", ["transmitted"], ["log_image"]),
        helper.make_node("Reshape", ["log_image", "flat_shape"], ["log_t"]),  # [N, 3, P]
        helper.make_node("MatMul", ["he_from_log", "log_t"], ["he"]),  # [N, 2, P]
        helper.make_node("ReduceSum", ["log_t", "axis1"], ["log_sum"], keepdims=1),  # [N, 1, P]
        helper.make_node("Less", ["log_sum", "log_sum_max"], ["is_tissue"]),
        helper.make_node("Cast", ["is_tissue"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["mask"], ["tissue_fraction"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "axes12"], ["tissue_pixels"], keepdims=0),
        helper.make_node("Max", ["tissue_pixels", "one"], ["tissue_count"]),
        helper.make_node("Relu", ["he"], ["density"]),
        helper.make_node("Mul", ["density", "mask"], ["tissue_density"]),
        helper.make_node("ReduceSum", ["tissue_density", "axis2"], ["density_sum"], keepdims=0),  # [N, 2]
        helper.make_node("Split", ["density_sum", "split2"], ["h_sum", "e_sum"], axis=1),
        helper.make_node("Squeeze", ["h_sum", "axis1"], ["h_total"]),
        helper.make_node("Squeeze", ["e_sum", "axis1"], ["e_total"]),
        helper.make_node("Div", ["h_total", "tissue_count"], ["haematoxylin_od"]),
        helper.make_node("Div", ["e_total", "tissue_count"], ["eosin_od"]),
    ]
    initializers = [
        const("one", 1.0),
        const("inv256", 1.0 / 256.0),
        const("he_from_log", he_from_log),
        const("log_sum_max", log_sum_max),
        axes("flat_shape", [0, 3, -1]),
        axes("axis1", [1]),
        axes("axis2", [2]),
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
    random = rng.uniform(0, 255, size=(4, 3, TILE, TILE)).astype(np.float32)
    white = np.full((1, 3, TILE, TILE), 255.0, dtype=np.float32)
    # Pure stain tiles: the transmitted colour of 0.8 OD of each stain.
    pure = [255.0 * 10 ** (-0.8 * RGB_FROM_HED[s]) for s in range(2)]
    stains = np.stack([np.broadcast_to(p[:, None, None], (3, TILE, TILE)) for p in pure]).astype(np.float32)
    for tiles in (random, white, stains):
        got = dict(zip(("tissue_fraction", "haematoxylin_od", "eosin_od"), session.run(None, {"tiles": tiles})))
        want = reference(tiles)
        for name, value in want.items():
            assert np.abs(got[name] - value).max() < 1e-4, (name, got[name], value)
    out = dict(zip(("tissue_fraction", "haematoxylin_od", "eosin_od"), session.run(None, {"tiles": stains})))
    assert out["haematoxylin_od"][0] > 0.7 and out["eosin_od"][0] < 0.1, out
    assert out["eosin_od"][1] > 0.7 and out["haematoxylin_od"][1] < 0.1, out
    assert session.run(None, {"tiles": white})[0][0] == 0.0

    manifest = json.loads((HERE / "manifest.json").read_text())
    manifest["onnx"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print("model.onnx", manifest["onnx"]["sha256"])


if __name__ == "__main__":
    main()
