"""Train, evaluate and export the bundled `lung-survival-va` model.

Cox proportional-hazards model of overall survival in the Veterans' Administration lung cancer
trial (137 men with advanced, inoperable lung cancer), the copy that ships inside scikit-survival.
Writes model.onnx, manifest.json, card.md and reference_predictions.json beside this script; the
shared machinery (cross-validation, ONNX export, manifest and card) is in models/onkos_train.py.

Run from the repository root: `python3 models/lung-survival-va/train.py` (or all models with
`python3 models/train_all.py`; requirements pinned in models/requirements.txt).
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from sksurv.datasets import load_veterans_lung_cancer  # noqa: E402

import onkos_train as ot  # noqa: E402
from onkos_train import Categorical, Numeric  # noqa: E402

NAME = "lung-survival-va"
VERSION = "1.0.0"
HORIZONS = [90, 180, 365]
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the relative hazard of death and the "
    "probability of survival at 90, 180 and 365 days for patients with advanced, inoperable lung "
    "cancer like those of the Veterans' Administration trial (analysed by Prentice in 1973), from age, cell "
    "type, Karnofsky performance score, months since diagnosis, prior therapy and trial arm. Not "
    "validated for clinical decisions, for current staging or treatment (no stage, no molecular "
    "markers, no modern therapy), for women (the trial enrolled men) or for other populations."
)

INPUTS = [
    Numeric("Age_in_years", "years", "age", (0.0, 120.0), per="1 year", step=10, step_label="10 years"),
    Categorical(
        "Celltype",
        "histological cell type: adeno(carcinoma), large (cell), smallcell, squamous",
        ["adeno", "large", "smallcell", "squamous"],
        "adeno",
    ),
    Numeric(
        "Karnofsky_score", "1", "Karnofsky performance score (0 = dead, 100 = normal, no complaints)",
        (0.0, 100.0), per="1 point", step=10, step_label="10 points",
    ),
    Numeric(
        "Months_from_Diagnosis", "months", "time from diagnosis to randomisation", (0.0, None),
        per="1 month", step=12, step_label="12 months",
    ),
    Categorical("Prior_therapy", "prior therapy before the trial", ["no", "yes"], "no"),
    Categorical("Treatment", "trial arm: standard or test chemotherapy", ["standard", "test"], "standard"),
]

COHORT = ot.Cohort(
    name="Veterans' Administration Lung Cancer Trial",
    loader="sksurv.datasets.load_veterans_lung_cancer",
    citation=(
        "Kalbfleisch JD, Prentice RL. The Statistical Analysis of Failure Time Data. 2nd ed. "
        "Hoboken, NJ: John Wiley & Sons; 2002 (data set in Appendix). doi:10.1002/9781118032985. "
        "Trial data first analysed in: Prentice RL. Exponential survivals with censoring and "
        "explanatory variables. Biometrika. 1973;60(2):279-288. doi:10.1093/biomet/60.2.279"
    ),
    source=(
        "veteran.arff shipped in scikit-survival (sksurv/datasets/data), taken from StatLib "
        "(lib.stat.cmu.edu/datasets/veteran); also R package survival (`veteran`)"
    ),
    licence=(
        "GPL-3.0-or-later, as distributed in scikit-survival. StatLib and the book state no "
        "separate data licence."
    ),
)


def main() -> None:
    x, y = load_veterans_lung_cancer()
    df = x.rename(columns=ot.feature_name)
    for spec in INPUTS:
        if isinstance(spec, Categorical):
            assert list(x[spec.name].cat.categories) == spec.levels, spec.name
            df[spec.name] = df[spec.name].astype(str)
    ot.train_cox_model(
        here=HERE,
        name=NAME,
        version=VERSION,
        title="Advanced lung cancer overall survival (Cox PH, VA trial)",
        df=df,
        inputs=INPUTS,
        event=np.asarray(y["Status"]),
        time=np.asarray(y["Survival_in_days"]),
        horizons=HORIZONS,
        event_name="death from any cause (overall survival)",
        cohort=COHORT,
        intended_use=INTENDED_USE,
        model_text=(
            "Cox proportional-hazards model (scikit-survival `CoxPHSurvivalAnalysis`, unpenalised, "
            "Breslow handling of ties) on the 6 covariates of the data set, numerics entered "
            "linearly, categorical covariates as indicators against their first level in the "
            "loader's order (cell type adeno, no prior therapy, standard treatment). Covariates are "
            "standardised before fitting; the standardisation is folded into the exported weights."
        ),
        data_text=(
            "Veterans' Administration lung cancer trial: 137 men with advanced inoperable lung "
            "cancer randomised to standard or test chemotherapy. Complete data; all rows used. "
            "Only 9 patients were censored, and most died within a year (median survival about "
            "80 days)."
        ),
        inputs_text=(
            "The loader's columns, names unchanged (`Age_in_years`, `Celltype`, `Karnofsky_score`, "
            "`Months_from_Diagnosis`, `Prior_therapy`, `Treatment`)."
        ),
        limitations=(
            "Small (137 patients, 128 deaths) and old (a trial analysed in 1973; the patients were "
            "men): absolute "
            "survival is not transferable to patients treated today. No stage, histology beyond the "
            "four cell types, or molecular markers. The Karnofsky score is the dominant predictor, "
            "and its effect is known not to be proportional over time in this data set (it "
            "weakens with follow-up); the proportional-hazards assumption was not tested here. "
            "Cross-validated C-index varies between folds (see above) because each fold holds "
            "only about 27 patients. No external validation."
        ),
    )


if __name__ == "__main__":
    ot.run(main)
