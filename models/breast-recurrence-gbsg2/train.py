"""Train, evaluate and export the bundled `breast-recurrence-gbsg2` model.

Cox proportional-hazards model of recurrence-free survival in the German Breast Cancer Study
Group 2 trial (node-positive breast cancer, 686 women), the copy that ships inside scikit-survival.
Writes model.onnx, manifest.json, card.md and reference_predictions.json beside this script; the
shared machinery (cross-validation, ONNX export, manifest and card) is in models/onkos_train.py.

Run from the repository root: `python3 models/breast-recurrence-gbsg2/train.py` (or all models
with `python3 models/train_all.py`; requirements pinned in models/requirements.txt).
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from sksurv.datasets import load_gbsg2  # noqa: E402

import onkos_train as ot  # noqa: E402
from onkos_train import Categorical, Numeric  # noqa: E402

NAME = "breast-recurrence-gbsg2"
VERSION = "1.0.0"
HORIZONS = [365, 1095, 1826]
INTENDED_USE = (
    "Research use only, not a medical device. Estimates the relative hazard of recurrence or death "
    "(recurrence-free survival) and the recurrence-free survival probability at 1, 3 and 5 years "
    "for women with node-positive primary breast cancer treated in the GBSG-2 trial era, from age, "
    "menopausal status, tumour size and grade, number of positive lymph nodes, hormone-receptor "
    "levels and tamoxifen use. Not validated for clinical decisions, node-negative disease, modern "
    "treatment (no HER2 status, taxanes, aromatase inhibitors or trastuzumab) or other populations."
)

INPUTS = [
    Categorical("horTh", "hormonal therapy (tamoxifen) given", ["no", "yes"], "no"),
    Numeric("age", "years", "age at study entry", (0.0, 120.0), per="1 year", step=10, step_label="10 years"),
    Categorical("menostat", "menopausal status: Pre (premenopausal) or Post (postmenopausal)", ["Pre", "Post"], "Pre"),
    Numeric("tsize", "mm", "tumour size", (0.0, None), per="1 mm", step=10, step_label="10 mm"),
    Categorical("tgrade", "tumour grade (I < II < III)", ["I", "II", "III"], "I"),
    Numeric("pnodes", "1", "number of positive (involved) axillary lymph nodes", (0.0, None), per="1 node"),
    Numeric(
        "progrec", "fmol", "progesterone receptor level (unit as documented by the data source: fmol)",
        (0.0, None), per="1 fmol", step=100, step_label="100 fmol",
    ),
    Numeric(
        "estrec", "fmol", "oestrogen receptor level (unit as documented by the data source: fmol)",
        (0.0, None), per="1 fmol", step=100, step_label="100 fmol",
    ),
]

COHORT = ot.Cohort(
    name="German Breast Cancer Study Group 2 (GBSG-2) trial",
    loader="sksurv.datasets.load_gbsg2",
    citation=(
        "Schumacher M, Bastert G, Bojar H, Hübner K, Olschewski M, Sauerbrei W, Schmoor C, Beyerle C, "
        "Neumann RL, Rauschecker HF, for the German Breast Cancer Study Group. Randomized 2 x 2 trial "
        "evaluating hormonal treatment and the duration of chemotherapy in node-positive breast cancer "
        "patients. J Clin Oncol. 1994;12(10):2086-2093. doi:10.1200/JCO.1994.12.10.2086"
    ),
    source=(
        "GBSG2.arff shipped in scikit-survival (sksurv/datasets/data); the data set of R package "
        "TH.data (Sauerbrei W, Royston P. J R Stat Soc A. 1999;162(1):71-94)"
    ),
    licence=(
        "GPL-3.0-or-later, as distributed in scikit-survival; R package TH.data (GPL-3). No separate "
        "data licence is stated."
    ),
)


def main() -> None:
    x, y = load_gbsg2()
    df = x.rename(columns=ot.feature_name)
    for spec in INPUTS:
        if isinstance(spec, Categorical):
            assert list(x[spec.name].cat.categories) == spec.levels, spec.name
            df[spec.name] = df[spec.name].astype(str)
    ot.train_cox_model(
        here=HERE,
        name=NAME,
        version=VERSION,
        title="Breast cancer recurrence-free survival (Cox PH, GBSG-2)",
        df=df,
        inputs=INPUTS,
        event=np.asarray(y["cens"]),
        time=np.asarray(y["time"]),
        horizons=HORIZONS,
        event_name="recurrence or death (recurrence-free survival)",
        cohort=COHORT,
        intended_use=INTENDED_USE,
        model_text=(
            "Cox proportional-hazards model (scikit-survival `CoxPHSurvivalAnalysis`, unpenalised, "
            "Breslow handling of ties) on the 8 GBSG-2 covariates, all entered linearly (no "
            "transformations), categorical covariates as indicators against their first level. "
            "Covariates are standardised before fitting; the standardisation is folded into the "
            "exported weights."
        ),
        data_text=(
            "GBSG-2: 686 women with node-positive primary breast cancer, recruited 1984–1989 in a "
            "randomised 2 × 2 trial of tamoxifen (horTh) and 3 versus 6 cycles of CMF "
            "chemotherapy (the chemotherapy arm is not in the data set). Complete data; all rows used."
        ),
        inputs_text=(
            "The loader's columns, names unchanged (`horTh`, `age`, `menostat`, `tsize`, `tgrade`, "
            "`pnodes`, `progrec`, `estrec`). Every patient in the cohort had at least one positive node."
        ),
        limitations=(
            "Patients treated from 1984 to 1989: no HER2, Ki-67 or modern systemic therapy, so absolute "
            "risks are not transferable to current practice. Node-positive patients only. All covariates "
            "enter linearly; the effects of node count and progesterone receptor are known to be "
            "non-linear (Sauerbrei & Royston 1999), and the proportional-hazards assumption was not "
            "tested here. The hazard ratio of horTh is an association adjusted for the other "
            "covariates in this model, not the trial's randomised treatment comparison. Receptor "
            "levels enter linearly too, so the few patients with very high progesterone receptor "
            "values (up to 2380 fmol) get very low risk scores (the lowest percentiles of the "
            "manifest's risk_score_percentiles). Receptor levels are reported in fmol as "
            "documented by the source; assays of other laboratories may not be on the same scale. "
            "The C-index of about 0.67 means modest discrimination; no external validation."
        ),
    )


if __name__ == "__main__":
    ot.run(main)
