"""Train, evaluate and export the bundled `breast-fna-malignancy` model.

Standardised logistic regression on the Wisconsin Diagnostic Breast Cancer (WDBC) fine-needle-aspirate
features that ship inside scikit-learn. Everything the service needs is written beside this script:

  model.onnx                  the exported pipeline (StandardScaler + LogisticRegression, zipmap off)
  manifest.json               the input/output contract onkos enforces, with held-out metrics
  card.md                     the model card a clinician reads
  reference_predictions.json  real cohort rows with the probabilities scikit-learn gives for them;
                              the Rust tests check that the service returns the same numbers

Run from the repository root: `python3 models/breast-fna-malignancy/train.py` (requirements pinned
in models/requirements.txt). The seed is fixed, so a rerun reproduces the committed files.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20261129
NAME = "breast-fna-malignancy"
VERSION = "1.0.0"
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the probability that a breast mass sampled "
    "by fine-needle aspiration is malignant, from the 30 WDBC nuclear features computed from a "
    "digitised FNA image. Not validated for clinical decisions, other sampling methods, other "
    "feature-extraction software or populations unlike the Wisconsin cohort."
)

# Units as defined by Street, Wolberg & Mangasarian (1993): the features are measured on the
# digitised image, so lengths are in image pixels of their capture set-up, not micrometres.
BASE_UNITS = {
    "radius": ("pixel", "mean distance from the nucleus centre to points on its perimeter"),
    "texture": ("1", "standard deviation of grey-scale values"),
    "perimeter": ("pixel", "nucleus perimeter"),
    "area": ("pixel2", "nucleus area"),
    "smoothness": ("1", "local variation in radius lengths"),
    "compactness": ("1", "perimeter^2 / area - 1.0"),
    "concavity": ("1", "severity of concave portions of the contour"),
    "concave_points": ("1", "number of concave portions of the contour"),
    "symmetry": ("1", "symmetry of the nucleus"),
    "fractal_dimension": ("1", "coastline approximation - 1"),
}
STAT_MEANING = {
    "mean": "mean over the nuclei in the image",
    "error": "standard error over the nuclei in the image",
    "worst": "mean of the three largest values in the image",
}


def feature_name(raw: str) -> str:
    return raw.replace(" ", "_").replace(".", "_")


def describe(name: str) -> tuple[str, str]:
    # scikit-learn spells them "mean radius", "radius error" and "worst radius".
    if name.endswith("_error"):
        stat, base = "error", name[: -len("_error")]
    else:
        stat, base = name.split("_", 1)
    unit, meaning = BASE_UNITS[base]
    return unit, f"{meaning}; {STAT_MEANING[stat]}"


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.round(thresholds[best], 3))


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 5) -> list[dict]:
    order = np.argsort(p)
    table = []
    for chunk in np.array_split(order, bins):
        table.append(
            {
                "n": int(len(chunk)),
                "mean_predicted": round(float(p[chunk].mean()), 4),
                "observed_fraction": round(float(y[chunk].mean()), 4),
            }
        )
    return table


def make_pipeline() -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("logit", LogisticRegression(C=1.0, max_iter=10_000)),
        ]
    )


def cross_validate(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[float]]:
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    out_of_fold = np.zeros(len(y))
    fold_auc = []
    for train, test in folds.split(x, y):
        model = make_pipeline().fit(x[train], y[train])
        out_of_fold[test] = model.predict_proba(x[test])[:, 1]
        fold_auc.append(float(roc_auc_score(y[test], out_of_fold[test])))
    return out_of_fold, fold_auc


def main() -> None:
    data = load_breast_cancer()
    x = data.data.astype(np.float64)
    # scikit-learn codes 0 = malignant, 1 = benign; the positive class here is malignant.
    y = (data.target == 0).astype(np.int64)
    features = [feature_name(n) for n in data.feature_names]

    out_of_fold, fold_auc = cross_validate(x, y)
    threshold = youden_threshold(y, out_of_fold)
    decided = out_of_fold >= threshold
    metrics = {
        "method": "stratified 5-fold cross-validation, out-of-fold predictions",
        "seed": SEED,
        "roc_auc": round(float(roc_auc_score(y, out_of_fold)), 4),
        "roc_auc_per_fold": [round(a, 4) for a in fold_auc],
        "accuracy": round(float(accuracy_score(y, decided)), 4),
        "sensitivity": round(float(decided[y == 1].mean()), 4),
        "specificity": round(float((~decided[y == 0]).mean()), 4),
        "brier_score": round(float(brier_score_loss(y, out_of_fold)), 4),
        "calibration_quintiles": calibration_table(y, out_of_fold),
    }

    model = make_pipeline().fit(x, y)
    onnx_model = convert_sklearn(
        model,
        name=NAME,
        initial_types=[("features", FloatTensorType([None, len(features)]))],
        options={id(model.named_steps["logit"]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onnx_bytes = onnx_model.SerializeToString()
    (HERE / "model.onnx").write_bytes(onnx_bytes)

    # The exported graph must reproduce scikit-learn on every cohort row.
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_p = session.run(["probabilities"], {"features": x.astype(np.float32)})[0][:, 1]
    skl_p = model.predict_proba(x)[:, 1]
    max_delta = float(np.abs(onnx_p - skl_p).max())
    assert max_delta < 1e-5, f"ONNX export differs from scikit-learn by {max_delta}"

    inputs = []
    for i, name in enumerate(features):
        unit, meaning = describe(name)
        inputs.append(
            {
                "name": name,
                "unit": unit,
                "description": meaning,
                "physical_range": [0.0, None],
                "training_range": [float(x[:, i].min()), float(x[:, i].max())],
            }
        )
    manifest = {
        "name": NAME,
        "version": VERSION,
        "modality": "features",
        "task": "classification",
        "title": "Breast FNA malignancy (logistic regression, WDBC)",
        "onnx": {
            "file": "model.onnx",
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "input": "features",
            "output": "probabilities",
        },
        "inputs": inputs,
        "labels": ["benign", "malignant"],
        "positive_label": "malignant",
        "threshold": {
            "value": threshold,
            "source": "Youden's J on out-of-fold predictions of stratified 5-fold cross-validation",
        },
        "cohort": {
            "name": "Wisconsin Diagnostic Breast Cancer (WDBC)",
            "loader": "sklearn.datasets.load_breast_cancer",
            "n": int(len(y)),
            "positives": int(y.sum()),
            "citation": (
                "Street WN, Wolberg WH, Mangasarian OL. Nuclear feature extraction for breast tumor "
                "diagnosis. Proc. SPIE 1905, Biomedical Image Processing and Biomedical "
                "Visualization, 1993. doi:10.1117/12.148698"
            ),
            "source": "UCI Machine Learning Repository, doi:10.24432/C5DW2B",
            "licence": "CC BY 4.0",
        },
        "metrics": metrics,
        "intended_use": INTENDED_USE,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    # A spread of real rows: clearly benign, clearly malignant and the ones nearest the threshold.
    order = np.argsort(np.abs(skl_p - threshold))
    picks = sorted(set(order[:4].tolist()) | {int(np.argmin(skl_p)), int(np.argmax(skl_p)), 0, 19})
    references = [
        {
            "row": i,
            "diagnosis": "malignant" if y[i] == 1 else "benign",
            "features": {name: float(x[i, j]) for j, name in enumerate(features)},
            "probability_malignant": float(skl_p[i]),
        }
        for i in picks
    ]
    (HERE / "reference_predictions.json").write_text(json.dumps(references, indent=2) + "\n")

    write_card(manifest, max_delta)
    print(json.dumps({"threshold": threshold, **{k: metrics[k] for k in ("roc_auc", "accuracy")}}))


def write_card(m: dict, max_delta: float) -> None:
    met = m["metrics"]
    rows = "\n".join(
        f"| `{i['name']}` | {i['unit']} | {i['description']} | "
        f"{i['training_range'][0]:.4g} – {i['training_range'][1]:.4g} |"
        for i in m["inputs"]
    )
    calib = "\n".join(
        f"| {c['n']} | {c['mean_predicted']:.3f} | {c['observed_fraction']:.3f} |"
        for c in met["calibration_quintiles"]
    )
    card = f"""# Model card: `{m['name']}` {m['version']}

**Intended use.** {m['intended_use']}

## Model
Standardised logistic regression (scikit-learn `StandardScaler` + `LogisticRegression`, C = 1),
exported to ONNX with skl2onnx (opset 17). Output: P(benign), P(malignant). The exported graph
reproduces scikit-learn on all {m['cohort']['n']} cohort rows to within {max_delta:.1e}.
ONNX sha256 `{m['onnx']['sha256']}` (checked by onkos at load).

## Data
{m['cohort']['name']}: {m['cohort']['n']} fine-needle aspirates of breast masses,
{m['cohort']['positives']} malignant. Loaded with `{m['cohort']['loader']}`; the raw target
(0 = malignant) is recoded so that the positive class is malignant.
Source: {m['cohort']['source']}, licence {m['cohort']['licence']}.
Citation: {m['cohort']['citation']}

## Held-out performance
{met['method']} (seed {met['seed']}):

| metric | value |
|---|---|
| ROC AUC | {met['roc_auc']:.4f} (per fold {', '.join(f'{a:.3f}' for a in met['roc_auc_per_fold'])}) |
| accuracy at threshold | {met['accuracy']:.4f} |
| sensitivity at threshold | {met['sensitivity']:.4f} |
| specificity at threshold | {met['specificity']:.4f} |
| Brier score | {met['brier_score']:.4f} |

Calibration (out-of-fold predictions in quintiles):

| n | mean predicted | observed malignant |
|---|---|---|
{calib}

## Decision threshold
P(malignant) ≥ **{m['threshold']['value']}** is reported as `malignant`.
Chosen by {m['threshold']['source']}.

## Inputs
Names are scikit-learn's column names with spaces replaced by underscores, in this order.
Lengths are in pixels of the original capture set-up; values from other imaging or segmentation
software are on a different scale and outside what this model was shown. Every value must be a finite
number ≥ 0; values outside the training range are accepted and flagged in the result.

| feature | unit | meaning | training range |
|---|---|---|---|
{rows}

## Limitations
A single-centre cohort from the early 1990s, with features from one interactive segmentation
program. No external validation. The metrics above are cross-validated within that cohort and say
nothing about performance elsewhere.
"""
    (HERE / "card.md").write_text(card)


if __name__ == "__main__":
    main()
