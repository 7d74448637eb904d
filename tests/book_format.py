"""Keep the chapters' code readable on the page: lines that fit the code column, setup hidden.

``python tests/book_format.py`` formats every chapter notebook in place:

* code cells are formatted by ruff at :data:`WIDTH` columns, then the lines ruff leaves long are
  broken: comments are wrapped (a trailing comment moves above its line), docstrings are wrapped,
  and a string literal that stands alone on its line is split into adjacent literals;
* the Colab install cell is tagged ``remove-input`` and the setup cell that follows it
  ``hide-input`` (both still run);
* ``glue(...)`` calls at the end of a teaching cell move into a cell of their own, tagged
  ``remove-cell``: they still hand their numbers to the prose, but the page shows only the code
  that teaches.

``tests/test_book_format.py`` fails when a chapter is not in this form.
"""
from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 74  # the rendered page's code column holds 77 characters at 1280 pixels, 75 in a folded cell
INSTALL_MARKER = "# In Colab, install the package"
SETUP_TAG, INSTALL_TAG, GLUE_TAG = "hide-input", "remove-input", "remove-cell"


def chapters(root: Path = ROOT):
    return sorted((root / "book").glob("*.ipynb"))


def source(cell) -> str:
    return "".join(cell["source"])


def set_source(cell, text: str) -> None:
    cell["source"] = text.splitlines(keepends=True)
    if cell["source"]:
        cell["source"][-1] = cell["source"][-1].rstrip("\n")


def tags(cell):
    return cell.setdefault("metadata", {}).setdefault("tags", [])


# --------------------------------------------------------------------------------------
# Long lines
# --------------------------------------------------------------------------------------
def _wrap_comment(indent: str, text: str):
    """A comment's text as ``# ...`` lines that fit WIDTH (empty for an empty comment)."""
    body = text.lstrip("#").strip()
    return [f"{indent}# {line}" for line in textwrap.wrap(body, WIDTH - len(indent) - 2, break_long_words=False)]


def _comment_start(line: str):
    """Column of a trailing ``#`` comment (outside strings), or None."""
    quote = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1
            elif line.startswith(quote, i):
                i += len(quote) - 1
                quote = None
        elif line.startswith(('"""', "'''"), i):
            quote = line[i:i + 3]
            i += 2
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return i if line[:i].strip() else None
        i += 1
    return None


def _split_string_line(line: str):
    """Split a line ending in one string literal (before a trailing ``,`` or ``)``) in two lines:
    adjacent literals, the second one indented further. Only used inside brackets (checked by the
    caller, which parses the result)."""
    indent = line[: len(line) - len(line.lstrip())]
    stripped = line.rstrip()
    tail = ""
    while stripped and stripped[-1] in ",)":
        tail = stripped[-1] + tail
        stripped = stripped[:-1]
    if not stripped or stripped[-1] not in "\"'" or stripped.endswith(('"""', "'''")):
        return None
    quote = stripped[-1]
    start = stripped.rfind(quote, 0, len(stripped) - 1)
    while start > 0 and stripped[start - 1] == "\\":
        start = stripped.rfind(quote, 0, start - 1)
    if start < 0:
        return None
    p = start
    while p > 0 and stripped[p - 1] in "fFrRbB":
        p -= 1
    head, prefix, body = stripped[:p], stripped[p:start], stripped[start + 1:-1]
    if quote in body.replace("\\" + quote, ""):
        return None
    room = WIDTH - len(head) - len(prefix) - 2
    depth, cut = 0, None
    for i, ch in enumerate(body):
        if "f" in prefix.lower():
            depth += ch == "{"
            depth -= ch == "}"
        if ch == " " and depth == 0 and 0 < i < room:
            cut = i + 1
    if cut is None or cut >= len(body):
        return None
    more = indent + ("    " if head.strip() else "")
    return [f"{head}{prefix}{quote}{body[:cut]}{quote}", f"{more}{prefix}{quote}{body[cut:]}{quote}{tail}"]


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        return False


def break_long_lines(code: str) -> str:
    """Break the lines longer than WIDTH that can be broken without changing the program."""
    lines = code.split("\n")
    i = guard = 0
    in_doc = False
    while i < len(lines):
        line = lines[i]
        quotes = line.count('"""') + line.count("'''")
        indent = line[: len(line) - len(line.lstrip())]
        new = None
        if len(line) > WIDTH:
            if line.lstrip().startswith("#"):
                new = _wrap_comment(indent, line.strip())
            elif in_doc and quotes == 0:
                new = textwrap.wrap(line.strip(), WIDTH - len(indent), initial_indent=indent,
                                    subsequent_indent=indent, break_long_words=False)
            elif (col := _comment_start(line)) is not None:
                new = (_wrap_comment(indent, line[col:]) or []) + [line[:col].rstrip()]
            elif quotes == 2 and line.strip().startswith('"""') and line.strip().endswith('"""'):
                # a one-line docstring: its text on wrapped lines, the closing quotes on their own
                text = line.strip()[3:-3]
                new = textwrap.wrap('"""' + text, WIDTH - len(indent), initial_indent=indent,
                                    subsequent_indent=indent, break_long_words=False) + [indent + '"""']
            elif quotes == 1 and line.lstrip().startswith(('"""', "'''")):
                new = textwrap.wrap(line.strip(), WIDTH - len(indent), initial_indent=indent,
                                    subsequent_indent=indent, break_long_words=False)
            else:
                new = _split_string_line(line)
        if new:
            candidate = lines[:i] + new + lines[i + 1:]
            if (_parses("\n".join(candidate)) or not _parses("\n".join(lines))) and new != [line]:
                lines = candidate
                if any(len(n) > WIDTH for n in new) and (guard := guard + 1) < 50:
                    continue  # look at the first new line again
                if quotes % 2 == 1:
                    in_doc = not in_doc
                i += len(new)
                continue
        if quotes % 2 == 1:
            in_doc = not in_doc
        i += 1
    return "\n".join(lines)


def move_long_comments(code: str) -> str:
    """Put a trailing comment that makes its line too long on a line of its own above it."""
    out = []
    for line in code.split("\n"):
        col = _comment_start(line) if len(line) > WIDTH else None
        if col is not None:
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(_wrap_comment(indent, line[col:]) or [])
            out.append(line[:col].rstrip())
        else:
            out.append(line)
    return "\n".join(out)


def reflow_docstrings(code: str) -> str:
    """Rewrap, paragraph by paragraph, every docstring that has a line longer than WIDTH."""
    lines = code.split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped.startswith('"""'):
            out.append(line)
            i += 1
            continue
        j = i if stripped.count('"""') == 2 and len(stripped) > 3 else next(
            (k for k in range(i + 1, len(lines)) if '"""' in lines[k]), None)
        if j is None:
            out.append(line)
            i += 1
            continue
        block = lines[i:j + 1]
        if all(len(b) <= WIDTH for b in block):
            out.extend(block)
            i = j + 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        text = "\n".join(b.strip() for b in block)[3:]
        text = text[: text.rindex('"""')].strip()
        paragraphs = [p for p in text.split("\n\n")]
        wrapped = []
        for n, para in enumerate(paragraphs):
            words = " ".join(para.split())
            first = '"""' if n == 0 else ""
            wrapped += textwrap.wrap(first + words, WIDTH - len(indent), break_long_words=False) or [first]
            wrapped.append("")
        wrapped = wrapped[:-1]
        if len(wrapped[-1]) + 3 <= WIDTH - len(indent):
            wrapped[-1] += '"""'
        else:
            wrapped.append('"""')
        out.extend((indent + w) if w else "" for w in wrapped)
        i = j + 1
    return "\n".join(out)


def long_lines(code: str):
    return [line for line in code.split("\n") if len(line) > WIDTH]


# --------------------------------------------------------------------------------------
# Glue out of the teaching cells
# --------------------------------------------------------------------------------------
def _is_glue(node) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "glue")


def _stored(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _loaded(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def split_glue(code: str):
    """``(teaching code, glue code)``: the cell's top-level ``glue(...)`` statements move out when
    nothing after them in the cell changes what they read (so they hand on the same values)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code, ""
    body = tree.body
    movable = []
    for k, node in enumerate(body):
        if _is_glue(node):
            later = set().union(*(_stored(n) for n in body[k + 1:])) if k + 1 < len(body) else set()
            if not (_loaded(node) & later):
                movable.append(node)
    if not movable or len(movable) == len(body):
        return code, ""
    lines = code.split("\n")
    drop = set()
    for node in movable:
        drop.update(range(node.lineno - 1, node.end_lineno))
    glue = [ast.get_source_segment(code, node) for node in movable]
    teaching = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    teaching = "\n".join(teaching.rstrip().split("\n"))
    return teaching, "\n".join(glue)


SETUP_GLUE = ("try:  # glue() hands computed numbers to the book's prose; outside the book it is not needed\n"
              "    from myst_nb import glue\n"
              "except ImportError:\n"
              "    def glue(name, value, display=True):\n"
              "        return value\n")


# --------------------------------------------------------------------------------------
def _ruff_format(path: Path) -> None:
    ruff = Path(sys.executable).with_name("ruff")
    subprocess.run([str(ruff if ruff.exists() else "ruff"), "format", "--isolated", "--quiet",
                    f"--line-length={WIDTH}", str(path)], check=True)


def format_notebook(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            text = source(cell).replace(SETUP_GLUE, "from ddetr_minimal.viz import glue\n")
            set_source(cell, move_long_comments(text))
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    _ruff_format(path)
    nb = json.loads(path.read_text())
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            cells.append(cell)
            continue
        set_source(cell, break_long_lines(reflow_docstrings(source(cell))))
        teaching, glue = split_glue(source(cell))
        cells.append(cell)
        if glue:
            set_source(cell, teaching)
            glue_cell = {"cell_type": "code", "execution_count": None, "id": f"{cell.get('id', 'cell')}-glue",
                         "metadata": {"tags": [GLUE_TAG]}, "outputs": [], "source": []}
            set_source(glue_cell, glue)
            cells.append(glue_cell)
    nb["cells"] = cells
    code = [c for c in cells if c["cell_type"] == "code"]
    if code and source(code[0]).startswith(INSTALL_MARKER):
        if INSTALL_TAG not in tags(code[0]):
            tags(code[0]).append(INSTALL_TAG)
        if len(code) > 1 and SETUP_TAG not in tags(code[1]):
            tags(code[1]).append(SETUP_TAG)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def problems(path: Path):
    """What keeps a chapter from the form :func:`format_notebook` gives it."""
    nb = json.loads(path.read_text())
    found = []
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(code):
        for line in long_lines(source(cell)):
            found.append(f"{path.name}: code line of {len(line)} > {WIDTH} characters: {line.strip()[:60]!r}")
        teaching, glue = split_glue(source(cell))
        if glue and GLUE_TAG not in tags(cell):
            found.append(f"{path.name}: a teaching cell ends in glue() calls: {glue.splitlines()[0][:50]!r}")
    if code and source(code[0]).startswith(INSTALL_MARKER):
        if INSTALL_TAG not in tags(code[0]):
            found.append(f"{path.name}: the install cell is not tagged {INSTALL_TAG}")
        if len(code) > 1 and SETUP_TAG not in tags(code[1]):
            found.append(f"{path.name}: the setup cell is not tagged {SETUP_TAG}")
    return found


def main(argv=None) -> int:
    paths = [Path(p) for p in (argv if argv else [])] or chapters()
    for path in paths:
        format_notebook(path)
    left = [p for path in paths for p in problems(path)]
    for p in left:
        print(p)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
