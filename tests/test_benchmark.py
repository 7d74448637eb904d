"""The benchmark runs end to end on tiny sizes, writes its JSON and never overwrites silently."""
import json

import pytest

from ddetr_minimal.measure import benchmark


def test_benchmark_writes_json_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--sides", "8,12,16,20,24", "--repeats", "1", "--queries", "20", "--out", str(out)]
    result = benchmark.main(args)
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m ddetr_minimal benchmark")
    assert [r["HW"] for r in data["encoder"]] == [64, 144, 256, 400, 576]
    # memory held for backward: the attention matrices make vanilla grow faster than deformable
    e = data["exponents"]
    assert e["vanilla_memory"] > 1.4 > 1.2 > e["deformable_memory"] > 0.8
    assert e["deformable_flops"] == pytest.approx(1.0)
    # each size is timed on its own map: 9x the pixels costs vanilla attention far more than 3x the time
    rows = data["encoder"]
    assert rows[-1]["vanilla_s"] > 3 * rows[0]["vanilla_s"]
    assert rows[-1]["deformable_s"] > rows[0]["deformable_s"]
    assert {r["backend"] for r in data["backends"]} == {"loop", "torch"}
    assert "Fitted exponents" in capsys.readouterr().out
    assert result["exponents"] == e
    with pytest.raises(SystemExit):
        benchmark.main(args)
    assert json.loads(out.read_text()) == data  # untouched
    benchmark.main(args + ["--force"])


def test_benchmark_needs_five_sizes(tmp_path):
    with pytest.raises(SystemExit):
        benchmark.main(["--sides", "8,12", "--out", str(tmp_path / "x.json")])
