"""Train, evaluate and export the bundled `breast-metastasis-76gene` model.

Ridge-penalised Cox model of time to distant metastasis in the TRANSBIG validation series of the
76-gene signature (Desmedt et al. 2007, GEO GSE7390; 198 node-negative, systemically untreated
patients), from the expression of the 76 signature probe sets plus age, tumour size, grade and
oestrogen-receptor status, the copy that ships inside scikit-survival. Writes model.onnx,
manifest.json, card.md and reference_predictions.json beside this script; the shared machinery
(cross-validation, ONNX export, manifest and card) is in models/onkos_train.py.

Run from the repository root: `python3 models/breast-metastasis-76gene/train.py` (or all models
with `python3 models/train_all.py`; requirements pinned in models/requirements.txt).
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from sksurv.datasets import load_breast_cancer  # noqa: E402

import onkos_train as ot  # noqa: E402
from onkos_train import Categorical, Numeric  # noqa: E402

NAME = "breast-metastasis-76gene"
VERSION = "1.0.0"
HORIZONS = [1095, 1826, 3652]
ALPHA_GRID = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0]
CLINICAL = ["age", "size", "grade", "er"]
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the relative hazard of distant metastasis "
    "and the distant-metastasis-free probability at 3, 5 and 10 years for women with node-negative "
    "breast cancer who received no adjuvant systemic therapy, from the expression of the 76 "
    "probe sets of the Wang et al. signature (Affymetrix HG-U133A, on the scale of GSE7390) plus "
    "age, tumour size, grade and oestrogen-receptor status. A noisy model from 51 events. Not "
    "validated for clinical decisions, for expression measured on another platform or "
    "normalisation, for treated or node-positive patients, or for other populations."
)

COHORT = ot.Cohort(
    name="TRANSBIG independent validation series of the 76-gene signature (GSE7390)",
    loader="sksurv.datasets.load_breast_cancer",
    citation=(
        "Desmedt C, Piette F, Loi S, Wang Y, Lallemand F, Haibe-Kains B, Viale G, Delorenzi M, "
        "Zhang Y, d'Assignies MS, Bergh J, Lidereau R, Ellis P, Harris AL, Klijn JGM, Foekens JA, "
        "Cardoso F, Piccart MJ, Buyse M, Sotiriou C; TRANSBIG Consortium. Strong time dependence of "
        "the 76-gene prognostic signature for node-negative breast cancer patients in the TRANSBIG "
        "multicenter independent validation series. Clin Cancer Res. 2007;13(11):3207-3214. "
        "doi:10.1158/1078-0432.CCR-06-2765"
    ),
    source=(
        "breast_cancer_GSE7390-metastasis.arff shipped in scikit-survival (sksurv/datasets/data), "
        "taken from NCBI GEO series GSE7390 (www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE7390)"
    ),
    licence=(
        "GPL-3.0-or-later, as distributed in scikit-survival. NCBI GEO places no restrictions on "
        "the use or distribution of GEO data, but notes that submitters may claim rights to "
        "their data."
    ),
)


def inputs_for(gene_columns: list[str]) -> list:
    clinical = [
        Numeric("age", "years", "age at diagnosis", (0.0, 120.0), per="1 year", step=10, step_label="10 years"),
        Numeric("size", "cm", "tumour size", (0.0, None), per="1 cm"),
        Categorical(
            "grade",
            "histological grade; `unkown` (sic, the data set's spelling) = grade not known",
            ["well differentiated", "intermediate", "poorly differentiated", "unkown"],
            "well differentiated",
        ),
        Categorical("er", "oestrogen-receptor status", ["negative", "positive"], "negative"),
    ]
    genes = [
        Numeric(
            g,
            "1",
            f"expression of Affymetrix HG-U133A probe set {g[1:]} (log2 scale, as distributed in GSE7390)",
            (None, None),
            per="1 log2 unit (2-fold expression)",
            step_label="1 log2 unit",
        )
        for g in gene_columns
    ]
    return clinical + genes


def main() -> None:
    x, y = load_breast_cancer()
    genes = [c for c in x.columns if c not in CLINICAL]
    assert len(genes) == 76 and all(g.startswith("X") for g in genes)
    inputs = inputs_for([ot.feature_name(g) for g in genes])
    df = x[CLINICAL + genes].rename(columns=ot.feature_name)
    for spec in inputs:
        if isinstance(spec, Categorical):
            assert list(x[spec.name].cat.categories) == spec.levels, spec.name
            df[spec.name] = df[spec.name].astype(str)
    ot.train_cox_model(
        here=HERE,
        name=NAME,
        version=VERSION,
        title="Breast cancer distant metastasis, 76-gene expression + clinical (ridge Cox, GSE7390)",
        df=df,
        inputs=inputs,
        event=np.asarray(y["e.tdm"]),
        time=np.asarray(y["t.tdm"]),
        horizons=HORIZONS,
        event_name="distant metastasis",
        cohort=COHORT,
        intended_use=INTENDED_USE,
        alpha_grid=ALPHA_GRID,
        model_text=(
            "Ridge-penalised Cox proportional-hazards model (scikit-survival "
            "`CoxPHSurvivalAnalysis`, Breslow handling of ties, penalty alpha/2 · ‖β‖² on the "
            "standardised covariates, alpha = {alpha} chosen on the whole cohort by the same "
            "cross-validated partial likelihood as in the method below) on all 82 encoded columns: the 76 "
            "probe sets, age, size, grade (3 indicators against well differentiated) and ER "
            "(positive against negative). This is not the original 76-gene signature's score (a "
            "fixed weighted sum with an ER-specific cut-off from Wang et al. 2005, Lancet "
            "365:671-679): the weights here are refitted on this cohort and shrunk. Covariates are "
            "standardised before fitting; the standardisation is folded into the exported weights."
        ),
        data_text=(
            "GSE7390 (TRANSBIG): 198 women with node-negative breast cancer who received no "
            "adjuvant systemic therapy, tumours ≤ 5 cm, age ≤ 60, from several European centres; "
            "frozen tumour samples profiled on Affymetrix HG-U133A. The loader carries the 76 "
            "signature probe sets and 4 clinical variables. Complete data; all rows used; 51 "
            "distant metastases over a long follow-up (up to about 25 years)."
        ),
        inputs_text=(
            "The 4 clinical columns first, then the 76 probe sets in the loader's order. Names are "
            "the loader's (R-style probe-set names with an `X` prefix, e.g. `X200726_at`; no dots "
            "or spaces to replace). The expression values must be on the scale of GSE7390 as "
            "distributed: other platforms, normalisations or batches are not comparable without "
            "re-calibration, and onkos cannot check this. Gene expressions have no physical bound "
            "(log scale)."
        ),
        limitations=(
            "Only 51 events for 82 coefficients: the model is heavily penalised and noisy; the "
            "per-fold C-indices above show how much the held-out figure moves between folds, and "
            "individual gene hazard ratios are not interpretable as effects. The grade level "
            "`unkown` (sic) is kept because the loader has it, but its coefficient rests on 2 "
            "patients and means nothing. Absolute risks depend on the scale of the expression values, which is "
            "specific to this data set's processing. Patients were untreated and node-negative and "
            "diagnosed decades ago; the signature's prognostic value was reported to weaken with "
            "follow-up time (Desmedt 2007), which a proportional-hazards model cannot represent. "
            "No external validation."
        ),
    )


if __name__ == "__main__":
    ot.run(main)
