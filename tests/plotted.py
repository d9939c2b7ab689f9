"""What a saved figure page draws: the traces it hands to plotly.js, read back from its HTML, so that a
test checks the numbers on the page and not only that a file was written."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np

# plotly's to_html/write_html draws the figure with `Plotly.newPlot("<div id>", [traces...], {layout}, {config})`
# (plotly/io/_html.py); matching the quoted div id and the opening `[` skips any other `Plotly.newPlot(` on the
# page, such as the one inside an inlined plotly.js.
_NEW_PLOT = re.compile(r'Plotly\.newPlot\(\s*"[^"]*",\s*(?=\[)')


def plotted_traces(page: Path) -> dict[str, dict]:
    """The traces a saved figure page hands to plotly.js, by name (typed arrays decoded)."""
    text = page.read_text()
    calls = list(_NEW_PLOT.finditer(text))
    assert len(calls) == 1, f"{page}: expected one plotly figure, found {len(calls)} Plotly.newPlot calls"
    traces, _ = json.JSONDecoder().raw_decode(text, calls[0].end())

    def decoded(value):
        if isinstance(value, dict) and "bdata" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            return array.reshape([int(n) for n in str(value["shape"]).split(",")]) if "shape" in value else array
        return value

    by_key: dict[str, dict] = {}
    for trace in traces:
        key = trace.get("name") or trace["type"]
        assert key not in by_key, f"{page}: two traces share the key {key!r}"
        by_key[key] = {name: decoded(value) for name, value in trace.items()}
    return by_key
