"""Retrain every bundled model: runs each models/<name>/train.py in turn, in a fixed order.

`python3 models/train_all.py` (the Makefile's `models` target) with the packages pinned in
models/requirements.txt. Each script asserts that its ONNX export reproduces the Python model on
every cohort row and rewrites model.onnx, manifest.json, card.md and reference_predictions.json;
the seeds are fixed, so a rerun reproduces the committed files byte for byte.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

MODELS = [
    "breast-fna-malignancy",
    "breast-fna-malignancy-gb",
    "breast-recurrence-gbsg2",
    "breast-metastasis-76gene",
    "lung-survival-va",
    "lung-survival-ncctg",
]


def main() -> int:
    found = sorted(p.parent.name for p in HERE.glob("*/train.py"))
    assert found == sorted(MODELS), f"models/ holds {found}, train_all.py lists {MODELS}"
    for name in MODELS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name / "train.py")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
