"""Tables and plots of ``sparsetrain reproduce``, rendered from a results record (``reproduce.json``) alone.

The record (:func:`sparsetrain.papers.collect_results`) holds every per-seed number; this module aggregates them
(mean ± sample SD over seeds) into each paper's table layout, prints the published numbers beside them and draws the
plots. :func:`write_results` writes ``reproduce.json``, ``tables.md``, one CSV per table and the PNGs into a results
folder; :func:`regenerate` rewrites the tables and plots of an existing results folder from its ``reproduce.json``
(``sparsetrain report results/<paper>``), so every number in ``docs/results.md`` traces back to a file in
``results/``.

Example:
    >>> written = regenerate("results/swat")  # doctest: +SKIP
    >>> print(written.markdown_text)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsetrain.files import atomic_write_json, atomic_write_text
from sparsetrain.reporting.paper_results import _RENDERERS
from sparsetrain.reporting.result_tables import Rendered, Table, _protocol_line, point_stats

__all__ = ["RESULTS_FILE", "TABLES_FILE", "SMOKE_BANNER", "Table", "Rendered", "Written", "is_results_folder", "render",
           "write_results", "write_json", "regenerate", "point_stats"]

log = logging.getLogger(__name__)

RESULTS_FILE = "reproduce.json"
TABLES_FILE = "tables.md"


@dataclass
class Written:
    """What :func:`write_results` wrote."""

    folder: Path
    files: list[Path]
    markdown_text: str



def render(rec: dict[str, Any]) -> Rendered:
    """The tables and plots of a results record, in its paper's layout.

    Raises:
        ValueError: the record's paper has no layout here (the message lists the known ones).
    """
    paper = rec.get("paper")
    if paper not in _RENDERERS:
        raise ValueError(f"results record of unknown paper {paper!r}; known: {', '.join(_RENDERERS)}")
    out = _RENDERERS[paper](rec)
    if rec.get("quick"):
        return _smoke_test(out, rec)
    notes = "".join(f"> {n}\n" for n in rec.get("notes") or [])
    ref = f" ({rec['reference']})" if rec.get("reference") else ""
    out.header = f"### {rec['title']}{ref}\n\n" + (notes + "\n" if notes else "")
    return out


#: The first line of everything rendered from a ``--quick`` record.
SMOKE_BANNER = "SMOKE TEST — not results"
# Columns that state a comparison or a conclusion: a smoke test prints none of them.
_CONCLUSION_COLUMNS = ("[95 % CI]", "what the interval supports", "paper's gap", "relative to threshold 0")


def _smoke_test(out: Rendered, rec: dict[str, Any]) -> Rendered:
    """The tables of a ``--quick`` record as what they are: a check that every point trains, is measured and is
    rendered. Banner first; no paper notes, no published tables to set the numbers beside, no gap, interval,
    verdict or relative-accuracy column, and each table's note is only the protocol line (the full protocol's notes,
    e.g. a relative accuracy of a threshold search on 200 images, would present degenerate numbers as findings)."""
    tables = []
    for t in out.tables:
        if t.key.startswith("published"):
            continue
        keep = [i for i, c in enumerate(t.columns) if not any(k in c for k in _CONCLUSION_COLUMNS)]
        title = re.sub(r"^Ours(, per layer)?:", "Smoke test\\1:", t.title)
        tables.append(Table(t.key, title, [t.columns[i] for i in keep], [[r[i] for i in keep] for r in t.rows],
                            _protocol_line(rec)))
    out.tables = tables
    out.header = (f"### {SMOKE_BANNER}: {rec['title']}\n\n"
                  f"> **{SMOKE_BANNER}.** `--quick` trains every point of the grid on a few hundred images for one "
                  "epoch to check that the pipeline runs end to end. Its accuracies, sparsities and FLOP figures say "
                  "nothing about the paper; no comparison with it is printed. The results are the full protocol's "
                  f"(`{rec['command'].replace(' --quick', '')}`).\n\n")
    return out


# ---------------------------------------------------------------------------------------------- files
def is_results_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder holding a ``reproduce.json``."""
    return (Path(path) / RESULTS_FILE).is_file()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (atomically: a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, end="\n")


def write_results(rec: dict[str, Any], folder: str | Path, plots: bool = True) -> Written:
    """Write the record, ``tables.md``, one CSV per table and the plots into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / RESULTS_FILE, rec)
    return _write_rendered(rec, folder, plots)


def _write_rendered(rec: dict[str, Any], folder: Path, plots: bool) -> Written:
    rendered = render(rec)
    files = [folder / RESULTS_FILE]
    text = rendered.markdown()
    atomic_write_text(folder / TABLES_FILE, text)
    files.append(folder / TABLES_FILE)
    for t in rendered.tables:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", t.key) + ".csv"  # group names become file names: no spaces
        atomic_write_text(folder / name, t.csv())
        files.append(folder / name)
    if plots:
        for name, draw in rendered.plots.items():
            try:
                draw(folder / name)
            except ImportError as e:  # matplotlib is optional: the tables are the result
                log.warning("no plot %s (%s)", name, str(e).splitlines()[0])
                break
            files.append(folder / name)
    return Written(folder, files, text)


def regenerate(folder: str | Path, plots: bool = True) -> Written:
    """Rewrite the tables and plots of a results folder from its ``reproduce.json`` (no run directory needed).

    Raises:
        ValueError: no ``reproduce.json`` there, or it is not a results record.
    """
    folder = Path(folder)
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no {RESULTS_FILE}: not a `sparsetrain reproduce` results folder")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(rec, dict) or "points" not in rec or "paper" not in rec:
        raise ValueError(f"{path}: not a `sparsetrain reproduce` results record (no paper/points)")
    return _write_rendered(rec, folder, plots)
