"""Train, evaluate and export the bundled `breast-fna-malignancy-gb` model.

Gradient-boosted decision trees (scikit-learn's classic GradientBoostingClassifier; skl2onnx cannot
export HistGradientBoosting) on the Wisconsin Diagnostic Breast Cancer (WDBC) fine-needle-aspirate
features that ship inside scikit-learn. Same inputs, labels and cohort as `breast-fna-malignancy`;
a non-linear alternative to compare against it. Writes model.onnx, manifest.json, card.md and
reference_predictions.json beside this script.

Run from the repository root: `python3 models/breast-fna-malignancy-gb/train.py` (or all models
with `python3 models/train_all.py`; requirements pinned in models/requirements.txt).
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from skl2onnx import convert_sklearn  # noqa: E402
from skl2onnx.common.data_types import FloatTensorType  # noqa: E402
from sklearn.ensemble import GradientBoostingClassifier  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import onkos_train as ot  # noqa: E402

NAME = "breast-fna-malignancy-gb"
VERSION = "1.0.0"
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the probability that a breast mass sampled "
    "by fine-needle aspiration is malignant, from the 30 WDBC nuclear features computed from a "
    "digitised FNA image, with gradient-boosted trees. Not validated for clinical decisions, other "
    "sampling methods, other feature-extraction software or populations unlike the Wisconsin cohort."
)


def make_model() -> GradientBoostingClassifier:
    # scikit-learn defaults, written out: 100 trees of depth 3, learning rate 0.1, no subsampling.
    return GradientBoostingClassifier(
        n_estimators=100, learning_rate=0.1, max_depth=3, subsample=1.0, random_state=ot.SEED
    )


def main() -> None:
    df, inputs, y = ot.load_wdbc()
    x = ot.encode(df, inputs)

    out_of_fold, fold_auc = ot.classification_cv(make_model, x, y)
    cross_validated, threshold = ot.classification_metrics(y, out_of_fold, fold_auc)

    model = make_model().fit(x, y)
    onnx_model = convert_sklearn(
        model,
        name=NAME,
        initial_types=[("features", FloatTensorType([None, x.shape[1]]))],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onnx_bytes = ot.canonical_opsets(onnx_model).SerializeToString()
    (HERE / "model.onnx").write_bytes(onnx_bytes)

    # scikit-learn's trees compare float32 copies of the inputs, so a float32 ONNX input takes the
    # same branches; checked on every cohort row.
    p = model.predict_proba(x)[:, 1]
    max_delta = ot.check_classifier_onnx(onnx_bytes, x, p, "float32")

    manifest = ot.classification_manifest(
        name=NAME,
        version=VERSION,
        title="Breast FNA malignancy (gradient boosting, WDBC)",
        onnx_bytes=onnx_bytes,
        input_type="float32",
        df=df,
        inputs=inputs,
        labels=["benign", "malignant"],
        positive_label="malignant",
        threshold=threshold,
        threshold_source="Youden's J on out-of-fold predictions of stratified 5-fold cross-validation",
        explanation=None,
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
            "Gradient-boosted decision trees (scikit-learn `GradientBoostingClassifier`: 100 trees of "
            f"depth 3, learning rate 0.1, log-loss, no subsampling, random_state {ot.SEED}), exported "
            "to ONNX with skl2onnx (opset 17, ai.onnx.ml 3, `TreeEnsembleClassifier`). No feature "
            "scaling (trees do not need it). The exported graph reproduces scikit-learn on all "
            f"{len(y)} cohort rows to within {max_delta:.1e} with float32 input (scikit-learn's trees "
            "themselves compare float32 copies of the inputs). Not a linear model: the manifest has no "
            "`explanation`."
        ),
        data_text=ot.WDBC_DATA_TEXT,
        inputs_text=ot.WDBC_INPUTS_TEXT,
        limitations=(
            "A single-centre cohort from the early 1990s, with features from one interactive "
            "segmentation program. Tree ensembles are step functions of their inputs: predictions "
            "jump at split points and are flat outside the training range, so values beyond it are "
            "treated like the most extreme training values. The apparent AUC is near 1 because "
            "boosted trees fit the training rows closely; only the cross-validated figures are a "
            "held-out estimate. The Youden threshold is low because out-of-fold probabilities of "
            "boosted trees sit close to 0 or 1, so the best cut falls in the sparse low range; it "
            "favours sensitivity over specificity. It does no better than the logistic regression "
            "(`breast-fna-malignancy`) on this cohort. No external validation; the metrics say "
            "nothing about performance elsewhere."
        ),
    )
    (HERE / "card.md").write_text(card)
    print(
        '{"name": "%s", "threshold": %s, "roc_auc_cv": %s, "roc_auc_apparent": %s, "max_onnx_delta": %.3g}'
        % (NAME, threshold, cross_validated["roc_auc"], manifest["metrics"]["apparent"]["roc_auc"], max_delta)
    )


if __name__ == "__main__":
    ot.run(main)
