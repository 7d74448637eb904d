"""Hugging Face checkpoints: a transformers model with random weights, saved with
``save_pretrained``, loads into ours and computes the same detections on a padded batch."""
import json

import pytest
import torch

from ddetr_minimal.models import released
from ddetr_minimal.models.released import load_released, read_released

from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection  # the reference

# (with_box_refine, two_stage, levels)
VARIANTS = {"plain": (False, False, 4), "refine": (True, False, 4), "two_stage": (True, True, 4),
            "single_scale": (False, False, 1)}


def _hf_model(refine, two_stage, seed=0, num_labels=5, levels=4):
    cfg = DeformableDetrConfig(
        use_timm_backbone=True, use_pretrained_backbone=False, backbone="resnet50", d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=2, num_queries=10,
        two_stage_num_proposals=10, num_labels=num_labels, with_box_refine=refine, two_stage=two_stage,
        num_feature_levels=levels, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every tensor off its initial value (zeros, ones, shared constants)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.mul_((0.2 * noise).exp())  # stays positive
            else:
                t.add_(0.05 * noise)
    return model


def _padding_loses(model):
    """Two-stage: padding and border tokens carry memory 0, so their proposal score is one constant,
    w . LayerNorm(enc_output.bias) + c. Point the bias against w so that constant is below the
    valid tokens' scores; transformers' raw ranking then picks the same tokens as ours."""
    m = model.model
    w = model.model.decoder.class_embed[-1].weight[0] * m.enc_output_norm.weight  # (C,)
    with torch.no_grad():
        m.enc_output.bias.copy_(-8.0 * w / w.norm())
    return model


def _padded_batch():
    """Two images of different sizes padded into one tensor, with transformers' pixel_mask (1 = pixel)."""
    torch.manual_seed(5)
    sizes = [(96, 128), (72, 104)]
    images = torch.zeros(2, 3, 96, 128)
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.long)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w)
        pixel_mask[i, :h, :w] = 1
    return images, pixel_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hugging_face_checkpoint_gives_the_same_detections(variant, tmp_path):
    refine, two_stage, levels = VARIANTS[variant]
    theirs = _hf_model(refine, two_stage, levels=levels)
    if two_stage:
        _padding_loses(theirs)
    theirs.save_pretrained(tmp_path)
    ours, _, _ = load_released(path=str(tmp_path), backend="torch")
    assert ours.transformer.n_levels == levels and (ours.with_box_refine, ours.two_stage) == (refine, two_stage)
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        expected = theirs(pixel_values=images, pixel_mask=pixel_mask)
        got = ours(images, pixel_mask == 0)
    if two_stage:
        # transformers ranks the raw proposal scores (as the official code does), this package
        # ranks valid tokens only: the two agree when no padding or border token makes the top k
        top = expected.enc_outputs_class[..., 0].topk(10, dim=1).indices  # (B, k)
        chosen = torch.gather(expected.enc_outputs_coord_logits[..., 0], 1, top)  # (B, k)
        assert torch.isfinite(chosen).all(), "a padding token is among transformers' top proposals"
    assert got["pred_logits"].shape == expected.logits.shape == (2, 10, 5)
    torch.testing.assert_close(got["pred_logits"], expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pred_boxes"], expected.pred_boxes, rtol=1e-5, atol=1e-6)
    # and the outputs are not trivially equal: another random model differs
    other = _hf_model(refine, two_stage, seed=3, levels=levels)
    with torch.no_grad():
        assert not torch.allclose(other(pixel_values=images, pixel_mask=pixel_mask).logits, expected.logits, atol=1e-2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A plain model saved by transformers, and its outputs on the padded batch."""
    folder = tmp_path_factory.mktemp("hf_plain")
    theirs = _hf_model(False, False, seed=11)
    theirs.save_pretrained(folder)
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        out = theirs(pixel_values=images, pixel_mask=pixel_mask)
    return folder, out.logits, out.pred_boxes


def _detect(model):
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        out = model(images, pixel_mask == 0)
    return out["pred_logits"], out["pred_boxes"]


def test_pytorch_model_bin_reads_like_safetensors(saved, tmp_path):
    """The hub's older copies are pytorch_model.bin: a plain state dict saved with torch.save."""
    from safetensors.torch import load_file

    folder, logits, boxes = saved
    torch.save(load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    got = read_released(str(tmp_path))
    assert got.layout == "hugging face" and got.file.endswith("pytorch_model.bin")
    model = load_released(path=str(tmp_path / "pytorch_model.bin"), backend="torch")[0]
    torch.testing.assert_close(_detect(model), (logits, boxes), rtol=1e-5, atol=1e-5)
    assert model.class_names == [f"LABEL_{i}" for i in range(5)]  # the config's id2label


def test_truncated_file_is_named(saved, tmp_path):
    folder, _, _ = saved
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="truncated") as info:
        load_released(path=str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(info.value)
    torch.save({"model.level_embed": torch.zeros(4, 64)}, tmp_path / "short.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "short.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated") as info:
        load_released(path=str(tmp_path / "cut.bin"))
    assert "cut.bin" in str(info.value)


def test_mismatched_file_lists_the_keys(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _, _ = saved
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.encoder.layers.1.fc2.weight"]
    sd["model.decoder.layers.0.encoder_attn_layer_norm.weight"] = torch.ones(65)
    sd["model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    sd["class_embed.1.bias"] = sd["class_embed.0.bias"] + 1  # a second copy of the shared head, not equal
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError) as info:
        load_released(path=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "model.safetensors") in msg and "hugging face layout" in msg
    assert ("missing keys (1):\n    transformer.encoder.layers.1.linear2.weight "
            "(file: model.encoder.layers.1.fc2.weight)") in msg
    assert "unexpected keys (1):\n    model.encoder.layers.0.extra.weight" in msg
    assert ("model.decoder.layers.0.encoder_attn_layer_norm.weight: checkpoint (65,), model (64,) "
            "(our transformer.decoder.layers.0.norm2.weight)") in msg
    assert "inconsistent copies (1):\n    class_embed.1.bias differs from class_embed.0.bias" in msg


def test_unsupported_config_is_refused(saved, tmp_path):
    folder, _, _ = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(dilation=True, decoder_n_points=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError) as info:
        load_released(path=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "config.json") in msg and "dilation = True" in msg
    assert "encoder_n_points = 2 but decoder_n_points = 3" in msg


def test_name_must_match_the_file(saved):
    folder, _, _ = saved
    with pytest.raises(ValueError, match="name='deformable_detr_two_stage'"):
        load_released("deformable_detr_two_stage", path=str(folder))


def test_download_from_the_hub_then_load(saved, tmp_path, monkeypatch):
    """What the book's Colab cell runs, with the hub served from a local folder."""
    folder, logits, boxes = saved
    r = released.RELEASES["deformable_detr"]
    files = {r.hub_url(n): (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
    calls = []

    def serve(url, dst, progress=True):
        calls.append(url)
        with open(dst, "wb") as f:
            f.write(files[url])

    monkeypatch.setattr(torch.hub, "download_url_to_file", serve)
    model = load_released("deformable_detr", cache_dir=str(tmp_path), backend="torch")[0]
    torch.testing.assert_close(_detect(model), (logits, boxes), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 and not model.training
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "deformable_detr"


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_sampling_points_and_detections_match_transformers(variant, tmp_path):
    """What the book draws for a released model: the last decoder layer's sampling points and
    the confident detections, checked against transformers' model on two photos."""
    from ddetr_minimal.models.inference import decoder_sampling, detect, prepare_images

    refine, two_stage, levels = VARIANTS[variant]
    theirs = _hf_model(refine, two_stage, seed=2)
    if two_stage:
        _padding_loses(theirs)
    theirs.save_pretrained(tmp_path)
    ours, _, post = load_released(path=str(tmp_path), backend="torch")
    torch.manual_seed(0)
    photos = [torch.rand(3, 90, 120), torch.rand(3, 2100, 1500)]  # the second is scaled down to 1333 high
    images, mask, sizes = prepare_images(photos)
    assert images.shape == (2, 3, 1333, 952) and sizes == [(90, 120), (2100, 1500)]
    assert mask[0, :90, :120].logical_not().all() and mask[0, 90:].all() and not mask[1].any()
    seen = {}
    core = theirs.model.decoder.layers[-1].encoder_attn.attn  # the multi-scale op of the last layer
    handle = core.register_forward_hook(lambda m, args, out: seen.update(loc=args[4], w=args[5]))
    small_images, small_mask, _ = prepare_images([photos[0], photos[0][:, :70, :100]])
    with torch.no_grad():
        expected = theirs(pixel_values=small_images, pixel_mask=(~small_mask).long())
    handle.remove()
    got = decoder_sampling(ours, small_images, small_mask)
    torch.testing.assert_close(got["locations"], seen["loc"], rtol=1e-5, atol=1e-5)  # (B, Q, M, L, K, 2)
    torch.testing.assert_close(got["weights"], seen["w"], rtol=1e-5, atol=1e-5)  # (B, Q, M, L, K)
    torch.testing.assert_close(got["outputs"]["pred_logits"], expected.logits, rtol=1e-5, atol=1e-5)
    assert got["reference_points"].shape[-1] == (4 if two_stage else 2)
    # detections: the post-processor's top scores above the threshold, in the photo's pixels
    dets = detect(ours, post, photos[:1], threshold=0.3)[0]
    scores = expected.logits[0].sigmoid().flatten()
    assert len(dets["scores"]) == int((scores >= 0.3).sum()) > 0  # the first photo alone: no padding
    torch.testing.assert_close(dets["scores"], scores[scores >= 0.3].sort(descending=True).values, rtol=0, atol=1e-5)
    assert (dets["boxes"][:, 2:] <= torch.tensor([120.0, 90.0]) + 1e-4).all() or not len(dets["boxes"])
    with pytest.raises(ValueError, match="threshold must be in"):
        detect(ours, post, photos[:1], threshold=5)
    with pytest.raises(ValueError, match=r"photos\[0\] must be a float tensor"):
        prepare_images([torch.zeros(120, 90, 3, dtype=torch.uint8)])


def test_the_chapter_cells_run_with_a_stand_in_release(saved, monkeypatch):
    """Chapter 5's released-model cells (run in Colab only), executed here with the download
    replaced by the saved random model: they detect, draw, and plot the sampling points."""
    from pathlib import Path

    import matplotlib
    import matplotlib.pyplot as plt
    import nbformat

    matplotlib.use("Agg")
    folder, _, _ = saved
    nb = nbformat.read(Path(__file__).parents[1] / "book" / "ch05_model.ipynb", as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "released-model" in c.metadata.get("tags", [])]
    assert len(cells) == 3 and "load_released(RELEASE)" in cells[0]
    monkeypatch.setenv("DDETR_DOWNLOAD", "1")
    asked = []
    monkeypatch.setattr(released, "download_released", lambda name, cache_dir=None: asked.append(name) or str(folder))
    monkeypatch.setattr(plt, "show", lambda: None)
    from ddetr_minimal.viz import common

    full_size = common.sample_photo
    monkeypatch.setattr(common, "sample_photo", lambda: full_size((150, 128)))  # the photo, smaller: faster
    namespace = {}
    before = set(plt.get_fignums())
    for source in cells:
        exec(compile(source, "ch05_model.ipynb", "exec"), namespace)
    assert asked == ["deformable_detr"] and namespace["RUN_DOWNLOADS"]
    found = namespace["found"]
    assert len(found["boxes"]) == len(found["scores"]) and (found["scores"] >= namespace["THRESHOLD"]).all()
    assert namespace["seen"]["locations"].shape[:2] == (1, 10)  # (B, Q, M, L, K, 2)
    assert len(set(plt.get_fignums()) - before) == 2  # the detections and the sampling points
    plt.close("all")
    monkeypatch.setenv("DDETR_DOWNLOAD", "0")  # offline: nothing is downloaded, one line is shown
    namespace = {}
    exec(compile(cells[0], "ch05_model.ipynb", "exec"), namespace)
    assert not namespace["RUN_DOWNLOADS"] and asked == ["deformable_detr"]


def test_in_memory_names_of_newer_transformers_read_too(tmp_path):
    """``torch.save(model.state_dict())`` of a transformers 5 model: its in-memory names
    (``mlp.fc1``, ``o_proj``, no ``conv_encoder``) differ from those save_pretrained writes."""
    theirs = _hf_model(True, False, seed=4)
    sd = theirs.state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    theirs.config.to_json_file(str(tmp_path / "config.json"))
    ours = load_released(path=str(tmp_path / "pytorch_model.bin"), backend="torch")[0]
    images, pixel_mask = _padded_batch()
    with torch.no_grad():
        expected = theirs(pixel_values=images, pixel_mask=pixel_mask)
    torch.testing.assert_close(_detect(ours), (expected.logits, expected.pred_boxes), rtol=1e-5, atol=1e-5)
