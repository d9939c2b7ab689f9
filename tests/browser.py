"""Headless Chromium for the browser tests: load a page with a probe script, read back what it found
(``--dump-dom``), take a screenshot, and tell whether a PNG is blank. No driver package is needed: the
probe records JavaScript errors and console.error calls itself and writes its result into the page."""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-dev-shm-usage", "--allow-file-access-from-files")

# Before any other script: every uncaught error, rejected promise and console.error is recorded.
_RECORDER = """<script>window.__probe = {errors: []};
window.addEventListener("error", e => __probe.errors.push("error: " + e.message));
window.addEventListener("unhandledrejection", e => __probe.errors.push("rejection: " + e.reason));
const __consoleError = console.error;
console.error = (...args) => { __probe.errors.push("console.error: " + args.map(String).join(" ")); __consoleError(...args); };
</script>"""


def browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def probe(page: Path, check_js: str, wait_ms: int = 1500, timeout: float = 120) -> dict:
    """Open a copy of ``page`` (beside it, so relative files such as plotly.min.js resolve) with
    ``check_js``: the body of an async function run ``wait_ms`` after load that returns an object;
    that object, with ``errors`` (JS errors and console errors), is returned."""
    text = page.read_text()
    runner = f"""<script>window.addEventListener("load", () => setTimeout(async () => {{
      let result;
      try {{ result = await (async () => {{ {check_js} }})(); }} catch (e) {{ result = {{exception: String(e)}}; }}
      result = Object.assign({{}}, result, {{errors: __probe.errors}});
      const out = document.createElement("pre"); out.id = "probe-result"; out.textContent = JSON.stringify(result);
      document.body.appendChild(out);
    }}, {wait_ms}));</script>"""
    head = re.search(r"<head[^>]*>", text, re.IGNORECASE)
    text = (text[:head.end()] + _RECORDER + text[head.end():]) if head else _RECORDER + text
    text = text.replace("</body>", runner + "</body>") if "</body>" in text else text + runner
    copy = page.with_name(f".probe-{page.name}")
    copy.write_text(text)
    try:
        done = subprocess.run([browser(), *FLAGS, "--virtual-time-budget=30000", "--dump-dom", copy.as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        copy.unlink(missing_ok=True)
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, f"the probe wrote no result; chromium said: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, target: Path, width: int = 1200, height: int = 900, timeout: float = 120) -> Path:
    subprocess.run([browser(), *FLAGS, f"--window-size={width},{height}", "--virtual-time-budget=10000",
                    f"--screenshot={target}", page.as_uri()], capture_output=True, timeout=timeout, check=True)
    return target


def _unfilter(data: bytes, width: int, height: int, channels: int) -> bytearray:
    stride, out, previous = width * channels, bytearray(), bytearray(width * channels)
    position = 0
    for _ in range(height):
        kind, row = data[position], bytearray(data[position + 1:position + 1 + stride])
        position += 1 + stride
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                row[i] = (row[i] + left) & 255
            elif kind == 2:
                row[i] = (row[i] + up) & 255
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                row[i] = (row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        out += row
        previous = row
    return out


def png_colour_stats(path: Path) -> tuple[int, int, int, float]:
    """(width, height, distinct colours, share of pixels that are not the most common colour) of an 8-bit
    RGB or RGBA PNG, as Chromium writes them."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour in (2, 6), f"unexpected PNG format (depth {depth}, colour type {colour})"
    idat, position = b"", 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"IDAT":
            idat += data[position + 8:position + 8 + length]
        position += 12 + length
    channels = 4 if colour == 6 else 3
    pixels = _unfilter(zlib.decompress(idat), width, height, channels)
    counts: dict[bytes, int] = {}
    for i in range(0, len(pixels), channels * 7):  # every 7th pixel is plenty
        key = bytes(pixels[i:i + 3])
        counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    return width, height, len(counts), 1 - max(counts.values()) / total
