"""Train, evaluate and export the bundled `lung-survival-ncctg` model.

Cox proportional-hazards model of overall survival in the North Central Cancer Treatment Group
advanced lung cancer cohort (228 patients; the copy that ships inside lifelines), from age, sex and
the physician's ECOG performance score, on the complete cases of those covariates. Writes
model.onnx, manifest.json, card.md and reference_predictions.json beside this script; the shared
machinery (cross-validation, ONNX export, manifest and card) is in models/onkos_train.py.

Run from the repository root: `python3 models/lung-survival-ncctg/train.py` (or all models with
`python3 models/train_all.py`; requirements pinned in models/requirements.txt).
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from lifelines.datasets import load_lung  # noqa: E402

import onkos_train as ot  # noqa: E402
from onkos_train import Categorical, Numeric  # noqa: E402

NAME = "lung-survival-ncctg"
VERSION = "1.0.0"
HORIZONS = [180, 365, 730]
COVARIATES = ["age", "sex", "ph.ecog"]  # the loader's names
# lifelines (like R's survival::lung) codes sex as 1 = male, 2 = female; callers send the words.
SEX_LEVELS = {1: "male", 2: "female"}
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the relative hazard of death and the "
    "probability of survival at 180, 365 and 730 days for patients with advanced lung cancer like "
    "those of the NCCTG cohort (Loprinzi et al. 1994), from age, sex and the physician-rated ECOG "
    "performance score. Not validated for clinical decisions, for current staging or treatment "
    "(no stage, histology, molecular markers or modern therapy) or for other populations."
)

INPUTS = [
    Numeric("age", "years", "age", (0.0, 120.0), per="1 year", step=10, step_label="10 years"),
    Categorical(
        "sex",
        "sex (the loader codes 1 = male, 2 = female; either the code or the word is accepted)",
        ["male", "female"],
        "male",
        codes={"1": "male", "2": "female"},
    ),
    Numeric(
        "ph_ecog", "1",
        "ECOG performance score rated by the physician: 0 = asymptomatic, 1 = symptomatic but "
        "ambulatory, 2 = in bed < 50% of the day, 3 = in bed > 50% of the day, 4 = bedbound "
        "(an integer grade)",
        (0.0, 4.0), per="1 ECOG grade",
    ),
]

COHORT = ot.Cohort(
    name="NCCTG advanced lung cancer",
    loader="lifelines.datasets.load_lung",
    citation=(
        "Loprinzi CL, Laurie JA, Wieand HS, Krook JE, Novotny PJ, Kugler JW, Bartel J, Law M, "
        "Bateman M, Klatt NE, et al. Prospective evaluation of prognostic variables from "
        "patient-completed questionnaires. North Central Cancer Treatment Group. J Clin Oncol. "
        "1994;12(3):601-607. doi:10.1200/JCO.1994.12.3.601"
    ),
    source=(
        "lung.csv shipped in lifelines (lifelines/datasets); the `lung` data set of R package "
        "survival (Therneau TM)"
    ),
    licence=(
        "MIT, as distributed in lifelines; R package survival is LGPL (>= 2). No separate data "
        "licence is stated."
    ),
)


def main() -> None:
    raw = load_lung()
    assert set(raw["status"].unique()) == {0, 1}  # lifelines: 1 = death, 0 = censored
    used = raw.dropna(subset=COVARIATES).reset_index(drop=True)
    assert len(raw) == 228 and len(used) == 227
    df = used[COVARIATES].rename(columns=ot.feature_name)
    assert set(df["sex"].unique()) == set(SEX_LEVELS)
    df["sex"] = df["sex"].map(SEX_LEVELS)
    ot.train_cox_model(
        here=HERE,
        name=NAME,
        version=VERSION,
        title="Advanced lung cancer overall survival (Cox PH, NCCTG)",
        df=df,
        inputs=INPUTS,
        event=used["status"].to_numpy(),
        time=used["time"].to_numpy(),
        horizons=HORIZONS,
        event_name="death from any cause (overall survival)",
        cohort=COHORT,
        intended_use=INTENDED_USE,
        model_text=(
            "Cox proportional-hazards model (scikit-survival `CoxPHSurvivalAnalysis`, unpenalised, "
            "Breslow handling of ties) on age, sex and the physician's ECOG score, the classic "
            "covariates of this data set, all linear (ECOG as a 0–4 grade, one hazard ratio per "
            "grade). The other columns were left out: `inst` is an identifier, `ph.karno` and "
            "`pat.karno` largely repeat the ECOG score, and `meal.cal` and `wt.loss` are missing "
            "for 47 and 14 patients. Covariates are standardised before fitting; the "
            "standardisation is folded into the exported weights."
        ),
        data_text=(
            "NCCTG advanced lung cancer: 228 patients. **Complete-case analysis:** one patient "
            "without an ECOG score is dropped, so 227 patients are used (row numbers in "
            "reference_predictions.json count the rows used, in the loader's order, skipping it)."
        ),
        inputs_text=(
            "The loader's columns with dots replaced by underscores (`ph.ecog` → `ph_ecog`). `sex` "
            "is coded 1/2 by the loader; the service takes those codes or the words `male` and `female`. "
            "Only one patient in the cohort had ECOG 3 and none had 4, so predictions for ECOG ≥ 3 "
            "are extrapolations of the linear grade effect."
        ),
        limitations=(
            "A single cooperative-group cohort published in 1994 (227 patients, 164 deaths), "
            "complete-case analysis (1 patient dropped). Discrimination is modest (C-index about "
            "0.63). No stage, histology or treatment information, so the model says nothing about "
            "how those change survival; the ECOG effect is assumed linear per grade and the "
            "proportional-hazards assumption was not tested here. No external validation."
        ),
    )


if __name__ == "__main__":
    ot.run(main)
