"""Shared helpers for the train.py scripts of the bundled onkos models.

Each models/<name>/train.py describes its cohort and model; this module does the rest the same way
for every model: encoding of the caller's inputs into the ONNX feature columns, cross-validation,
ONNX export of Cox models, the assertion that ONNX reproduces the Python model on every cohort row,
and writing manifest.json (schema onkos.manifest/2), reference_predictions.json and card.md.

Everything written is a pure function of the data, the code and the pinned package versions
(models/requirements.txt): seeds are fixed, BLAS runs on one thread and nothing unordered is
serialised, so a rerun reproduces the committed files byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
from onnx import TensorProto, helper, numpy_helper
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.linear_model.coxph import CoxPHOptimizer
from sksurv.metrics import brier_score, concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator
from threadpoolctl import threadpool_limits

SEED = 20261129
SCHEMA = "onkos.manifest/2"
TOLERANCE = 1e-5
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # what skl2onnx 1.20 writes for opset 17; loadable by every ONNX Runtime >= 1.10


# ----------------------------------------------------------------------------------------------
# Inputs and their encoding


def feature_name(raw: str) -> str:
    """The loader's own column name with spaces and dots replaced by underscores."""
    return raw.replace(" ", "_").replace(".", "_")


@dataclass
class Numeric:
    name: str
    unit: str
    description: str
    physical_range: tuple[float | None, float | None]
    per: str  # what one raw unit is, for hazard ratios: "1 year", "1 mm"
    step: float = 1.0  # the step the card quotes hazard ratios for (e.g. 10 years)
    step_label: str | None = None  # "10 years"; defaults to `per`
    kind: str = field(default="numeric", init=False)


@dataclass
class Categorical:
    name: str
    description: str
    levels: list[str]  # the loader's own level strings, in the loader's order
    reference: str
    # Where the loader codes levels as numbers, the codes (as strings) → level: onkos accepts both.
    codes: dict[str, str] | None = None
    kind: str = field(default="categorical", init=False)


Input = Numeric | Categorical


def encoding_of(inputs: Sequence[Input]) -> list[dict]:
    """ONNX feature columns: numerics as they are, one indicator per non-reference level."""
    out: list[dict] = []
    for spec in inputs:
        if isinstance(spec, Numeric):
            out.append({"input": spec.name})
        else:
            out.extend({"input": spec.name, "level": lv} for lv in spec.levels if lv != spec.reference)
    return out


def column_label(col: dict) -> str:
    return col["input"] if "level" not in col else f"{col['input']}={col['level']}"


def encode(df: pd.DataFrame, inputs: Sequence[Input]) -> np.ndarray:
    """Encode caller-facing inputs (a DataFrame with one column per input) to the ONNX columns."""
    for spec in inputs:
        if isinstance(spec, Categorical):
            unknown = set(df[spec.name].unique()) - set(spec.levels)
            assert not unknown, f"{spec.name}: levels {unknown} not in {spec.levels}"
        else:
            assert df[spec.name].notna().all(), f"{spec.name} has missing values"
    cols = []
    for col in encoding_of(inputs):
        values = df[col["input"]]
        if "level" in col:
            cols.append((values == col["level"]).to_numpy(dtype=np.float64))
        else:
            cols.append(values.to_numpy(dtype=np.float64))
    return np.column_stack(cols)


def input_manifest(df: pd.DataFrame, inputs: Sequence[Input]) -> list[dict]:
    out = []
    for spec in inputs:
        if isinstance(spec, Numeric):
            values = df[spec.name].to_numpy(dtype=np.float64)
            lo, hi = spec.physical_range
            assert (lo is None or values.min() >= lo) and (hi is None or values.max() <= hi), spec.name
            out.append(
                {
                    "name": spec.name,
                    "kind": "numeric",
                    "unit": spec.unit,
                    "description": spec.description,
                    "physical_range": [lo, hi],
                    "training_range": [float(values.min()), float(values.max())],
                }
            )
        else:
            counts = df[spec.name].value_counts()
            assert spec.reference in spec.levels
            out.append(
                {
                    "name": spec.name,
                    "kind": "categorical",
                    "description": spec.description,
                    "levels": list(spec.levels),
                    "reference": spec.reference,
                    "training_counts": {lv: int(counts.get(lv, 0)) for lv in spec.levels},
                    **({"codes": dict(spec.codes)} if spec.codes else {}),
                }
            )
    return out


def caller_features(df: pd.DataFrame, inputs: Sequence[Input], i: int) -> dict:
    """Row i exactly as a caller would POST it."""
    row = {}
    for spec in inputs:
        value = df[spec.name].iloc[i]
        row[spec.name] = float(value) if isinstance(spec, Numeric) else str(value)
    return row


# ----------------------------------------------------------------------------------------------
# Small utilities


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """skl2onnx lists the opset imports of some models in an order that depends on Python's string
    hash seed; sort them so that the serialised bytes do not."""
    opsets = sorted(((o.domain, o.version) for o in model.opset_import))
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets)
    return model


def write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_json_rows(path: pathlib.Path, rows: list) -> None:
    """A JSON list with one row per line (reference_predictions.json: every cohort row)."""
    body = ",\n".join("  " + json.dumps(r, allow_nan=False) for r in rows)
    path.write_text("[\n" + body + "\n]\n")


def r4(x: float) -> float:
    return round(float(x), 4)


def run(main: Callable[[], None]) -> None:
    """Run a training script's main() with single-threaded BLAS, so float sums never depend on
    the thread count of the machine."""
    with threadpool_limits(limits=1):
        main()


def fmt_range(lo, hi) -> str:
    a = "−∞" if lo is None else f"{lo:g}"
    b = "∞" if hi is None else f"{hi:g}"
    return f"[{a}, {b}]"


def inputs_table(manifest: dict) -> str:
    lines = [
        "| input | kind | unit | meaning | allowed | training range / levels (n) |",
        "|---|---|---|---|---|---|",
    ]
    for i in manifest["inputs"]:
        if i["kind"] == "numeric":
            lo, hi = i["training_range"]
            lines.append(
                f"| `{i['name']}` | numeric | {i['unit']} | {i['description']} | "
                f"{fmt_range(*i['physical_range'])} | {lo:.4g} – {hi:.4g} |"
            )
        else:
            levels = ", ".join(
                f"`{lv}`{' (reference)' if lv == i['reference'] else ''} ({i['training_counts'][lv]})"
                for lv in i["levels"]
            )
            lines.append(f"| `{i['name']}` | categorical | – | {i['description']} | levels only | {levels} |")
    return "\n".join(lines)


ENCODING_TEXT = """Callers send every input above by name: numbers in the unit shown, categories as the level
strings shown (exactly as the data set's loader spells them). onkos encodes them into the ONNX
feature columns listed in the manifest's `encoding`: a numeric input is passed as it is (any
standardisation is inside the graph), a categorical input becomes one 0/1 indicator per
non-reference level (the reference level is all zeros). Values outside the allowed range are
refused; values outside the training range are accepted and flagged in the result."""


# ----------------------------------------------------------------------------------------------
# Classification


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.round(thresholds[best], 3))


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 5) -> list[dict]:
    order = np.argsort(p, kind="mergesort")
    table = []
    for chunk in np.array_split(order, bins):
        table.append(
            {
                "n": int(len(chunk)),
                "mean_predicted": r4(p[chunk].mean()),
                "observed_fraction": r4(y[chunk].mean()),
            }
        )
    return table


def classification_cv(make_model: Callable, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[float]]:
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    out_of_fold = np.zeros(len(y))
    fold_auc = []
    for train, test in folds.split(x, y):
        model = make_model().fit(x[train], y[train])
        out_of_fold[test] = model.predict_proba(x[test])[:, 1]
        fold_auc.append(float(roc_auc_score(y[test], out_of_fold[test])))
    return out_of_fold, fold_auc


def classification_metrics(y: np.ndarray, out_of_fold: np.ndarray, fold_auc: list[float]) -> tuple[dict, float]:
    threshold = youden_threshold(y, out_of_fold)
    decided = out_of_fold >= threshold
    metrics = {
        "method": "stratified 5-fold cross-validation, out-of-fold predictions",
        "seed": SEED,
        "roc_auc": r4(roc_auc_score(y, out_of_fold)),
        "roc_auc_per_fold": [r4(a) for a in fold_auc],
        "accuracy": r4(accuracy_score(y, decided)),
        "sensitivity": r4(decided[y == 1].mean()),
        "specificity": r4((~decided[y == 0]).mean()),
        "brier_score": r4(brier_score_loss(y, out_of_fold)),
        "calibration_quintiles": calibration_table(y, out_of_fold),
    }
    return metrics, threshold


def check_classifier_onnx(onnx_bytes: bytes, x: np.ndarray, p_python: np.ndarray, input_type: str) -> float:
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    dtype = np.float32 if input_type == "float32" else np.float64
    p_onnx = session.run(["probabilities"], {"features": x.astype(dtype)})[0][:, 1].astype(np.float64)
    max_delta = float(np.abs(p_onnx - p_python).max())
    assert max_delta < TOLERANCE, f"ONNX export differs from scikit-learn by {max_delta}"
    return max_delta


@dataclass
class Cohort:
    name: str
    loader: str
    citation: str
    source: str
    licence: str


def classification_manifest(
    *,
    name: str,
    version: str,
    title: str,
    onnx_bytes: bytes,
    input_type: str,
    df: pd.DataFrame,
    inputs: Sequence[Input],
    labels: list[str],
    positive_label: str,
    threshold: float,
    threshold_source: str,
    explanation: dict | None,
    cohort: Cohort,
    y: np.ndarray,
    cross_validated: dict,
    apparent_auc: float,
    intended_use: str,
) -> dict:
    return {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "modality": "features",
        "task": "classification",
        "title": title,
        "onnx": {
            "file": "model.onnx",
            "sha256": sha256(onnx_bytes),
            "input": "features",
            "input_type": input_type,
            "outputs": {"probabilities": "probabilities"},
        },
        "inputs": input_manifest(df, inputs),
        "encoding": encoding_of(inputs),
        "classification": {
            "labels": labels,
            "positive_label": positive_label,
            "threshold": {"value": threshold, "source": threshold_source},
        },
        "survival": None,
        "explanation": explanation,
        "cohort": {
            "name": cohort.name,
            "loader": cohort.loader,
            "n": int(len(y)),
            "positives": int(y.sum()),
            "events": None,
            "citation": cohort.citation,
            "source": cohort.source,
            "licence": cohort.licence,
        },
        "metrics": {"cross_validated": cross_validated, "apparent": {"roc_auc": r4(apparent_auc)}},
        "hazard_ratios": None,
        "intended_use": intended_use,
    }


def classification_references(df, inputs, y, p) -> list[dict]:
    return [
        {
            "row": i,
            "features": caller_features(df, inputs, i),
            "outcome": {"label": int(y[i])},
            "expected": {"probability": float(p[i])},
        }
        for i in range(len(y))
    ]


def classification_card(m: dict, *, model_text: str, data_text: str, inputs_text: str, limitations: str) -> str:
    met = m["metrics"]["cross_validated"]
    cls = m["classification"]
    calib = "\n".join(
        f"| {c['n']} | {c['mean_predicted']:.3f} | {c['observed_fraction']:.3f} |"
        for c in met["calibration_quintiles"]
    )
    return f"""# Model card: `{m['name']}` {m['version']}

**Intended use.** {m['intended_use']}

## Model
{model_text}
ONNX input `features` ({m['onnx']['input_type']}, one column per input in the order below),
output `probabilities` = P({cls['labels'][0]}), P({cls['labels'][1]}).
ONNX sha256 `{m['onnx']['sha256']}` (checked by onkos at load).

## Data
{data_text}
Loaded with `{m['cohort']['loader']}`. Source: {m['cohort']['source'].rstrip('.')}.
Licence: {m['cohort']['licence'].rstrip('.')}.
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

| n | mean predicted | observed {cls['positive_label']} |
|---|---|---|
{calib}

Apparent ROC AUC (the final model, fitted on all {m['cohort']['n']} rows, scored on the same rows;
optimistic by construction, given so that the service's answers can be checked against it):
{m['metrics']['apparent']['roc_auc']:.4f}.

## Decision threshold
P({cls['positive_label']}) ≥ **{cls['threshold']['value']}** is reported as `{cls['positive_label']}`.
Chosen by {cls['threshold']['source']}.

## Inputs
{inputs_text}

{ENCODING_TEXT}

{inputs_table(m)}

## Limitations
{limitations}
"""


# ----------------------------------------------------------------------------------------------
# Cox proportional hazards


def surv_y(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    return np.array(list(zip(event.astype(bool), time.astype(np.float64))), dtype=[("event", "?"), ("time", "f8")])


def fit_cox(z: np.ndarray, event: np.ndarray, time: np.ndarray, alpha: float = 0.0) -> Pipeline:
    """Standardise, then Cox PH with Breslow ties; the Breslow baseline is fitted on the centred
    linear predictor, so baseline_survival_ is the survival at the training mean covariates."""
    model = Pipeline(
        [
            ("scale", StandardScaler()),
            ("cox", CoxPHSurvivalAnalysis(alpha=alpha, ties="breslow", n_iter=1000, tol=1e-12)),
        ]
    )
    return model.fit(z, surv_y(event, time))


def log_partial_likelihood(lp: np.ndarray, event: np.ndarray, time: np.ndarray) -> float:
    """Cox log partial likelihood of linear predictors lp, Breslow handling of ties."""
    order = np.argsort(-time, kind="mergesort")
    lp_s, e_s, t_s = lp[order], event[order].astype(bool), time[order]
    shift = lp_s.max()
    at_risk = np.cumsum(np.exp(lp_s - shift))  # descending time: all with t_j >= t_i ...
    last = np.searchsorted(-t_s, -t_s, side="right") - 1  # ... including ties with t_i
    return float(np.sum((lp_s - shift - np.log(at_risk[last]))[e_s]))


def select_alpha(z, event, time, grid: Sequence[float]) -> tuple[float, list[float]]:
    """Ridge penalty by inner stratified 5-fold cross-validated partial likelihood
    (Verweij & van Houwelingen, Stat Med 1993): sum over folds k of l(b_-k) - l_-k(b_-k).
    The largest alpha with the best score."""
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED).split(z, event))
    scores = []
    for alpha in grid:
        score = 0.0
        for train, _ in folds:
            model = fit_cox(z[train], event[train], time[train], alpha)
            score += log_partial_likelihood(model.predict(z), event, time)
            score -= log_partial_likelihood(model.predict(z[train]), event[train], time[train])
        scores.append(score)
    best = max(scores)
    chosen = max(a for a, s in zip(grid, scores) if s == best)
    return float(chosen), scores


def cox_predict(model: Pipeline, z: np.ndarray, horizons: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The Python model's outputs: centred linear predictor and S(t_h | x)."""
    risk = model.predict(z)
    funcs = model.predict_survival_function(z)
    surv = np.array([fn(np.asarray(horizons, dtype=np.float64)) for fn in funcs])
    return risk, surv


def km_at(event, time, horizons) -> list[float]:
    t, s = kaplan_meier_estimator(event.astype(bool), time)
    return [float(s[t <= h][-1]) if np.any(t <= h) else 1.0 for h in horizons]


@dataclass
class CoxCV:
    out_of_fold_risk: np.ndarray
    out_of_fold_survival: np.ndarray
    fold_c: list[float]
    fold_alpha: list[float]


def cox_cv(fit: Callable, z, event, time, horizons) -> CoxCV:
    """`fit(z, event, time) -> (model, alpha)`; stratified on the event indicator."""
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    risk = np.zeros(len(event))
    surv = np.zeros((len(event), len(horizons)))
    fold_c, fold_alpha = [], []
    for train, test in folds.split(z, event):
        model, alpha = fit(z[train], event[train], time[train])
        risk[test], surv[test] = cox_predict(model, z[test], horizons)
        fold_c.append(float(concordance_index_censored(event[test].astype(bool), time[test], risk[test])[0]))
        fold_alpha.append(alpha)
    return CoxCV(risk, surv, fold_c, fold_alpha)


def survival_metrics(cv: CoxCV, event, time, horizons, method: str) -> dict:
    y = surv_y(event, time)
    _, brier = brier_score(y, y, cv.out_of_fold_survival, np.asarray(horizons, dtype=np.float64))
    km = km_at(event, time, horizons)
    return {
        "method": method,
        "seed": SEED,
        "c_index": r4(concordance_index_censored(event.astype(bool), time, cv.out_of_fold_risk)[0]),
        "c_index_per_fold": [r4(c) for c in cv.fold_c],
        "horizons": [
            {
                "days": int(h),
                "brier_score": r4(brier[j]),
                "mean_predicted_survival": r4(cv.out_of_fold_survival[:, j].mean()),
                "kaplan_meier_survival": r4(km[j]),
            }
            for j, h in enumerate(horizons)
        ],
    }


def null_brier(event, time, horizons) -> list[float]:
    """Brier score of the cohort's own Kaplan–Meier curve given to everybody (no covariates)."""
    y = surv_y(event, time)
    km = np.tile(km_at(event, time, horizons), (len(event), 1))
    return [r4(b) for b in brier_score(y, y, km, np.asarray(horizons, dtype=np.float64))[1]]


@dataclass
class CoxExport:
    onnx_bytes: bytes
    coef_raw: np.ndarray  # per raw unit of each encoding column
    means: np.ndarray  # training mean of each encoding column
    intercept: float  # b = -means . coef_raw
    baseline: np.ndarray  # S0 at the horizons, at the mean covariates


def cox_export(name: str, model: Pipeline, horizons: Sequence[float]) -> CoxExport:
    scaler: StandardScaler = model.named_steps["scale"]
    cox: CoxPHSurvivalAnalysis = model.named_steps["cox"]
    coef_raw = cox.coef_ / scaler.scale_
    means = scaler.mean_.copy()
    intercept = float(-np.dot(means, coef_raw))
    baseline = np.asarray(cox.baseline_survival_(np.asarray(horizons, dtype=np.float64)), dtype=np.float64)
    k, h = len(coef_raw), len(horizons)

    # Computed in float64 inside the graph (input and outputs are float32), so the only rounding
    # against the Python model is that of the float32 input values and of the outputs.
    graph = helper.make_graph(
        nodes=[
            helper.make_node("Cast", ["features"], ["x64"], to=TensorProto.DOUBLE),
            helper.make_node("MatMul", ["x64", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["lp64"]),
            helper.make_node("Cast", ["lp64"], ["risk_score"], to=TensorProto.FLOAT),
            helper.make_node("Exp", ["lp64"], ["hazard_ratio"]),
            helper.make_node("Pow", ["baseline_survival", "hazard_ratio"], ["s64"]),
            helper.make_node("Cast", ["s64"], ["survival"], to=TensorProto.FLOAT),
        ],
        name=name,
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", k])],
        outputs=[
            helper.make_tensor_value_info("risk_score", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("survival", TensorProto.FLOAT, ["N", h]),
        ],
        initializer=[
            numpy_helper.from_array(coef_raw.reshape(k, 1).astype(np.float64), "W"),
            numpy_helper.from_array(np.array([intercept], dtype=np.float64), "b"),
            numpy_helper.from_array(baseline.reshape(1, h), "baseline_survival"),
        ],
        doc_string=(
            "Cox proportional hazards: risk_score = features . W + b = log hazard ratio versus the "
            "training mean covariates; survival[:, h] = baseline_survival[h] ** exp(risk_score)."
        ),
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="onkos_train",
        producer_version="2",
        ir_version=ONNX_IR_VERSION,
    )
    onnx.checker.check_model(proto, full_check=True)
    return CoxExport(proto.SerializeToString(), coef_raw, means, intercept, baseline)


def check_cox_onnx(export: CoxExport, z: np.ndarray, risk: np.ndarray, surv: np.ndarray) -> float:
    session = ort.InferenceSession(export.onnx_bytes, providers=["CPUExecutionProvider"])
    o_risk, o_surv = session.run(["risk_score", "survival"], {"features": z.astype(np.float32)})
    assert o_risk.shape == (len(z), 1) and o_surv.shape == surv.shape
    d_risk = float(np.abs(o_risk[:, 0].astype(np.float64) - risk).max())
    d_surv = float(np.abs(o_surv.astype(np.float64) - surv).max())
    assert d_risk < TOLERANCE, f"ONNX risk_score differs from Python by {d_risk}"
    assert d_surv < TOLERANCE, f"ONNX survival differs from Python by {d_surv}"
    # The manifest's explanation must also reproduce the risk score exactly.
    assert np.abs((z - export.means) @ export.coef_raw - risk).max() < 1e-9
    return max(d_risk, d_surv)


def cox_standard_errors(model: Pipeline, z, event, time) -> np.ndarray:
    """Standard errors per raw unit from the observed information of the Breslow partial
    likelihood (unpenalised models only)."""
    scaler = model.named_steps["scale"]
    cox = model.named_steps["cox"]
    zs = scaler.transform(z)
    optimizer = CoxPHOptimizer(zs, event.astype(bool), time, np.zeros(zs.shape[1]), "breslow")
    optimizer.update(cox.coef_)
    information = optimizer.hessian * len(event)
    return np.sqrt(np.diag(np.linalg.inv(information))) / scaler.scale_


def hazard_ratios(encoding: list[dict], inputs: Sequence[Input], coef_raw: np.ndarray) -> list[dict]:
    specs = {s.name: s for s in inputs}
    out = []
    for col, beta in zip(encoding, coef_raw):
        spec = specs[col["input"]]
        per = spec.per if isinstance(spec, Numeric) else f"{col['level']} vs {spec.reference}"
        out.append({"column": column_label(col), "hazard_ratio": float(np.exp(beta)), "per": per})
    return out


def survival_manifest(
    *,
    name: str,
    version: str,
    title: str,
    export: CoxExport,
    df: pd.DataFrame,
    inputs: Sequence[Input],
    event_name: str,
    horizons: Sequence[int],
    train_risk: np.ndarray,
    cohort: Cohort,
    event: np.ndarray,
    cross_validated: dict,
    apparent_c: float,
    intended_use: str,
) -> dict:
    encoding = encoding_of(inputs)
    return {
        "schema": SCHEMA,
        "name": name,
        "version": version,
        "modality": "features",
        "task": "survival",
        "title": title,
        "onnx": {
            "file": "model.onnx",
            "sha256": sha256(export.onnx_bytes),
            "input": "features",
            "input_type": "float32",
            "outputs": {"risk_score": "risk_score", "survival": "survival"},
        },
        "inputs": input_manifest(df, inputs),
        "encoding": encoding,
        "classification": None,
        "survival": {
            "event": event_name,
            "time_unit": "days",
            "horizons_days": [int(h) for h in horizons],
            "baseline_survival": [float(s) for s in export.baseline],
            "risk_score_percentiles": [float(v) for v in np.percentile(train_risk, np.arange(101))],
        },
        "explanation": {
            "kind": "linear",
            "scale": "log-hazard",
            "coefficients": [float(c) for c in export.coef_raw],
            "means": [float(v) for v in export.means],
        },
        "cohort": {
            "name": cohort.name,
            "loader": cohort.loader,
            "n": int(len(event)),
            "positives": None,
            "events": int(event.sum()),
            "citation": cohort.citation,
            "source": cohort.source,
            "licence": cohort.licence,
        },
        "metrics": {"cross_validated": cross_validated, "apparent": {"c_index": r4(apparent_c)}},
        "hazard_ratios": hazard_ratios(encoding, inputs, export.coef_raw),
        "intended_use": intended_use,
    }


def survival_references(df, inputs, event, time, risk, surv) -> list[dict]:
    return [
        {
            "row": i,
            "features": caller_features(df, inputs, i),
            "outcome": {"time": float(time[i]), "event": int(event[i])},
            "expected": {"risk_score": float(risk[i]), "survival": [float(s) for s in surv[i]]},
        }
        for i in range(len(event))
    ]


def years(days: int) -> str:
    y = days / 365.25
    return f"{y:.0f} y" if abs(y - round(y)) < 0.01 else f"≈ {days / 30.4375:.0f} months"


def survival_card(
    m: dict,
    inputs: Sequence[Input],
    *,
    model_text: str,
    data_text: str,
    inputs_text: str,
    limitations: str,
    max_delta: float,
    null_brier_scores: list[float],
    standard_errors: np.ndarray | None,
    fold_alpha: list[float] | None,
) -> str:
    met = m["metrics"]["cross_validated"]
    s = m["survival"]
    specs = {sp.name: sp for sp in inputs}
    horizon_rows = "\n".join(
        f"| {h['days']} ({years(h['days'])}) | {h['brier_score']:.4f} | {nb:.4f} | "
        f"{h['mean_predicted_survival']:.3f} | {h['kaplan_meier_survival']:.3f} |"
        for h, nb in zip(met["horizons"], null_brier_scores)
    )
    hr_lines = []
    for j, (col, hr) in enumerate(zip(m["encoding"], m["hazard_ratios"])):
        spec = specs[col["input"]]
        beta = m["explanation"]["coefficients"][j]
        if isinstance(spec, Numeric):
            step, label = spec.step, spec.step_label or spec.per
        else:
            step, label = 1.0, hr["per"]
        ci = "–"
        if standard_errors is not None:
            lo = np.exp(step * (beta - 1.959964 * standard_errors[j]))
            hi = np.exp(step * (beta + 1.959964 * standard_errors[j]))
            ci = f"{lo:.3f} – {hi:.3f}"
        hr_lines.append(f"| `{hr['column']}` | {label} | {np.exp(step * beta):.3f} | {ci} |")
    hr_table = "\n".join(hr_lines)
    alpha_text = ""
    if fold_alpha is not None:
        alpha_text = (
            "\nRidge penalty chosen inside each training fold (nested): "
            + ", ".join(f"{a:g}" for a in fold_alpha)
            + ".\n"
        )
    ci_note = (
        "95% confidence intervals are Wald intervals from the observed information of the Breslow "
        "partial likelihood."
        if standard_errors is not None
        else "The estimates are ridge-shrunk towards 1 and no confidence intervals are given: "
        "they are not unbiased effect estimates and should not be read as such."
    )
    return f"""# Model card: `{m['name']}` {m['version']}

**Intended use.** {m['intended_use']}

## Model
{model_text}
Breslow estimate of the baseline survival, taken at the training cohort's mean covariate vector.
The ONNX graph (input `features`, float32, one column per entry of the manifest's `encoding`)
computes `risk_score` = log hazard ratio versus a patient with the training mean covariates
(0 = average risk, +0.69 = twice the hazard) and `survival` = S0(t)^exp(risk_score) at
{', '.join(f'{h} days' for h in s['horizons_days'])}, with
S0 = {', '.join(f'{v:.4f}' for v in s['baseline_survival'])}. The graph reproduces the Python model
(scikit-survival) on all {m['cohort']['n']} cohort rows to within {max_delta:.1e}.
ONNX sha256 `{m['onnx']['sha256']}` (checked by onkos at load).

## Data
{data_text}
Endpoint: {s['event']}; time in days. {m['cohort']['n']} patients, {m['cohort']['events']} events.
Loaded with `{m['cohort']['loader']}`. Source: {m['cohort']['source'].rstrip('.')}.
Licence: {m['cohort']['licence'].rstrip('.')}.
Citation: {m['cohort']['citation']}

## Held-out performance
{met['method']} (seed {met['seed']}).

Harrell's C-index of the out-of-fold risk scores: **{met['c_index']:.4f}**
(per fold {', '.join(f'{c:.3f}' for c in met['c_index_per_fold'])}).
{alpha_text}
Per horizon: time-dependent Brier score of the out-of-fold survival (inverse-probability-of-censoring
weighted, scikit-survival), next to the Brier score of the cohort's own Kaplan–Meier curve given to
everyone (no covariates; apparent, for reference), and calibration-in-the-large: the mean
out-of-fold predicted survival against the Kaplan–Meier estimate of the whole cohort.

| horizon (days) | Brier (model, out-of-fold) | Brier (Kaplan–Meier, no covariates) | mean predicted S | Kaplan–Meier S |
|---|---|---|---|---|
{horizon_rows}

Apparent C-index (the final model, fitted on all {m['cohort']['n']} rows, scored on the same rows;
optimistic by construction, given so that the service's answers can be checked against it):
{m['metrics']['apparent']['c_index']:.4f}.

## Hazard ratios
Final model, fitted on the whole cohort. The manifest gives them per 1 raw unit; here they are per
the step shown. {ci_note}

| column | per | hazard ratio | 95% CI |
|---|---|---|---|
{hr_table}

## Inputs
{inputs_text}

{ENCODING_TEXT}

{inputs_table(m)}

## Limitations
{limitations}
"""


# ----------------------------------------------------------------------------------------------
# Whole Cox pipeline, shared by the four survival models


def train_cox_model(
    *,
    here: pathlib.Path,
    name: str,
    version: str,
    title: str,
    df: pd.DataFrame,
    inputs: Sequence[Input],
    event: np.ndarray,
    time: np.ndarray,
    horizons: Sequence[int],
    event_name: str,
    cohort: Cohort,
    intended_use: str,
    model_text: str,
    data_text: str,
    inputs_text: str,
    limitations: str,
    alpha_grid: Sequence[float] | None = None,
) -> dict:
    """Cross-validate, fit on everything, export, check, and write the four files."""
    event = event.astype(np.int64)
    time = time.astype(np.float64)
    z = encode(df, inputs)
    assert np.isfinite(z).all()

    if alpha_grid is None:
        def fit(zz, ee, tt):
            return fit_cox(zz, ee, tt), 0.0
        method = (
            "stratified (on the event indicator) 5-fold cross-validation; out-of-fold risk scores "
            "and survival pooled over the folds"
        )
    else:
        def fit(zz, ee, tt):
            alpha, _ = select_alpha(zz, ee, tt, alpha_grid)
            return fit_cox(zz, ee, tt, alpha), alpha
        method = (
            "stratified (on the event indicator) 5-fold cross-validation; out-of-fold risk scores "
            "and survival pooled over the folds; ridge penalty chosen inside each training fold by "
            f"the cross-validated partial likelihood of an inner stratified 5-fold split "
            f"(Verweij & van Houwelingen 1993) over alpha in "
            f"{{{', '.join(f'{a:g}' for a in alpha_grid)}}}"
        )

    check = fit_cox(z, event, time)
    zs = check.named_steps["scale"].transform(z)
    optimizer = CoxPHOptimizer(zs, event.astype(bool), time, np.zeros(zs.shape[1]), "breslow")
    reference = -optimizer.nlog_likelihood(check.named_steps["cox"].coef_) * len(event)
    assert abs(log_partial_likelihood(check.predict(z), event, time) - reference) < 1e-6 * abs(reference)

    cv = cox_cv(fit, z, event, time, horizons)
    cross_validated = survival_metrics(cv, event, time, horizons, method)

    model, alpha = fit(z, event, time)
    risk, surv = cox_predict(model, z, horizons)
    export = cox_export(name, model, horizons)
    max_delta = check_cox_onnx(export, z, risk, surv)
    (here / "model.onnx").write_bytes(export.onnx_bytes)

    apparent_c = concordance_index_censored(event.astype(bool), time, risk)[0]
    manifest = survival_manifest(
        name=name,
        version=version,
        title=title,
        export=export,
        df=df,
        inputs=inputs,
        event_name=event_name,
        horizons=horizons,
        train_risk=risk,
        cohort=cohort,
        event=event,
        cross_validated=cross_validated,
        apparent_c=apparent_c,
        intended_use=intended_use,
    )
    write_json(here / "manifest.json", manifest)
    write_json_rows(here / "reference_predictions.json", survival_references(df, inputs, event, time, risk, surv))

    standard_errors = cox_standard_errors(model, z, event, time) if alpha_grid is None else None
    if alpha_grid is not None:
        model_text = model_text.replace("{alpha}", f"{alpha:g}")
    card = survival_card(
        manifest,
        inputs,
        model_text=model_text,
        data_text=data_text,
        inputs_text=inputs_text,
        limitations=limitations,
        max_delta=max_delta,
        null_brier_scores=null_brier(event, time, horizons),
        standard_errors=standard_errors,
        fold_alpha=cv.fold_alpha if alpha_grid is not None else None,
    )
    (here / "card.md").write_text(card)
    summary = {
        "name": name,
        "c_index_cv": cross_validated["c_index"],
        "c_index_apparent": manifest["metrics"]["apparent"]["c_index"],
        "max_onnx_delta": max_delta,
    }
    if alpha_grid is not None:
        summary["alpha"] = alpha
    print(json.dumps(summary))
    return manifest


# ----------------------------------------------------------------------------------------------
# The Wisconsin Diagnostic Breast Cancer inputs, shared by the two WDBC classifiers

# Units as defined by Street, Wolberg & Mangasarian (1993): the features are measured on the
# digitised image, so lengths are in image pixels of their capture set-up, not micrometres.
WDBC_BASE_UNITS = {
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
WDBC_STAT_MEANING = {
    "mean": "mean over the nuclei in the image",
    "error": "standard error over the nuclei in the image",
    "worst": "mean of the three largest values in the image",
}
WDBC_COHORT = Cohort(
    name="Wisconsin Diagnostic Breast Cancer (WDBC)",
    loader="sklearn.datasets.load_breast_cancer",
    citation=(
        "Street WN, Wolberg WH, Mangasarian OL. Nuclear feature extraction for breast tumor "
        "diagnosis. Proc. SPIE 1905, Biomedical Image Processing and Biomedical "
        "Visualization, 1993. doi:10.1117/12.148698"
    ),
    source="UCI Machine Learning Repository, doi:10.24432/C5DW2B (copy shipped in scikit-learn)",
    licence="CC BY 4.0",
)
WDBC_DATA_TEXT = """Wisconsin Diagnostic Breast Cancer (WDBC): 569 fine-needle aspirates of breast masses,
212 malignant, 357 benign (University of Wisconsin Hospitals, 1990s). The raw target
(0 = malignant) is recoded so that the positive class is malignant."""
WDBC_INPUTS_TEXT = """The 30 WDBC nuclear features, named as scikit-learn names them with spaces replaced by
underscores, in scikit-learn's order. Lengths are in pixels of the original capture set-up; values
from other imaging or segmentation software are on a different scale and outside what this model
was shown. Every value must be a finite number ≥ 0."""


def wdbc_describe(name: str) -> tuple[str, str]:
    # scikit-learn spells them "mean radius", "radius error" and "worst radius".
    if name.endswith("_error"):
        stat, base = "error", name[: -len("_error")]
    else:
        stat, base = name.split("_", 1)
    unit, meaning = WDBC_BASE_UNITS[base]
    return unit, f"{meaning}; {WDBC_STAT_MEANING[stat]}"


def load_wdbc() -> tuple[pd.DataFrame, list[Input], np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [feature_name(n) for n in data.feature_names]
    df = pd.DataFrame(data.data.astype(np.float64), columns=names)
    inputs: list[Input] = []
    for n in names:
        unit, meaning = wdbc_describe(n)
        inputs.append(Numeric(n, unit, meaning, (0.0, None), per="1 unit" if unit == "1" else f"1 {unit}"))
    # scikit-learn codes 0 = malignant, 1 = benign; the positive class here is malignant.
    y = (data.target == 0).astype(np.int64)
    return df, inputs, y
