"""Recorded results: atomic JSON writes and finding results from anywhere in the repository."""
import json

import pytest

from ddetr_minimal.measure import records


def test_write_json_then_load_result_from_a_subfolder(tmp_path):
    records.write_json(tmp_path / "data" / "results" / "r.json", {"a": 1})
    assert not list((tmp_path / "data" / "results").glob("*.tmp"))
    book = tmp_path / "book"
    book.mkdir()
    assert records.load_result("r.json", start=book, online=False) == {"a": 1}
    assert records.load_result("r.json", start=tmp_path, online=False) == {"a": 1}


def test_missing_result_is_none_offline(tmp_path):
    assert records.load_result("nothing.json", start=tmp_path, online=False) is None


def test_unreachable_online_result_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RESULTS_URL", "http://127.0.0.1:9/")  # the discard port: refused
    assert records.load_result("nothing.json", start=tmp_path, online=True) is None


def test_write_json_replaces_the_whole_file(tmp_path):
    path = tmp_path / "x.json"
    records.write_json(path, {"long": list(range(100))})
    records.write_json(path, {"short": 1})
    assert json.loads(path.read_text()) == {"short": 1}
    with pytest.raises(TypeError):  # not JSON: the previous file stays whole
        records.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"short": 1}


def _commits(node):
    """Every value of a "commit" key anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "commit" and isinstance(value, str):
                yield value
            else:
                yield from _commits(value)
    elif isinstance(node, list):
        for value in node:
            yield from _commits(value)


def test_every_committed_record_comes_from_committed_code():
    """A record made from a tree with uncommitted changes (commit ``...-dirty``) cannot be
    reproduced from its commit, so none may be part of the repository."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "data"
    files = sorted(root.glob("results/*.json")) + sorted(root.glob("bench/**/*.json")) + sorted(
        root.glob("checkpoints/*.json"))
    assert files, f"no records found under {root}"
    dirty = {str(f.relative_to(root)): c for f in files for c in _commits(json.loads(f.read_text()))
             if c.endswith("-dirty")}
    assert not dirty, f"records made from uncommitted code (re-record them from a commit): {dirty}"
