"""What a saved figure page draws: the traces it hands to plotly.js, read back from its HTML, so that a
test checks the numbers on the page and not only that a file was written."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np


def plotted_traces(page: Path) -> dict[str, dict]:
    """The traces a saved figure page hands to plotly.js, by name (typed arrays decoded)."""
    text = page.read_text()
    traces, _ = json.JSONDecoder().raw_decode(text[text.index("[", text.index("Plotly.newPlot(")):])

    def decoded(value):
        if isinstance(value, dict) and "bdata" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            return array.reshape([int(n) for n in str(value["shape"]).split(",")]) if "shape" in value else array
        return value

    return {trace.get("name") or trace["type"]: {key: decoded(value) for key, value in trace.items()} for trace in traces}
