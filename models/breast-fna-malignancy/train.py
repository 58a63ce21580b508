"""Train, evaluate and export the bundled `breast-fna-malignancy` model.

Standardised logistic regression on the Wisconsin Diagnostic Breast Cancer (WDBC) fine-needle-aspirate
features that ship inside scikit-learn. Everything the service needs is written beside this script:

  model.onnx                  the exported pipeline (StandardScaler + LogisticRegression, zipmap off)
  manifest.json               the input/output contract onkos enforces (onkos.manifest/2), with
                              cross-validated and apparent metrics
  card.md                     the model card a clinician reads
  reference_predictions.json  every cohort row with the probability scikit-learn gives for it;
                              the Rust tests check that the service returns the same numbers

Run from the repository root: `python3 models/breast-fna-malignancy/train.py` (or all models with
`python3 models/train_all.py`; requirements pinned in models/requirements.txt). The seed is fixed,
so a rerun reproduces the committed files.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import onkos_train as ot  # noqa: E402

NAME = "breast-fna-malignancy"
VERSION = "1.0.0"
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the probability that a breast mass sampled "
    "by fine-needle aspiration is malignant, from the 30 WDBC nuclear features computed from a "
    "digitised FNA image. Not validated for clinical decisions, other sampling methods, other "
    "feature-extraction software or populations unlike the Wisconsin cohort."
)


def make_pipeline() -> Pipeline:
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("logit", LogisticRegression(C=1.0, max_iter=10_000)),
        ]
    )


def main() -> None:
    df, inputs, y = ot.load_wdbc()
    x = ot.encode(df, inputs)  # the 30 numeric columns as they are

    out_of_fold, fold_auc = ot.classification_cv(make_pipeline, x, y)
    cross_validated, threshold = ot.classification_metrics(y, out_of_fold, fold_auc)

    model = make_pipeline().fit(x, y)
    onnx_model = convert_sklearn(
        model,
        name=NAME,
        initial_types=[("features", FloatTensorType([None, x.shape[1]]))],
        options={id(model.named_steps["logit"]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onnx_bytes = onnx_model.SerializeToString()
    (HERE / "model.onnx").write_bytes(onnx_bytes)

    # The exported graph must reproduce scikit-learn on every cohort row.
    p = model.predict_proba(x)[:, 1]
    max_delta = ot.check_classifier_onnx(onnx_bytes, x, p, "float32")

    # Effect of +1 raw unit on the log-odds: the standardisation folded into the coefficients.
    scaler, logit = model.named_steps["scale"], model.named_steps["logit"]
    coef_raw = logit.coef_[0] / scaler.scale_
    assert np.abs((x - scaler.mean_) @ coef_raw + logit.intercept_[0] - logit.decision_function(scaler.transform(x))).max() < 1e-9
    explanation = {
        "kind": "linear",
        "scale": "log-odds",
        "coefficients": [float(c) for c in coef_raw],
        "means": [float(v) for v in scaler.mean_],
    }

    manifest = ot.classification_manifest(
        name=NAME,
        version=VERSION,
        title="Breast FNA malignancy (logistic regression, WDBC)",
        onnx_bytes=onnx_bytes,
        input_type="float32",
        df=df,
        inputs=inputs,
        labels=["benign", "malignant"],
        positive_label="malignant",
        threshold=threshold,
        threshold_source="Youden's J on out-of-fold predictions of stratified 5-fold cross-validation",
        explanation=explanation,
        cohort=ot.WDBC_COHORT,
        y=y,
        cross_validated=cross_validated,
        apparent_auc=roc_auc_score(y, p),
        intended_use=INTENDED_USE,
    )
    ot.write_json(HERE / "manifest.json", manifest)
    ot.write_json_rows(HERE / "reference_predictions.json", ot.classification_references(df, inputs, y, p))

    card = ot.classification_card(
        manifest,
        model_text=(
            "Standardised logistic regression (scikit-learn `StandardScaler` + `LogisticRegression`, "
            "L2 penalty, C = 1), exported to ONNX with skl2onnx (opset 17). The exported graph "
            f"reproduces scikit-learn on all {len(y)} cohort rows to within {max_delta:.1e}. The "
            "manifest's `explanation` gives the change in log-odds per +1 raw unit of each input "
            "(coefficient ÷ training standard deviation) and the training means."
        ),
        data_text=ot.WDBC_DATA_TEXT,
        inputs_text=ot.WDBC_INPUTS_TEXT,
        limitations=(
            "A single-centre cohort from the early 1990s, with features from one interactive "
            "segmentation program. Many of the 30 features are strongly correlated (radius, "
            "perimeter and area), so single coefficients are not interpretable as independent "
            "effects. No external validation. The metrics above are cross-validated within that "
            "cohort and say nothing about performance elsewhere."
        ),
    )
    (HERE / "card.md").write_text(card)
    print(
        '{"name": "%s", "threshold": %s, "roc_auc_cv": %s, "roc_auc_apparent": %s, "max_onnx_delta": %.3g}'
        % (NAME, threshold, cross_validated["roc_auc"], manifest["metrics"]["apparent"]["roc_auc"], max_delta)
    )


if __name__ == "__main__":
    ot.run(main)
