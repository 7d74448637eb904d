"""Load the released Deformable DETR models (ResNet-50, COCO) into this package's model.

Two layouts of the same tensors are read, told apart by their keys:

* the official release (github.com/fundamentalvision/Deformable-DETR), a ``.pth`` file on
  Google Drive -- see :mod:`.official_checkpoint` for its names;
* the Hugging Face hub copies (SenseTime/deformable-detr, ...), a folder with ``config.json``
  and ``model.safetensors`` or ``pytorch_model.bin`` as ``save_pretrained`` writes it -- see
  :mod:`.hf_checkpoint`.

The architecture (width, layers, levels, queries, refinement, two-stage, classes) is read from
the tensors' shapes and names; heads and points per head from ``config.json`` or the official
``args`` when the file has them (8 and 4 otherwise, the release's values).

Nothing is downloaded unless :func:`download_released` (or :func:`load_released` without a
``path``) is called: the hub first, Google Drive when the hub cannot be reached.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from . import hf_checkpoint as hf
from .official_checkpoint import (  # noqa: F401  (re-exported: the official layout's public names)
    load_torch_file, official_key, official_to_ours, ours_to_official, read_checkpoint, split_checkpoint)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Release:
    """One released model: where it lives, its variant flags and its COCO val AP.

    ``coco_ap`` is the AP the official repository's README reports for the released file;
    ``paper_ap`` is Table 1 of the paper (Zhu et al., ICLR 2021), which reports the models
    trained for the paper (43.8, 45.4, 46.2 for the three multi-scale ones; the single-scale
    model is not in Table 1).
    """

    drive_id: str
    hub_repo: str
    with_box_refine: bool
    two_stage: bool
    n_levels: int
    coco_ap: float
    paper_ap: Optional[float] = None

    @property
    def page_url(self) -> str:
        """The page a browser can download the Drive file from."""
        return f"https://drive.google.com/file/d/{self.drive_id}/view"

    @property
    def url(self) -> str:
        """A direct-download address (skips Drive's "cannot scan for viruses" page)."""
        return f"https://drive.usercontent.google.com/download?id={self.drive_id}&export=download&confirm=t"

    def hub_url(self, filename: str) -> str:
        """The hub's address of one file of the repo (``resolve/main``)."""
        return f"https://huggingface.co/{self.hub_repo}/resolve/main/{filename}"


_HUB = "SenseTime/deformable-detr"
RELEASES: Dict[str, Release] = {
    "deformable_detr": Release("1nDWZWHuRwtwGden77NLM9JoWe-YisJnA", _HUB, False, False, 4, 44.5, 43.8),
    "deformable_detr_refine": Release("1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI", _HUB + "-with-box-refine",
                                      True, False, 4, 46.2, 45.4),
    "deformable_detr_two_stage": Release("15I03A7hNTpwuLNdfuEmW9_taZMNVssEp", _HUB + "-with-box-refine-two-stage",
                                         True, True, 4, 46.9, 46.2),
    "deformable_detr_single_scale": Release("1WEjQ9_FgfI5sw5OZZ4ix-OKk-IJ_-SDU", _HUB + "-single-scale",
                                            False, False, 1, 39.4),
}
COCO_NUM_CLASSES = 91  # the released models index COCO's category ids 1..90 directly
HEADS = ("class_embed.", "bbox_embed.")


def coco_category_names() -> List[str]:
    """COCO's names indexed by category id (0..90; "N/A" for ids COCO does not use), from torchvision."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


@dataclass
class ReleasedWeights:
    """A checkpoint read into our names: ``arch`` (``build_model`` keyword arguments),
    ``state`` (our state dict), ``source`` (each key's name in the file), ``file``, ``layout``
    ("official" or "hugging face") and ``class_names`` (indexed by label) when known."""

    arch: dict
    num_classes: int
    state: Dict[str, Tensor]
    source: Dict[str, str]
    file: str
    layout: str
    class_names: Optional[List[str]] = None
    unexpected: List[str] = field(default_factory=list)
    conflicts: List[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Loading with checks
# --------------------------------------------------------------------------------------
def _listing(title: str, items: List[str], limit: int = 25) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown)


def _variant(model: nn.Module):
    for name in ("with_box_refine", "two_stage", "num_decoder_layers"):
        if not hasattr(model, name):
            raise TypeError(f"model must be a DeformableDETR, got {type(model).__name__}")
    return model.with_box_refine, model.two_stage


def load_checked(model: nn.Module, ours: Dict[str, Tensor], file_name: Callable[[str], str], *,
                 unexpected: Sequence[str] = (), conflicts: Sequence[str] = (), skip: Sequence[str] = (),
                 where: str = "the checkpoint", label: str = "file") -> None:
    """Load ``ours`` (our names) into ``model``, all or nothing.

    Every key not starting with a prefix in ``skip`` must be used and every such parameter
    and buffer filled with a tensor of the right shape; otherwise a ``ValueError`` names
    ``where`` and lists the missing keys, the unexpected keys and the shape mismatches, with
    ``file_name(key)``, the key's name in the file, beside ours where they differ, and the
    ``conflicts`` found while renaming (copies of one module that differ).
    """
    refine, two_stage = _variant(model)
    kept = lambda k: not k.startswith(tuple(skip))  # noqa: E731
    expected = {k: v for k, v in model.state_dict().items() if kept(k)}
    ours = {k: v for k, v in ours.items() if kept(k)}
    named = lambda k: f"{k} ({label}: {file_name(k)})" if file_name(k) != k else k  # noqa: E731
    missing = [named(k) for k in expected if k not in ours]
    extra = sorted(list(unexpected) + [file_name(k) for k in ours if k not in expected])
    shapes = [f"{file_name(k)}: checkpoint {tuple(ours[k].shape)}, model {tuple(expected[k].shape)}"
              + (f" (our {k})" if file_name(k) != k else "")
              for k in expected if k in ours and ours[k].shape != expected[k].shape]
    if missing or extra or shapes or conflicts:
        parts = [f"{where} does not fit DeformableDETR(with_box_refine={refine}, two_stage={two_stage}, "
                 f"num_classes={getattr(model, 'num_classes', '?')}, "
                 f"num_queries={getattr(model, 'num_queries', '?')}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", shapes),
                             ("inconsistent copies", list(conflicts))):
            if items:
                parts.append(_listing(title, items))
        raise ValueError("\n".join(parts))
    model.load_state_dict(ours, strict=not skip)


def load_official_state_dict(model: nn.Module, state_dict: Dict[str, Tensor], where: str = "the checkpoint") -> None:
    """Load a state dict in the official naming into ``model`` (a :class:`DeformableDETR`);
    see :func:`load_checked` for the checks (keys are named as in the official layout)."""
    refine, two_stage = _variant(model)
    ours = official_to_ours(state_dict, with_box_refine=refine, two_stage=two_stage)
    load_checked(model, ours, official_key, where=where, label="official")


# --------------------------------------------------------------------------------------
# Reading a file: layout from the keys, architecture from the shapes
# --------------------------------------------------------------------------------------
def _count(keys, prefix: str) -> int:
    found = {int(m.group(1)) for k in keys for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def _arch_from_state(ours: Dict[str, Tensor], *, with_box_refine: bool, where: str, n_heads: int = 8,
                     n_points: int = 4, num_queries: Optional[int] = None) -> dict:
    for key in ("transformer.level_embed", "class_embed.0.weight", "transformer.encoder.layers.0.linear1.weight"):
        if key not in ours:
            raise ValueError(f"{where} has no {key} (nor its name in the file); is it a Deformable DETR checkpoint?")
    n_levels, d_model = ours["transformer.level_embed"].shape
    two_stage = "transformer.enc_output.weight" in ours
    if not two_stage and "query_embed.weight" in ours:
        num_queries = ours["query_embed.weight"].shape[0]
    return dict(backbone="resnet101" if "backbone.body.layer3.22.conv1.weight" in ours else "resnet50",
                d_model=int(d_model), n_heads=int(n_heads), enc_layers=_count(ours, "transformer.encoder.layers."),
                dec_layers=_count(ours, "transformer.decoder.layers."),
                dim_feedforward=int(ours["transformer.encoder.layers.0.linear1.weight"].shape[0]),
                n_levels=int(n_levels), n_points=int(n_points), with_box_refine=bool(with_box_refine),
                two_stage=two_stage, num_queries=int(num_queries or 300))


def read_released(path: str) -> ReleasedWeights:
    """Read a checkpoint in either layout: an official ``.pth``, or a Hugging Face folder
    (or its ``model.safetensors`` / ``pytorch_model.bin``, with ``config.json`` beside it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist (a .pth file, or a folder with config.json and "
                                f"model.safetensors or pytorch_model.bin)")
    weights, config_file = hf.hf_files(path) if os.path.isdir(path) or path.endswith(".safetensors") else (path, None)
    if weights.endswith(".safetensors"):
        sd, args = hf.read_safetensors(weights), None
    else:
        sd, args = split_checkpoint(load_torch_file(weights), weights)
    if hf.is_hf_state_dict(sd):
        config_file = config_file or hf.hf_files(weights)[1]
        cfg = hf.read_config(config_file) if config_file else {}
        arch_cfg = hf.arch_from_config(cfg, config_file) if cfg else {}
        refine = arch_cfg.get("with_box_refine", any(k.startswith("model.decoder.bbox_embed.") for k in sd))
        D = _count(sd, "model.decoder.layers.")
        two_stage = "model.enc_output.weight" in sd
        ours, source, unexpected, conflicts = hf.hf_to_ours(sd, with_box_refine=refine, two_stage=two_stage,
                                                            num_decoder_layers=D)
        arch = _arch_from_state(ours, with_box_refine=refine, where=weights, n_heads=arch_cfg.get("n_heads", 8),
                                n_points=arch_cfg.get("n_points", 4), num_queries=arch_cfg.get("num_queries"))
        names = hf.class_names_from_config(cfg)
        return ReleasedWeights(arch, int(ours["class_embed.0.weight"].shape[0]), ours, source, weights, "hugging face",
                               names, unexpected, conflicts)
    if "transformer.level_embed" not in sd:
        raise ValueError(f"{weights!r} is neither in the official layout (transformer.level_embed) nor in the "
                         f"Hugging Face one (model.level_embed); its first keys: {sorted(sd)[:8]}")
    args = args or {}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    refine = bool(args.get("with_box_refine", "transformer.decoder.bbox_embed.0.layers.0.weight" in sd))
    ours = official_to_ours(sd, with_box_refine=refine, two_stage="transformer.enc_output.weight" in sd)
    arch = _arch_from_state(ours, with_box_refine=refine, where=weights, n_heads=args.get("nheads", 8),
                            n_points=args.get("dec_n_points", 4), num_queries=args.get("num_queries"))
    return ReleasedWeights(arch, int(ours["class_embed.0.weight"].shape[0]), ours,
                           {k: official_key(k) for k in ours}, weights, "official")


def check_release_name(name: Optional[str], weights: ReleasedWeights) -> None:
    """With an explicit ``name``, the file must be that release's variant."""
    if name is None:
        return
    r = _release(name)
    want = dict(with_box_refine=r.with_box_refine, two_stage=r.two_stage, n_levels=r.n_levels)
    got = {k: weights.arch[k] for k in want}
    if got != want:
        raise ValueError(f"{weights.file!r} holds a model with {got}, but name={name!r} is {want}; "
                         "pass the matching name, or name=None to take the file as it is")


def load_weights(model: nn.Module, weights: ReleasedWeights, skip: Sequence[str] = ()) -> None:
    """Load ``weights`` into ``model`` (all or nothing; ``skip``: key prefixes left as they are)."""
    is_hf = weights.layout == "hugging face"
    file_name = (lambda k: weights.source.get(k, hf.hf_key(k))) if is_hf else official_key
    load_checked(model, weights.state, file_name, unexpected=weights.unexpected, conflicts=weights.conflicts,
                 skip=skip, where=f"{weights.file!r} ({weights.layout} layout)", label="file" if is_hf else "official")


# --------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    """``<torch hub dir>/checkpoints/ddetr_minimal``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", "ddetr_minimal")


def _release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"name must be one of {sorted(RELEASES)}, got {name!r}")
    return RELEASES[name]


def _fetch(url: str, path: str) -> None:
    """Download ``url`` to ``path`` through ``path.partial``; a web page instead of data is refused."""
    partial = path + ".partial"
    try:
        torch.hub.download_url_to_file(url, partial, progress=True)
        with open(partial, "rb") as f:
            head = f.read(256).lstrip().lower()
        if head.startswith((b"<!doctype", b"<html")):
            raise RuntimeError("the server sent a web page instead of the file")
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, path)


def download_from_drive(name: str, cache_dir: Optional[str] = None) -> str:
    """The official ``.pth`` of ``name`` from Google Drive (about 160 MB), unless cached; its path.

    An existing file is never overwritten. A failed download or a web page in place of the
    file leaves nothing behind, and the error says where to get the file by hand.
    """
    release = _release(name)
    path = os.path.join(cache_dir or default_cache_dir(), f"r50_{name}.pth")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        _fetch(release.url, path)
    except Exception as err:
        what = "sent a web page" if "web page" in str(err) else "could not be reached"
        raise RuntimeError(f"could not download {name}: Google Drive {what} ({type(err).__name__}: {err}, "
                           f"{release.url}). Download it in a browser from {release.page_url}, then call "
                           f"load_released({name!r}, path=<file>).") from err
    return path


def download_from_hub(name: str, cache_dir: Optional[str] = None) -> str:
    """The Hugging Face copy of ``name`` (``config.json`` and the weights), unless cached; its folder.

    ``model.safetensors`` is tried first, then ``pytorch_model.bin``. Files already there are
    never overwritten.
    """
    release = _release(name)
    folder = os.path.join(cache_dir or default_cache_dir(), "hub", release.hub_repo.replace("/", "--"))
    have = [f for f in hf.WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if have and os.path.isfile(os.path.join(folder, hf.CONFIG_FILE)):
        return folder
    os.makedirs(folder, exist_ok=True)
    errors = []
    try:
        if not os.path.isfile(os.path.join(folder, hf.CONFIG_FILE)):
            _fetch(release.hub_url(hf.CONFIG_FILE), os.path.join(folder, hf.CONFIG_FILE))
        for filename in hf.WEIGHT_FILES:
            try:
                _fetch(release.hub_url(filename), os.path.join(folder, filename))
                return folder
            except Exception as err:
                errors.append(f"{filename}: {type(err).__name__}: {err}")
    except Exception as err:
        errors.append(f"{hf.CONFIG_FILE}: {type(err).__name__}: {err}")
    if not os.listdir(folder):
        os.rmdir(folder)  # leave no empty folder behind (nor an empty "hub" above it)
        if not os.listdir(os.path.dirname(folder)):
            os.rmdir(os.path.dirname(folder))
    raise RuntimeError(f"could not download {name} from the hub repo {release.hub_repo} ({'; '.join(errors)})")


def download_released(name: str, cache_dir: Optional[str] = None) -> str:
    """A released checkpoint on disk, downloading it once: from the cache if either copy is
    there, else from the Hugging Face hub, else from Google Drive. Returns its path."""
    release = _release(name)
    cache_dir = cache_dir or default_cache_dir()
    hub_folder = os.path.join(cache_dir, "hub", release.hub_repo.replace("/", "--"))
    drive_file = os.path.join(cache_dir, f"r50_{name}.pth")
    if os.path.isfile(os.path.join(hub_folder, hf.CONFIG_FILE)) and any(
            os.path.isfile(os.path.join(hub_folder, f)) for f in hf.WEIGHT_FILES):
        return hub_folder
    if os.path.isfile(drive_file):
        return drive_file
    try:
        return download_from_hub(name, cache_dir)
    except RuntimeError as hub_err:
        try:
            return download_from_drive(name, cache_dir)
        except RuntimeError as drive_err:
            raise RuntimeError(f"{hub_err}\nand from Google Drive: {drive_err}") from drive_err


def load_released(name: Optional[str] = None, path: Optional[str] = None, cache_dir: Optional[str] = None,
                  backend: str = "auto"):
    """Build a released ResNet-50 model and load its weights.

    ``name``: one of :data:`RELEASES` (downloaded once when ``path`` is None; with a ``path``
    the file must be that variant). ``path``: a checkpoint on disk in either layout (see
    :func:`read_released`); the architecture is read from it. Returns ``(model, criterion,
    postprocessor)`` as :func:`ddetr_minimal.models.build.build_model`, the model in eval mode
    with ``model.class_names`` (indexed by label: COCO category ids for the releases) when known.
    """
    from .build import build_model

    if path is None:
        path = download_released(name or "deformable_detr", cache_dir)
    weights = read_released(path)
    check_release_name(name, weights)
    model, criterion, post = build_model("deformable", num_classes=weights.num_classes, pretrained_backbone=False,
                                         backend=backend, **weights.arch)
    load_weights(model, weights)
    model.class_names = weights.class_names or (coco_category_names() if weights.num_classes == COCO_NUM_CLASSES
                                                else None)
    return model.eval(), criterion, post
