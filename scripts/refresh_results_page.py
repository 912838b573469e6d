"""Rewrite the generated regions of docs/results.md from results/<paper>/reproduce.json.

Each region lies between ``<!-- tables:<paper> (generated: ...) -->`` and ``<!-- end tables:<paper> -->`` and holds
exactly what ``sparsetrain report results/<paper>`` renders (its notes and tables, without the title line);
tests/test_reproduce.py checks that the page and the records agree. The prose around the regions is written by hand.

    python scripts/refresh_results_page.py            # every paper with a region and a record
    python scripts/refresh_results_page.py swat       # one
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sparsetrain.reporting.results import RESULTS_FILE, render

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "results.md"


def region(paper: str) -> str:
    text = render(json.loads((REPO / "results" / paper / RESULTS_FILE).read_text())).markdown()
    lines = text.splitlines()
    if lines and lines[0].startswith("### "):  # the page's own heading stands in for the title
        lines = lines[1:]
        while lines and not lines[0].strip():
            lines = lines[1:]
    return "\n".join(lines).rstrip() + "\n"


def main(papers: list[str]) -> int:
    page = PAGE.read_text()
    found = re.findall(r"<!-- tables:([\w-]+) \(generated", page)
    for paper in papers or found:
        if paper not in found:
            print(f"no generated region for {paper!r} in {PAGE}; regions: {', '.join(found)}", file=sys.stderr)
            return 2
        if not (REPO / "results" / paper / RESULTS_FILE).is_file():
            continue
        pat = re.compile(rf"(<!-- tables:{re.escape(paper)} \(generated[^\n]*-->\n)(.*?)(<!-- end tables:{re.escape(paper)} -->)",
                         re.S)
        page = pat.sub(lambda m: m.group(1) + region(paper) + m.group(3), page, count=1)
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
