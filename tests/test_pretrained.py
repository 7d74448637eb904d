"""Loading checkpoints in the official Deformable DETR naming: round trips for every released
variant, the layout of the official decoder layer, corrupted checkpoints, files, downloads."""
import argparse
import copy
import os
import pickle
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddetr_minimal.models import released
from ddetr_minimal.models.build import build_model
from ddetr_minimal.models.deformable_attention import MSDeformAttn
from ddetr_minimal.models.released import (
    RELEASES,
    load_official_state_dict,
    load_released,
    official_to_ours,
    ours_to_official,
    read_checkpoint,
)

TINY = dict(backbone="small", d_model=32, n_heads=4, enc_layers=2, dec_layers=2, dim_feedforward=64,
            num_queries=6, dropout=0.0)


def _build(name, seed, **overrides):
    r = RELEASES[name]
    torch.manual_seed(seed)
    kw = dict(num_classes=91, with_box_refine=r.with_box_refine, two_stage=r.two_stage, n_levels=r.n_levels)
    kw.update(overrides)
    return build_model("deformable", **kw)[0].eval()


def _perturb(model):
    """Give every tensor outside the backbone distinct values (many start at zero or at
    identical constants), so that a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _official(model):
    return ours_to_official(model.state_dict(), with_box_refine=model.with_box_refine, two_stage=model.two_stage,
                            num_decoder_layers=model.num_decoder_layers)


def _inputs(h=64, w=96):
    torch.manual_seed(3)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, :, w - w // 6:] = True
    return torch.randn(1, 3, h, w), mask


# keys and shapes of the official model definition (models/deformable_detr.py,
# models/deformable_transformer.py), ResNet-50, d=256, 300 queries, 91 classes
COMMON = {
    "backbone.0.body.conv1.weight": (64, 3, 7, 7),
    "backbone.0.body.layer4.2.bn3.running_var": (2048,),
    "transformer.encoder.layers.5.self_attn.sampling_offsets.weight": (256, 256),
    "transformer.encoder.layers.0.norm2.bias": (256,),
    "transformer.decoder.layers.5.self_attn.in_proj_weight": (768, 256),
    "transformer.decoder.layers.5.self_attn.out_proj.weight": (256, 256),
    "transformer.decoder.layers.0.cross_attn.attention_weights.weight": (128, 256),
    "transformer.decoder.layers.0.cross_attn.value_proj.bias": (256,),
    "transformer.decoder.layers.3.norm3.weight": (256,),
    "class_embed.5.weight": (91, 256),
    "bbox_embed.5.layers.2.weight": (4, 256),
}
EXPECTED = {
    # 561 keys: ResNet-50 265 (53 convs + 4 buffers for each of 53 frozen BNs), input
    # projections 16, level embedding 1, reference points 2, encoder 6 x 16, decoder 6 x 22,
    # query embedding 1, six copies of the shared class head (2) and box MLP (6)
    "deformable_detr": (561, {"transformer.level_embed": (4, 256), "input_proj.3.0.weight": (256, 2048, 3, 3),
                              "transformer.reference_points.weight": (2, 256), "query_embed.weight": (300, 512)},
                        ["class_embed.6.weight", "transformer.decoder.bbox_embed.0.layers.0.weight"]),
    # + the decoder's reference to the six box heads (36)
    "deformable_detr_refine": (597, {"transformer.decoder.bbox_embed.5.layers.0.weight": (256, 256)},
                               ["class_embed.6.weight", "transformer.decoder.class_embed.0.weight"]),
    # seven head pairs (the last for the proposals), each listed twice; no learned queries or
    # reference-point layer; + enc_output, enc_output_norm, pos_trans, pos_trans_norm (8)
    "deformable_detr_two_stage": (630, {"class_embed.6.weight": (91, 256), "bbox_embed.6.layers.2.bias": (4,),
                                        "transformer.decoder.class_embed.6.bias": (91,),
                                        "transformer.decoder.bbox_embed.6.layers.1.weight": (256, 256),
                                        "transformer.enc_output.weight": (256, 256),
                                        "transformer.enc_output_norm.bias": (256,),
                                        "transformer.pos_trans.weight": (512, 512),
                                        "transformer.pos_trans_norm.weight": (512,)},
                                  ["query_embed.weight", "transformer.reference_points.weight"]),
    # one level: C5 through a 1x1 projection; 3 projections and 3 level rows fewer (-12)
    "deformable_detr_single_scale": (549, {"transformer.level_embed": (1, 256),
                                           "input_proj.0.0.weight": (256, 2048, 1, 1),
                                           "transformer.encoder.layers.5.self_attn.sampling_offsets.weight": (64, 256),
                                           "transformer.decoder.layers.0.cross_attn.attention_weights.weight": (32, 256)},
                                     ["input_proj.1.0.weight"]),
}


@pytest.mark.parametrize("name", list(RELEASES))
def test_official_layout_of_every_release(name):
    """The full-size model converts to exactly the official key set and shapes, and back."""
    ours = _perturb(_build(name, seed=0))
    official = _official(ours)
    count, shapes, absent = EXPECTED[name]
    assert len(official) == count
    for key, shape in {**COMMON, **shapes}.items():
        assert tuple(official[key].shape) == shape, key
    assert not set(absent) & set(official)
    other = copy.deepcopy(ours)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    load_official_state_dict(other, official)
    theirs = other.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("name", list(RELEASES))
def test_round_trip_gives_identical_outputs(name):
    """Build ours, convert to the official names, convert back into a fresh model: same outputs."""
    ours = _perturb(_build(name, seed=0, num_classes=3, **TINY))
    other = _build(name, seed=1, num_classes=3, **TINY)
    images, mask = _inputs()
    with torch.no_grad():
        expected = ours(images, mask)
        assert not torch.equal(other(images, mask)["pred_boxes"], expected["pred_boxes"])
        load_official_state_dict(other, _official(ours))
        got = other(images, mask)
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])
    for a, b in zip(got["aux_outputs"], expected["aux_outputs"]):
        assert torch.equal(a["pred_boxes"], b["pred_boxes"])
    if RELEASES[name].two_stage:
        assert torch.equal(got["enc_outputs"]["pred_boxes"], expected["enc_outputs"]["pred_boxes"])


def test_decoder_layer_matches_the_official_layout():
    """Run a decoder layer written from the official definition on the official tensors:
    nn.MultiheadAttention with stacked in_proj, then norm2; cross-attention, then norm1; FFN, norm3."""
    model = _perturb(build_model("deformable", num_classes=3, **TINY)[0].eval())
    sd = _official(model)
    p = "transformer.decoder.layers.1."
    d, M = 32, 4
    mha = nn.MultiheadAttention(d, M, batch_first=True)
    mha.load_state_dict({k: sd[p + "self_attn." + k] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                                "out_proj.bias")})
    cross = MSDeformAttn(d, 4, M, 4)
    cross.load_state_dict({k[len(p + "cross_attn."):]: v for k, v in sd.items() if k.startswith(p + "cross_attn.")})
    norm = lambda x, n: F.layer_norm(x, (d,), sd[p + n + ".weight"], sd[p + n + ".bias"])
    torch.manual_seed(0)
    tgt, query_pos = torch.randn(2, 6, d), torch.randn(2, 6, d)
    shapes = torch.tensor([[4, 6], [2, 3], [1, 2], [1, 1]])
    start = torch.tensor([0, 24, 30, 32])
    memory, ref = torch.randn(2, 33, d), torch.rand(2, 6, 4, 2)
    mask = torch.zeros(2, 33, dtype=torch.bool)
    with torch.no_grad():
        x = norm(tgt + mha(tgt + query_pos, tgt + query_pos, tgt)[0], "norm2")
        x = norm(x + cross(x + query_pos, ref, memory, shapes, start, mask), "norm1")
        ffn = F.linear(F.relu(F.linear(x, sd[p + "linear1.weight"], sd[p + "linear1.bias"])),
                       sd[p + "linear2.weight"], sd[p + "linear2.bias"])
        official = norm(x + ffn, "norm3")
        ours = model.transformer.decoder.layers[1](tgt, query_pos, ref, memory, shapes, start, mask)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


@pytest.fixture()
def tiny():
    model = _perturb(build_model("deformable", num_classes=3, **TINY)[0].eval())
    return model, _official(model)


def test_missing_key_is_listed_with_its_official_name(tiny):
    model, sd = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["transformer.level_embed"], sd["transformer.decoder.layers.0.self_attn.in_proj_weight"]
    with pytest.raises(ValueError) as info:
        load_official_state_dict(model, sd)
    msg = str(info.value)
    assert "missing keys (4)" in msg and "transformer.level_embed" in msg
    assert ("transformer.decoder.layers.0.self_attn.k_proj.weight "
            "(official: transformer.decoder.layers.0.self_attn.in_proj_weight)") in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_wrong_shape_and_extra_key_are_listed(tiny):
    model, sd = tiny
    sd["query_embed.weight"] = torch.zeros(7, 64)
    sd["transformer.decoder.layers.1.norm2.weight"] = torch.ones(33)
    sd["transformer.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        load_official_state_dict(model, sd)
    msg = str(info.value)
    assert "unexpected keys (1):\n    transformer.extra.weight" in msg
    assert "wrong shapes (2)" in msg and "query_embed.weight: checkpoint (7, 64), model (6, 64)" in msg
    assert ("transformer.decoder.layers.1.norm2.weight: checkpoint (33,), model (32,) "
            "(our transformer.decoder.layers.1.norm1.weight)") in msg
    assert "missing" not in msg


def test_shared_head_copies_must_agree(tiny):
    model, sd = tiny
    sd["class_embed.1.bias"] = sd["class_embed.1.bias"] + 1
    with pytest.raises(ValueError, match="class_embed.1.bias differs from class_embed.0.bias"):
        load_official_state_dict(model, sd)
    refine = _perturb(build_model("deformable", num_classes=3, with_box_refine=True, **TINY)[0])
    with pytest.raises(ValueError, match="is this a box-refinement checkpoint"):
        load_official_state_dict(model, _official(refine))
    two = _perturb(build_model("deformable", num_classes=3, with_box_refine=True, two_stage=True, **TINY)[0])
    sd = _official(two)
    sd["transformer.decoder.bbox_embed.2.layers.0.bias"] = sd["transformer.decoder.bbox_embed.2.layers.0.bias"] * 2
    with pytest.raises(ValueError, match="transformer.decoder.bbox_embed.2.layers.0.bias differs from "
                                         "bbox_embed.2.layers.0.bias"):
        official_to_ours(sd, with_box_refine=True, two_stage=True)


def test_checkpoint_file_loads_with_weights_only(tmp_path):
    model = _perturb(_build("deformable_detr", seed=0))
    path = tmp_path / "r50_deformable_detr.pth"
    # the release's layout: model, optimizer and scheduler states, epoch, and the argparse args
    torch.save({"model": _official(model), "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
                "lr_scheduler": {"step_size": 40}, "epoch": 49,
                "args": argparse.Namespace(lr=2e-4, with_box_refine=False, two_stage=False)}, path)
    loaded, _, post = load_released("deformable_detr", path=str(path))
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    assert not loaded.training and post.num_select == 100


def test_legacy_file_format_reads(tmp_path, tiny):
    """The release was saved by PyTorch 1.5, before the zip format; weights_only reads it too."""
    model, sd = tiny
    path = tmp_path / "legacy.pth"
    torch.save({"model": sd, "epoch": 49, "args": argparse.Namespace(two_stage=False)}, path,
               _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        assert f.read(2) != b"PK"  # not a zip archive
    loaded = read_checkpoint(str(path))
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())


class NotATensor:
    pass


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "suspicious.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "absent.pth"))


class FakeNetwork:
    """Stands in for torch.hub.download_url_to_file: serves ``files`` (url -> bytes), refuses
    every other address as the network would, and records what was asked for."""

    def __init__(self, files=None):
        self.files, self.calls = dict(files or {}), []

    def __call__(self, url, dst, progress=True):
        self.calls.append(url)
        if url not in self.files:
            raise urllib.error.URLError(f"no route to {url}")
        with open(dst, "wb") as f:
            f.write(self.files[url])


def test_download_tries_the_hub_first_and_never_overwrites(tmp_path, monkeypatch):
    r = RELEASES["deformable_detr_refine"]
    net = FakeNetwork({r.hub_url("config.json"): b'{"model_type": "deformable_detr"}',
                       r.hub_url("model.safetensors"): b"safetensors bytes"})
    monkeypatch.setattr(torch.hub, "download_url_to_file", net)
    folder = released.download_released("deformable_detr_refine", cache_dir=str(tmp_path))
    assert net.calls == ["https://huggingface.co/SenseTime/deformable-detr-with-box-refine/resolve/main/config.json",
                         "https://huggingface.co/SenseTime/deformable-detr-with-box-refine/resolve/main/model.safetensors"]
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"my own file")
    assert released.download_released("deformable_detr_refine", cache_dir=str(tmp_path)) == folder
    assert len(net.calls) == 2 and open(os.path.join(folder, "model.safetensors"), "rb").read() == b"my own file"
    with pytest.raises(ValueError, match="name must be one of"):
        released.download_released("deformable_detr_r101", cache_dir=str(tmp_path))


def test_hub_without_safetensors_gives_pytorch_model_bin(tmp_path, monkeypatch):
    r = RELEASES["deformable_detr"]
    net = FakeNetwork({r.hub_url("config.json"): b"{}", r.hub_url("pytorch_model.bin"): b"PK\x03\x04 bin"})
    monkeypatch.setattr(torch.hub, "download_url_to_file", net)
    folder = released.download_released("deformable_detr", cache_dir=str(tmp_path))
    assert [u.rsplit("/", 1)[1] for u in net.calls] == ["config.json", "model.safetensors", "pytorch_model.bin"]
    assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.bin"]  # no partial file left


def test_drive_is_the_fallback_and_its_file_is_cached(tmp_path, monkeypatch):
    r = RELEASES["deformable_detr_two_stage"]
    net = FakeNetwork({r.url: b"PK\x03\x04 checkpoint bytes"})  # the hub cannot be reached
    monkeypatch.setattr(torch.hub, "download_url_to_file", net)
    path = released.download_released("deformable_detr_two_stage", cache_dir=str(tmp_path))
    assert net.calls == [r.hub_url("config.json"), r.url] and "15I03A7hNTpwuLNdfuEmW9_taZMNVssEp" in net.calls[1]
    assert path == str(tmp_path / "r50_deformable_detr_two_stage.pth") and os.listdir(tmp_path) == [os.path.basename(path)]
    assert released.download_released("deformable_detr_two_stage", cache_dir=str(tmp_path)) == path
    assert len(net.calls) == 2  # the cached Drive file is used without asking the hub again


def test_download_failures_say_what_to_do(tmp_path, monkeypatch):
    page = RELEASES["deformable_detr"].page_url
    html = b"\n<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>"
    monkeypatch.setattr(torch.hub, "download_url_to_file", FakeNetwork({RELEASES["deformable_detr"].url: html}))
    with pytest.raises(RuntimeError, match="sent a web page") as info:
        released.download_released("deformable_detr", cache_dir=str(tmp_path))
    assert page in str(info.value) and list(tmp_path.iterdir()) == []  # no partial file, no empty folder
    assert "SenseTime/deformable-detr" in str(info.value)  # the hub was tried first

    monkeypatch.setattr(torch.hub, "download_url_to_file", FakeNetwork())
    with pytest.raises(RuntimeError, match="could not download deformable_detr") as info:
        released.download_released("deformable_detr", cache_dir=str(tmp_path))
    assert page in str(info.value) and "path=<file>" in str(info.value) and "no route to" in str(info.value)
    assert list(tmp_path.iterdir()) == []
