"""``train --pretrained``: fine-tuning from a released model on a dataset with its own classes,
with a random-weights stand-in for the release (ResNet-50, a narrow transformer) on toy data."""
import argparse
import json

import pytest
import torch

from ddetr_minimal.datasets.synthetic import generate
from ddetr_minimal.models.build import build_model
from ddetr_minimal.models.heads import focal_bias_prior
from ddetr_minimal.models.released import ours_to_official
from ddetr_minimal.training import finetune, train

# the stand-in's shape: what --pretrained must take from the file, not from the toy preset
ARCH = dict(backbone="resnet50", d_model=32, n_heads=2, enc_layers=1, dec_layers=2, dim_feedforward=48,
            num_queries=8, n_points=2, n_levels=4, with_box_refine=True, two_stage=False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "toy"
    return generate(root, num_train=4, num_val=2, image_size=160, seed=0, progress=False)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A stand-in for a released checkpoint: 91 COCO classes, every tensor random, saved as the
    official code saves it (official names, the command line's args)."""
    torch.manual_seed(0)
    model = build_model("deformable", num_classes=91, **ARCH)[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.mul_((0.1 * torch.randn(t.shape, generator=g)).exp()) if "running_var" in name else \
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    sd = ours_to_official(model.state_dict(), with_box_refine=True, two_stage=False, num_decoder_layers=2)
    path = tmp_path_factory.mktemp("release") / "r50_deformable_detr_refine.pth"
    torch.save({"model": sd, "epoch": 49, "args": argparse.Namespace(nheads=2, enc_n_points=2, dec_n_points=2,
                                                                      num_queries=8, with_box_refine=True)}, path)
    return path, model.state_dict()


def _argv(toy, out, *extra):
    return ["--model", "deformable", "--data-path", str(toy), "--output-dir", str(out), "--batch-size", "2",
            "--no-progress", "--threads", "1", "--device", "cpu", *extra]


def test_architecture_and_learning_rates_come_from_the_release(toy, release, tmp_path):
    path, _ = release
    args = train.resolve_args(_argv(toy, tmp_path, "--pretrained", str(path), "--epochs", "3"))
    assert args.d_model == 64 and args.lr_backbone == 2e-4  # the toy preset, before the checkpoint is read
    finetune.apply_pretrained(args, finetune.read_pretrained(args.pretrained))
    assert {k: getattr(args, k) for k in ARCH} == ARCH
    assert (args.lr, args.lr_backbone, args.lr_linear_proj_mult) == (2e-4, 2e-5, 0.1)  # the paper's
    assert args.epochs == 3 and not args.pretrained_backbone
    args = train.resolve_args(_argv(toy, tmp_path, "--pretrained", str(path), "--lr-backbone", "0"))
    finetune.apply_pretrained(args, finetune.read_pretrained(args.pretrained))
    assert args.lr_backbone == 0 and args.lr == 2e-4  # a flag given wins


def test_flags_that_disagree_with_the_release_are_refused(toy, release, tmp_path):
    path, _ = release
    weights = finetune.read_pretrained(str(path))
    for extra, words in ((["--d-model", "64"], "--d-model 64 (the checkpoint has 32)"),
                         (["--two-stage"], "--two-stage True (the checkpoint has False)"),
                         (["--backbone-weights", "x.pth"], "drop --backbone-weights")):
        args = train.resolve_args(_argv(toy, tmp_path, "--pretrained", str(path), *extra))
        with pytest.raises(SystemExit, match=words.replace("(", r"\(").replace(")", r"\)")):
            finetune.apply_pretrained(args, weights)
    args = train.resolve_args(["--model", "detr", "--data-path", str(toy), "--pretrained", str(path)])
    with pytest.raises(SystemExit, match="Deformable DETR weights"):
        finetune.apply_pretrained(args, weights)
    with pytest.raises(SystemExit, match="must be one of deformable_detr"):
        finetune.read_pretrained("deformable_detr_r101")


def test_everything_but_the_class_heads_is_loaded(toy, release, tmp_path, monkeypatch):
    path, stand_in = release
    monkeypatch.setattr(finetune, "download_released", lambda name, cache_dir=None: str(path))
    args = train.resolve_args(_argv(toy, tmp_path, "--pretrained", "deformable_detr_refine"))
    weights = finetune.read_pretrained(args.pretrained)  # by name: "downloaded", checked to be that variant
    finetune.apply_pretrained(args, weights)
    torch.manual_seed(5)
    model = train.build_model_from_args(args, num_classes=5)[0]
    n = finetune.load_pretrained(model, weights)
    got = model.state_dict()
    assert n == len(got) - 2 * 2  # two class heads (one per decoder layer), weight and bias
    for k, v in got.items():
        if k.startswith("class_embed."):
            assert v.shape[0] == 5  # the dataset's classes
            if k.endswith("bias"):
                torch.testing.assert_close(v, torch.full((5,), focal_bias_prior()))
        else:
            assert torch.equal(v, stand_in[k]), k
    groups = {g["name"]: g for g in train.param_groups(model, args.lr, args.lr_backbone, args.lr_linear_proj_mult)}
    assert groups["backbone"]["lr"] == 2e-5 and groups["rest"]["lr"] == 2e-4
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    names = {id(p): k for k, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[0] for p in groups["linear_proj"]["params"]} >= {
        "transformer.reference_points", "transformer.decoder.layers.1.cross_attn.sampling_offsets"}
    assert not any(p.requires_grad for k, p in model.named_parameters() if k.startswith("backbone.body.layer1."))


def test_fine_tuning_run_on_toy_data(toy, release, tmp_path):
    path, stand_in = release
    out = tmp_path / "run"
    result = train.main(_argv(toy, out, "--pretrained", str(path), "--epochs", "1"))
    line = result["epochs"][0]
    assert line["epoch"] == 1 and "AP" in line and torch.isfinite(torch.tensor(line["train_loss"]))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained"] == str(path) and config["d_model"] == 32 and config["lr_backbone"] == 2e-5
    sd = ckpt["model"]
    assert sd["class_embed.0.weight"].shape == (5, 32)
    # AdamW's first steps move a weight by about its learning rate: 2e-5 in the backbone's trained
    # stages, 2e-4 in the transformer, 2e-5 for the sampling offsets; the frozen stem stays as released
    moved = lambda k: (sd[k] - stand_in[k]).abs().max().item()  # noqa: E731
    steps = len(result["epochs"]) * 2  # 4 images, batch 2
    assert moved("backbone.body.conv1.weight") == 0
    assert 1e-5 < moved("backbone.body.layer4.0.conv1.weight") <= steps * 2e-5 * 1.01
    assert 1e-4 < moved("transformer.encoder.layers.0.linear1.weight") <= steps * 2e-4 * 1.01
    assert 1e-5 < moved("transformer.encoder.layers.0.self_attn.sampling_offsets.weight") <= steps * 2e-5 * 1.01


def test_a_dataset_smaller_than_a_batch_is_refused(toy, release, tmp_path):
    with pytest.raises(SystemExit, match="--batch-size 8 x 1 process.* more than the 4 training images"):
        train.main(_argv(toy, tmp_path / "run", "--pretrained", str(release[0]), "--batch-size", "8"))


def test_train_and_val_must_list_the_same_categories(toy, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(toy, data)
    ann = data / "annotations" / "instances_val.json"
    val = json.loads(ann.read_text())
    val["categories"] = val["categories"][:-1]  # one category fewer (and none of its annotations)
    dropped = {c["id"] for c in json.loads(ann.read_text())["categories"]} - {c["id"] for c in val["categories"]}
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] not in dropped]
    ann.write_text(json.dumps(val))
    with pytest.raises(SystemExit, match="list different categories"):
        train.main(_argv(data, tmp_path / "run", "--d-model", "32", "--n-heads", "2", "--enc-layers", "1",
                         "--dec-layers", "1", "--epochs", "1"))
