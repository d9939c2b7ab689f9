"""Print the headline metrics of several evaluation folders side by side (used by `make demo`).

    python scripts/compare_metrics.py NAME=FOLDER [NAME=FOLDER ...]
"""

import json
import sys
from pathlib import Path

import pandas as pd

rows = []
for argument in sys.argv[1:]:
    name, folder = argument.split("=", 1)
    metrics = json.loads((Path(folder) / "metrics.json").read_text())
    rows.append({"model": name, **{key: metrics.get(key) for key in ("accuracy", "macro_f1", "n_inputs")}})
print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
