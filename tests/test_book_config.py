"""The book's configuration: one repository URL, used by every chapter's Colab install cell."""
import json

import yaml

from sync_install_cells import ROOT, chapters, install_cell, install_cells, repository_url


def test_every_chapter_installs_from_the_configured_repository():
    wanted = install_cell(repository_url())
    assert chapters(), "no chapter notebooks found under book/"
    for path in chapters():
        cells = install_cells(json.loads(path.read_text()))
        assert len(cells) == 1, f"{path.name}: expected one Colab install cell, found {len(cells)}"
        assert "".join(cells[0]["source"]) == wanted, (
            f"{path.name}'s install cell differs from _config.yml's repository; run python tests/sync_install_cells.py")


def test_the_published_book_has_a_base_url_and_download_buttons():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["html"]["baseurl"].startswith("https://") and config["html"]["baseurl"].endswith("/")
    assert config["html"]["use_download_button"] is True
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_the_publishing_workflows_build_strictly():
    deploy = yaml.safe_load((ROOT / ".github/workflows/deploy-book.yml").read_text())
    check = yaml.safe_load((ROOT / ".github/workflows/check-book.yml").read_text())
    build_steps = [s.get("run", "") for s in deploy["jobs"]["build"]["steps"]]
    assert any("jupyter-book build . -W -n" in r for r in build_steps)
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["jobs"]["deploy"]["steps"])
    check_steps = [s.get("run", "") for s in check["jobs"]["build-and-linkcheck"]["steps"]]
    assert any("-W -n" in r for r in check_steps) and any("--builder linkcheck" in r for r in check_steps)
    assert True in check and "pull_request" in check[True]  # YAML reads the key `on` as True
