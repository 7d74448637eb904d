"""The benchmark runs end to end on tiny sizes, writes its JSON and never overwrites silently."""
import json

import pytest

from ddetr_minimal.measure import benchmark


def test_benchmark_writes_json_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--sides", "8,12,16,20,24", "--repeats", "1", "--queries", "20", "--out", str(out), "--skip-transformers"]
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
    printed = capsys.readouterr().out
    assert "Fitted exponents" in printed and "Skipping the comparison with transformers" in printed
    assert data["versus_transformers"] is None
    assert result["exponents"] == e
    with pytest.raises(SystemExit):
        benchmark.main(args)
    assert json.loads(out.read_text()) == data  # untouched
    benchmark.main(args + ["--force"])


def test_benchmark_needs_five_sizes(tmp_path):
    with pytest.raises(SystemExit):
        benchmark.main(["--sides", "8,12", "--out", str(tmp_path / "x.json")])


def test_benchmark_compares_with_transformers_on_tiny_shapes(tmp_path, capsys):
    """The comparison with transformers' pure-PyTorch Deformable DETR runs and is recorded
    (transformers and timm are test dependencies, see requirements.txt)."""
    pytest.importorskip("transformers")  # a test dependency; the next test fails when it is missing
    out = tmp_path / "bench.json"
    benchmark.main(["--sides", "8,12,16,20,24", "--repeats", "1", "--queries", "20", "--out", str(out),
                    "--tiny-comparison", "--op-repeats", "1", "--step-repeats", "1"])
    versus = json.loads(out.read_text())["versus_transformers"]
    (op,) = versus["op"]
    assert op["case"] == "tiny" and op["max_abs_diff"] < 1e-5  # the same numbers as transformers'
    assert op["ours_s"] > 0 and op["transformers_s"] > 0
    assert op["time_ratio"] == pytest.approx(op["ours_s"] / op["transformers_s"])
    assert op["ours_saved_bytes"] > 0 and op["transformers_saved_bytes"] > 0
    assert op["memory_ratio"] == pytest.approx(op["ours_saved_bytes"] / op["transformers_saved_bytes"])
    step = versus["training_step"]
    assert step["image_size"] == 64 and step["threads"] == 2
    profile = versus["training_step_profile"]  # where our step's time goes, recorded with it
    assert profile["image_size"] == 64 and sum(profile["kind_shares"].values()) == pytest.approx(1.0)
    assert step["time_ratio"] == pytest.approx(step["ours_wall_s"] / step["transformers_wall_s"])
    printed = capsys.readouterr().out
    assert "op fwd+bwd, tiny" in printed and "training step 64x64" in printed and "by kind of work" in printed


def test_transformers_is_a_test_dependency():
    """CI installs requirements.txt, so the comparison above is not skipped there."""
    from pathlib import Path

    reqs = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text().split("# Tests", 1)[1]
    names = {line.split("#")[0].split("=")[0].split(">")[0].strip() for line in reqs.splitlines()}
    assert {"transformers", "timm"} <= names
    from ddetr_minimal.measure.versus_transformers import transformers_available

    assert transformers_available(), "pip install -r requirements.txt installs transformers and timm"
