"""Where a training step spends its time: stages by hooks, kinds of work from profiler events."""
from types import SimpleNamespace

import pytest

from ddetr_minimal.measure import step_profile


def event(name, self_us, parent=None):
    return SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_parent=parent)


def test_kind_shares_count_everything_inside_the_op_as_the_op():
    op = event("_SparseMSDABackward", 2)
    events = [event("aten::mm", 10), op, event("aten::addmm", 5, op), event("aten::mul", 3, event("x", 0, op)),
              event("aten::bernoulli_", 4), event("aten::layer_norm", 6), event("aten::mkldnn_convolution", 0)]
    shares = step_profile.kind_shares(events)
    assert shares == pytest.approx({"linear layers": 10 / 30, "convolutions": 0.0, "dropout masks": 4 / 30,
                                    "deformable attention op": 10 / 30, "everything else": 6 / 30})


def test_profile_of_a_small_detector():
    from ddetr_minimal.measure.versus_transformers import build_ours, step_inputs

    model, criterion = build_ours(d_model=64, layers=2, ffn=64, num_queries=10)
    profile = step_profile.profile_step(model, criterion, step_inputs(64), threads=1, warmup=0)
    stages = profile["stages_s"]
    assert list(stages) == ["backbone", "encoder", "decoder", "rest of the model (projections, heads)",
                            "matcher", "losses", "backward"]
    assert all(stages[k] > 0 for k in ("backbone", "encoder", "decoder", "matcher", "backward"))
    assert profile["step_s"] == pytest.approx(sum(stages.values()))
    kinds = profile["kind_shares"]
    assert sum(kinds.values()) == pytest.approx(1.0)
    assert kinds["deformable attention op"] > 0 and kinds["linear layers"] > 0 and kinds["convolutions"] > 0
    assert "Our training step, 1 thread:" in step_profile.report(profile)
