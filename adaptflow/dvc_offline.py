"""An HTML template that makes ``dvc plots show`` render with no network.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so offline (or behind a firewall) its
vega plots are blank. This writes a ``--html-template`` with the three libraries inlined, taken from the npm
registry with the ordinary npm client (``npm pack``, once; the tarballs are cached) at the versions DVC
itself pins::

    python -m adaptflow.dvc_offline reports/dvc_plots_offline.html
    dvc plots show --html-template reports/dvc_plots_offline.html   # opens with no network

The images (``reports/evaluate/plots``) and the one-page ``reports/evaluate/report.html`` need none of this.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# The versions dvc-render's default page loads (dvc_render/vega.py), so specs render exactly as they would online.
PACKAGES = {"vega": ("5.20.2", "build/vega.min.js"), "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
            "vega-embed": ("6.18.2", "build/vega-embed.min.js")}
CACHE = Path.home() / ".cache" / "adaptflow" / "npm"


def fetch(cache: Path = CACHE) -> list[str]:
    """The three minified libraries' source, from cached tarballs or ``npm pack``."""
    cache.mkdir(parents=True, exist_ok=True)
    sources = []
    for name, (ver, member) in PACKAGES.items():
        tgz = cache / f"{name}-{ver}.tgz"
        if not tgz.is_file():
            log.info("npm pack %s@%s", name, ver)
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run(["npm", "pack", f"{name}@{ver}", "--silent"], cwd=tmp, check=True, capture_output=True, timeout=300)
                (Path(tmp) / tgz.name).replace(tgz)
        with tarfile.open(tgz) as tar:
            f = tar.extractfile(f"package/{member}")
            if f is None:
                raise FileNotFoundError(f"{tgz}: no package/{member}")
            sources.append(f.read().decode("utf-8"))
    return sources


def template(sources: list[str]) -> str:
    """A page in dvc-render's format (``{plot_divs}`` is where DVC puts the plots) with the scripts inline."""
    escaped = [src.replace("</script", "<\\/script") for src in sources]  # a literal end tag would close the element
    scripts = "\n".join(f"<script>{src}</script>" for src in escaped)
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>DVC plots (offline)</title>\n"
            f"{scripts}\n<style>table {{ border-spacing: 15px; }}</style>\n</head>\n<body>\n{{plot_divs}}\n</body>\n</html>\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="where to write the template, e.g. reports/dvc_plots_offline.html")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the npm tarballs are kept")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        page = template(fetch(args.cache))
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("cannot get vega from the npm registry (%s); `dvc plots show` still works, its vega plots need a network", exc)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    log.info("wrote %s (%d kB); use: dvc plots show --html-template %s", args.out, len(page) // 1024, args.out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
