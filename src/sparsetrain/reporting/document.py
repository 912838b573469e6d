"""A tiny document model rendered to both Markdown and HTML, so the two reports cannot drift apart.

A report is built once as a list of blocks (:class:`Heading`, :class:`Paragraph`, :class:`Note`, :class:`Table`,
:class:`Image`, :class:`CodeBlock`, :class:`BulletList`); :func:`to_markdown` and :func:`to_html` render the same blocks. Inline markup is
limited to code spans written with backticks, which both renderers understand.

Example:
    >>> doc = Document("Demo", [Paragraph("Run `runs/a`."), Table(["k", "v"], [["lr", "0.1"]])])
    >>> print(to_markdown(doc).splitlines()[0])
    # Demo
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

__all__ = [
    "Heading",
    "Paragraph",
    "Note",
    "Table",
    "Image",
    "CodeBlock",
    "BulletList",
    "Block",
    "Document",
    "to_markdown",
    "to_html",
    "generated_by",
]


@dataclass
class Heading:
    """Section heading; ``level`` 2 is a section, 3 a subsection (level 1 is the document title)."""

    text: str
    level: int = 2


@dataclass
class Paragraph:
    """Plain text; backticks mark code spans."""

    text: str


@dataclass
class Note:
    """A highlighted remark, e.g. about a missing optional file."""

    text: str


@dataclass
class Table:
    """A table of pre-formatted cells; ``align`` holds ``"l"`` or ``"r"`` per column (default: left)."""

    headers: list[str]
    rows: list[list[str]]
    align: list[str] | None = None

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.headers):
                raise ValueError(f"table row {i} has {len(row)} cells, expected {len(self.headers)}: {row!r}")
        if self.align is not None and len(self.align) != len(self.headers):
            raise ValueError(f"align has {len(self.align)} entries, expected {len(self.headers)}")


@dataclass
class Image:
    """A PNG file in the report folder, referenced by its file name."""

    filename: str
    alt: str
    caption: str = ""


@dataclass
class CodeBlock:
    """Verbatim text (e.g. a YAML recipe)."""

    text: str
    lang: str = ""


@dataclass
class BulletList:
    """An unordered list of one-line items."""

    items: list[str]


Block = Union[Heading, Paragraph, Note, Table, Image, CodeBlock, BulletList]


@dataclass
class Document:
    """A titled sequence of blocks."""

    title: str
    blocks: list[Block] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------- Markdown


def _md_cell(text: str) -> str:
    # A literal "|" would end the cell (GFM unescapes "\\|" even inside code spans); a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    align = table.align or ["l"] * len(table.headers)
    lines = [
        "| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
        "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def to_markdown(doc: Document) -> str:
    """Render ``doc`` as GitHub-flavoured Markdown; images are referenced by relative file name."""
    parts = [f"# {doc.title}"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append("#" * max(2, min(block.level, 6)) + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Note):
            parts.append("> **Note:** " + block.text.replace("\n", "\n> "))
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, Image):
            img = f"![{block.alt}]({block.filename})"
            parts.append(img + (f"\n\n*{block.caption}*" if block.caption else ""))
        elif isinstance(block, CodeBlock):
            fence = "````" if "```" in block.text else "```"
            parts.append(f"{fence}{block.lang}\n{block.text.rstrip()}\n{fence}")
        elif isinstance(block, BulletList):
            parts.append("\n".join("- " + item.replace("\n", " ") for item in block.items))
        else:  # pragma: no cover - guarded by the Block union
            raise TypeError(f"unknown block type {type(block).__name__}")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; background: #fff;
       margin: 0; line-height: 1.5; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 1.9em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.45em; border-bottom: 1px solid #d0d7de; padding-bottom: .25em; margin-top: 1.6em; }
h3 { font-size: 1.15em; margin-top: 1.3em; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 90%;
       background: #f6f8fa; padding: .1em .35em; border-radius: 4px; }
pre { background: #f6f8fa; padding: 12px 16px; border-radius: 6px; overflow-x: auto; }
pre code { background: none; padding: 0; }
.table-wrap { overflow-x: auto; margin: 12px 0; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; font-weight: 600; }
tr:nth-child(even) td { background: #fbfcfd; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
td.l, th.l { text-align: left; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 14px; font-style: italic; }
.note { border-left: 4px solid #d4a72c; background: #fff8c5; padding: 8px 14px; margin: 12px 0; }
""".strip()

_CODE_SPAN = re.compile(r"`([^`]+)`")


def _inline_html(text: str) -> str:
    # Escape first, then turn code spans into <code>; the backtick itself is not touched by html.escape.
    return _CODE_SPAN.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))


def _image_src(block: Image, image_dir: Path | None, embed: bool) -> str:
    if embed:
        if image_dir is None:
            raise ValueError("embedding images needs image_dir (the folder holding the PNG files)")
        data = (image_dir / block.filename).read_bytes()
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return html.escape(block.filename, quote=True)


def to_html(doc: Document, image_dir: Path | None = None, embed_images: bool = True) -> str:
    """Render ``doc`` as a standalone HTML page (inline CSS, no scripts, no external resources).

    Args:
        doc: the document.
        image_dir: folder holding the PNG files named by :class:`Image` blocks (needed when embedding).
        embed_images: embed PNGs as base64 ``data:`` URIs so the page is a single self-contained file;
            when False, images are referenced by relative file name.

    Returns:
        The HTML text.
    """
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc.title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            level = max(2, min(block.level, 6))
            out.append(f"<h{level}>{_inline_html(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Note):
            out.append(f'<p class="note"><strong>Note:</strong> {_inline_html(block.text)}</p>')
        elif isinstance(block, Table):
            align = block.align or ["l"] * len(block.headers)
            out.append('<div class="table-wrap"><table>')
            out.append(
                "<thead><tr>"
                + "".join(f'<th class="{a}">{_inline_html(h)}</th>' for h, a in zip(block.headers, align))
                + "</tr></thead>"
            )
            out.append("<tbody>")
            for row in block.rows:
                out.append(
                    "<tr>" + "".join(f'<td class="{a}">{_inline_html(c)}</td>' for c, a in zip(row, align)) + "</tr>"
                )
            out.append("</tbody></table></div>")
        elif isinstance(block, Image):
            src = _image_src(block, image_dir, embed_images)
            caption = f"<figcaption>{_inline_html(block.caption)}</figcaption>" if block.caption else ""
            out.append(f'<figure><img src="{src}" alt="{html.escape(block.alt, quote=True)}">{caption}</figure>')
        elif isinstance(block, CodeBlock):
            out.append(f"<pre><code>{html.escape(block.text.rstrip(), quote=False)}</code></pre>")
        elif isinstance(block, BulletList):
            out.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "</ul>")
        else:  # pragma: no cover - guarded by the Block union
            raise TypeError(f"unknown block type {type(block).__name__}")
    out += ["</main>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


def generated_by() -> str:
    """The report's provenance line: ``"Generated by sparsetrain <version> on <local time>."``"""
    try:
        from sparsetrain import __version__ as version
    except ImportError:  # pragma: no cover - the package is always importable when this module is
        version = "?"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    return f"Generated by sparsetrain {version} on {now}."
