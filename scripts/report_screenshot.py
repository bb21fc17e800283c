"""docs/report.png: a headless-Chromium screenshot of a real report.html, for the README.

    python scripts/report_screenshot.py engines/report.html -o docs/report.png [--width 1100] [--height 2400]

The page is shown as a reader sees it offline (its CSP forbids every request); blank space below the content is
cropped. Needs chromium-headless-shell or chromium on PATH (scripts/setup_browser.sh installs Debian's).
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from quant.fileio import atomic_write_bytes

BROWSERS = ("chromium-headless-shell", "chromium")


def screenshot(page: Path, width: int, height: int) -> bytes:
    """PNG bytes of `page` in a width x height window, cropped below the last non-white row."""
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        raise SystemExit(f"no {' or '.join(BROWSERS)} on PATH: run scripts/setup_browser.sh (as root)")
    if not page.is_file():
        raise SystemExit(f"{page}: no report page; run `quant run` (or `quant report RESULTS.json`) first")
    with tempfile.TemporaryDirectory(prefix="quant-shot-") as folder:
        shot = Path(folder) / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image.convert("L"))
    content = np.flatnonzero((pixels < 250).any(axis=1))
    bottom = min(image.height, int(content[-1]) + 24) if content.size else image.height
    buffer = io.BytesIO()
    image.crop((0, 0, image.width, bottom)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="report.html of a real run (default output: engines/report.html)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/report.png"))
    parser.add_argument("--width", type=int, default=1100, help="window width, px (the page is at most 1100 wide)")
    parser.add_argument("--height", type=int, default=2400, help="window height, px: how much of the page is shown")
    args = parser.parse_args(argv)
    path = atomic_write_bytes(args.output, screenshot(args.page, args.width, args.height))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
