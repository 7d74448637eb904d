"""Keep every chapter's Colab install cell in step with the repository URL of ``_config.yml``.

``python tests/sync_install_cells.py`` rewrites the cells; ``tests/test_book_config.py`` fails
when one of them differs from what this script would write.
"""
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# In Colab, install the package this book is written with"


def repository_url(root: Path = ROOT) -> str:
    return yaml.safe_load((root / "_config.yml").read_text())["repository"]["url"]


def install_cell(url: str) -> str:
    return (f"{MARKER} (elsewhere it is\n"
            "# already installed).\n"
            "import subprocess\n"
            "import sys\n"
            "\n"
            f'REPOSITORY = "{url}"\n'
            'if "google.colab" in sys.modules:\n'
            '    pip = [sys.executable, "-m", "pip", "install", "-q"]\n'
            '    package = f"ddetr_minimal @ git+{REPOSITORY}"\n'
            '    subprocess.run([*pip, package], check=True)')


def chapters(root: Path = ROOT):
    return sorted((root / "book").glob("*.ipynb"))


def install_cells(notebook: dict):
    return [c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith(MARKER)]


def main() -> int:
    wanted = install_cell(repository_url())
    for path in chapters():
        nb = json.loads(path.read_text())
        cells = install_cells(nb)
        if len(cells) != 1:
            print(f"{path}: expected one install cell starting with {MARKER!r}, found {len(cells)}", file=sys.stderr)
            return 1
        if "".join(cells[0]["source"]) != wanted:
            cells[0]["source"] = wanted.splitlines(keepends=True)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            print(f"rewrote the install cell of {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
