"""The training command: output-folder safety, parameter groups, checkpoints, exact resume,
and a two-process run under torchrun (gloo, CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr_minimal.measure import records
from ddetr_minimal.training import train
from ddetr_minimal.datasets.synthetic import generate

# a model small enough to train a few steps in seconds on a CPU
TINY = ["--d-model", "32", "--n-heads", "2", "--enc-layers", "1", "--dec-layers", "1",
        "--dim-feedforward", "64", "--num-queries", "8", "--n-points", "2", "--batch-size", "2",
        "--dropout", "0.1", "--no-progress", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "toy"
    return generate(root, num_train=6, num_val=4, image_size=160, seed=0, progress=False)


def _args(toy, out, model="deformable", *extra):
    return ["--model", model, "--data-path", str(toy), "--output-dir", str(out), *TINY, *extra]


def test_param_groups_slow_down_offsets_and_reference_points():
    from ddetr_minimal.models.build import build_model

    model, _, _ = build_model("deformable", num_classes=3, backbone="small", d_model=32, n_heads=2,
                              enc_layers=1, dec_layers=1, dim_feedforward=64, num_queries=5)
    groups = {g["name"]: g for g in train.param_groups(model, lr=1e-3, lr_backbone=1e-4, lr_linear_proj_mult=0.1)}
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["rest"]["lr"] == pytest.approx(1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
               for p in groups["linear_proj"]["params"])
    assert all(names[id(p)].startswith("backbone") for p in groups["backbone"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_coco_preset_is_the_papers_recipe():
    args = train.resolve_args(["--model", "deformable", "--preset", "coco", "--data-path", "/nowhere"])
    assert (args.lr, args.lr_backbone, args.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)
    assert (args.weight_decay, args.clip_max_norm, args.epochs, args.lr_drop) == (1e-4, 0.1, 50, 40)
    assert args.backbone == "resnet50" and args.num_queries == 300
    args = train.resolve_args(["--model", "detr", "--preset", "coco", "--data-path", "/x", "--lr", "1e-4"])
    assert args.lr == 1e-4  # an explicit flag wins over the preset


def test_bad_flags_are_refused():
    with pytest.raises(SystemExit):
        train.resolve_args(["--model", "detr", "--with-box-refine"])
    with pytest.raises(SystemExit):
        train.resolve_args(["--model", "deformable", "--preset", "coco"])  # no --data-path
    with pytest.raises(SystemExit):
        train.resolve_args(["--model", "deformable", "--eval-epochs", "1,x"])


def test_save_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    records.save_atomic({"a": torch.arange(3)}, path)
    records.save_atomic({"a": torch.arange(5)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


@pytest.mark.slow
def test_train_writes_metrics_and_refuses_to_overwrite(toy, tmp_path):
    out = tmp_path / "run"
    result = train.main(_args(toy, out, "detr", "--epochs", "2", "--eval-every", "2"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] == [x["epoch"] for x in result["epochs"]]
    assert "AP" not in lines[0] and all(k in lines[1] for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 2 and {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    assert not list(out.glob("*.tmp"))
    before = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit, match="--resume"):
        train.main(_args(toy, out, "detr", "--epochs", "1"))
    assert (out / "checkpoint.pth").read_bytes() == before
    train.main(_args(toy, out, "detr", "--epochs", "1", "--force"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deformable", "detr"])
def test_resume_gives_identical_weights(toy, tmp_path, model):
    """2 epochs straight == 1 epoch, stop, --resume, 1 more epoch (dropout and augmentation on)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(_args(toy, straight, model, "--epochs", "2", "--eval-every", "1", "--lr-drop", "1"))
    train.main(_args(toy, resumed, model, "--epochs", "1", "--eval-every", "1", "--lr-drop", "1"))
    after_one = torch.load(resumed / "checkpoint.pth", weights_only=False)["model"]
    train.main(_args(toy, resumed, model, "--epochs", "2", "--eval-every", "1", "--lr-drop", "1", "--resume"))
    a = torch.load(straight / "checkpoint.pth", weights_only=False)
    b = torch.load(resumed / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    changed = [k for k in a["model"] if not torch.equal(a["model"][k], after_one[k])]
    assert changed, "the second epoch did not change any weight"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resuming"
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [x["train_loss"] for x in la] == [x["train_loss"] for x in lb]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(toy, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ddetr_minimal", "train", *_args(toy, out, "deformable", "--epochs", "1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and "AP" in lines[0] and lines[0]["train_loss"] > 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert len(ckpt["rng"]) == 2  # one random state per rank
    assert not any(k.startswith("module.") for k in ckpt["model"])
