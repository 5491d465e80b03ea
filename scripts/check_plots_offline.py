"""Check that every plot `dvc plots show` lists renders with no network, in a real headless browser.

    python scripts/check_plots_offline.py                        # dvc plots show into a temp dir, then check it
    python scripts/check_plots_offline.py --html dvc_plots/index.html --screenshot docs/img/plots_offline.png

Two checks. (1) The page `dvc plots show` writes references no http(s) URL (no script, style or image from a
CDN): the plots of dvc.yaml are PNG images the report stage writes, which need nothing from the network.
(2) With chromium installed, the page is opened headless with networking off; a small script appended to a
copy of the page counts the plot elements that rendered (an ``<img>`` whose image decoded, an ``<svg>``, a
``<canvas>``) and the check passes only when each plot dvc.yaml lists rendered. Without chromium, (2) is
skipped with a message saying so and the exit status is that of (1).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
URL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(https?://[^"' >]+)|url\(\s*["']?(https?://[^"')]+)|import\s+[^;]*?["'](https?://[^"']+)""", re.I)
# Appended to a copy of the page: once everything has loaded, the counts of rendered plot elements.
PROBE = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const decoded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  const result = document.createElement("pre");
  result.id = "plots-offline-result";
  result.textContent = `images=${images.length} decoded=${decoded} svg=${document.querySelectorAll("svg").length} canvas=${document.querySelectorAll("canvas").length}`;
  document.body.appendChild(result);
});
</script>
"""


def network_references(html: str) -> list[str]:
    """Every http(s) URL the page would fetch (script or image sources, stylesheets, CSS url(), ES module imports)."""
    return sorted({next(g for g in match.groups() if g) for match in URL.finditer(html)})


def listed_plots(dvc_yaml: Path) -> list[str]:
    """The top-level plots of ``dvc.yaml`` (names or image paths) and the stages' plot outputs."""
    spec = yaml.safe_load(dvc_yaml.read_text())
    names = [next(iter(p)) if isinstance(p, dict) else p for p in spec.get("plots") or []]
    for stage in (spec.get("stages") or {}).values():
        for entry in stage.get("plots") or [] if isinstance(stage, dict) else []:
            names.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return names


def render(html: Path, screenshot: Path | None, browser: str) -> dict[str, int]:
    """Open a probed copy of ``html`` in headless ``browser`` with networking off; the counts the probe wrote."""
    probed = html.with_name(".offline-check.html")
    probed.write_text(html.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
              "--virtual-time-budget=5000", "--window-size=1280,2400"]
    try:
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run([*common, f"--user-data-dir={profile}", "--dump-dom", probed.as_uri()],
                                 capture_output=True, text=True, timeout=120).stdout
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([*common, f"--user-data-dir={profile}", f"--screenshot={screenshot.resolve()}", html.as_uri()],
                               capture_output=True, text=True, timeout=120)
    finally:
        probed.unlink(missing_ok=True)
    found = re.search(r'id="plots-offline-result">([^<]*)<', dom)
    if not found:
        raise RuntimeError(f"{browser} wrote no result for {html} (the page did not finish loading)")
    return {k: int(v) for k, v in (pair.split("=") for pair in found.group(1).split())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, help="a page `dvc plots show` wrote (default: run it into a temp dir)")
    parser.add_argument("--screenshot", type=Path, help="also save a screenshot of the page here (PNG)")
    parser.add_argument("--browser", help=f"browser binary (default: the first of {', '.join(BROWSERS)} found)")
    args = parser.parse_args(argv)
    expected = listed_plots(REPO / "dvc.yaml")
    with tempfile.TemporaryDirectory() as out:
        html = args.html
        if html is None:
            done = subprocess.run(["dvc", "plots", "show", "--out", out], cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"dvc plots show failed:\n{done.stderr.strip()}", file=sys.stderr)
                return 1
            html = Path(out) / "index.html"
        text = html.read_text(encoding="utf-8")
        urls = network_references(text)
        if urls:
            print(f"{html} needs the network: {', '.join(urls)}", file=sys.stderr)
            return 1
        print(f"{html}: no http(s) reference; dvc.yaml lists {len(expected)} plot(s)")
        browser = args.browser or next((b for b in BROWSERS if shutil.which(b)), None)
        if browser is None:
            print("skipped the browser check: no chromium found (Debian: `apt-get install -y chromium`)")
            return 0
        counts = render(html, args.screenshot, browser)
        rendered = counts["decoded"] + counts["svg"] + counts["canvas"]
        print(f"{browser}, network off: {counts['decoded']} of {counts['images']} image(s) decoded, {counts['svg']} svg, "
              f"{counts['canvas']} canvas" + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
        if counts["decoded"] < counts["images"] or rendered < len(expected):
            print(f"only {rendered} of the {len(expected)} plot(s) rendered", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
