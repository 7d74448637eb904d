"""Load the released Deformable DETR checkpoints (ResNet-50, COCO) into this package's model.

The official implementation (github.com/fundamentalvision/Deformable-DETR) saves
``{"model": state_dict, ...}``. Its parameter names differ from ours in five places; the
tensors are the same:

=====================================================  ================================================
official                                               ours
=====================================================  ================================================
``backbone.0.body.*``                                  ``backbone.body.*``
``transformer.decoder.layers.i.self_attn.in_proj_*``   ``...self_attn.{q,k,v}_proj.*`` (rows split in 3)
``transformer.decoder.layers.i.norm2`` / ``norm1``     ``norm1`` / ``norm2`` (numbered in order of use:
                                                       after self-attention / after cross-attention)
``class_embed.i``, ``bbox_embed.i`` for every layer,   one shared ``class_embed.0``, ``bbox_embed.0``
even when they are one shared module                   unless the heads are per layer (box refinement)
``transformer.decoder.{bbox,class}_embed.i``           not stored twice (the decoder is handed the heads)
=====================================================  ================================================

Nothing is downloaded unless :func:`download_released` (or :func:`load_released` without a
``path``) is called.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class Release:
    """One released model: its Google Drive file, variant flags and COCO val AP (paper, Table 1)."""

    drive_id: str
    with_box_refine: bool
    two_stage: bool
    n_levels: int
    coco_ap: float

    @property
    def page_url(self) -> str:
        """The page a browser can download the file from."""
        return f"https://drive.google.com/file/d/{self.drive_id}/view"

    @property
    def url(self) -> str:
        """A direct-download address (skips Drive's "cannot scan for viruses" page)."""
        return f"https://drive.usercontent.google.com/download?id={self.drive_id}&export=download&confirm=t"


RELEASES: Dict[str, Release] = {
    "deformable_detr": Release("1nDWZWHuRwtwGden77NLM9JoWe-YisJnA", False, False, 4, 44.5),
    "deformable_detr_refine": Release("1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI", True, False, 4, 46.2),
    "deformable_detr_two_stage": Release("15I03A7hNTpwuLNdfuEmW9_taZMNVssEp", True, True, 4, 46.9),
    "deformable_detr_single_scale": Release("1WEjQ9_FgfI5sw5OZZ4ix-OKk-IJ_-SDU", False, False, 1, 39.4),
}
COCO_NUM_CLASSES = 91  # the released models index COCO's category ids 1..90 directly

_DEC = re.compile(r"^(transformer\.decoder\.layers\.\d+\.)(.*)$")
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_DEC_HEAD = re.compile(r"^transformer\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_QKV = ("q_proj", "k_proj", "v_proj")


# --------------------------------------------------------------------------------------
# Name conversion
# --------------------------------------------------------------------------------------
def _swap_norms(rest: str) -> str:
    """Decoder-layer norms: ours are numbered in order of use, the official ones are not."""
    for a, b in (("norm1.", "norm2."), ("norm2.", "norm1.")):
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def official_key(key: str) -> str:
    """The official name of one of our tensors (for a q/k/v projection: the stacked in_proj
    tensor it is a third of; for a shared head: its first copy)."""
    if key.startswith("backbone."):
        return "backbone.0." + key[len("backbone."):]
    m = _DEC.match(key)
    if m:
        prefix, rest = m.groups()
        parts = rest.split(".")
        if parts[0] == "self_attn" and parts[1] in _QKV:
            return f"{prefix}self_attn.in_proj_{parts[2]}"
        return prefix + _swap_norms(rest)
    return key


def ours_to_official(state_dict: Dict[str, Tensor], *, with_box_refine: bool, two_stage: bool,
                     num_decoder_layers: int = 6) -> Dict[str, Tensor]:
    """Rename (and where needed stack or replicate) our tensors into the official layout."""
    n_pred = num_decoder_layers + int(two_stage)  # heads the official model lists
    out: Dict[str, Tensor] = {}
    for key, v in state_dict.items():
        m = _HEAD.match(key)
        if m:
            name, i, rest = m.group(1), int(m.group(2)), m.group(3)
            for j in ([i] if with_box_refine else range(n_pred)):  # a shared head is listed n_pred times
                out[f"{name}.{j}.{rest}"] = v
                if (name == "bbox_embed" and with_box_refine) or (name == "class_embed" and two_stage):
                    out[f"transformer.decoder.{name}.{j}.{rest}"] = v  # the decoder's reference to the heads
            continue
        m = _DEC.match(key)
        parts = m.group(2).split(".") if m else []
        if parts[:1] == ["self_attn"] and parts[1] in _QKV:
            if parts[1] == "q_proj":  # stack the q, k, v rows once, when meeting q
                qkv = [state_dict[f"{m.group(1)}self_attn.{p}.{parts[2]}"] for p in _QKV]
                out[official_key(key)] = torch.cat(qkv, 0)  # (3C, C) or (3C,)
            continue
        out[official_key(key)] = v
    return out


def official_to_ours(state_dict: Dict[str, Tensor], *, with_box_refine: bool, two_stage: bool
                     ) -> Dict[str, Tensor]:
    """Inverse of :func:`ours_to_official`. Copies of shared heads must be identical
    (they are one module in the official model); a mismatch raises ``ValueError``."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    out: Dict[str, Tensor] = {}
    problems: List[str] = []
    for key, v in sd.items():
        if key.startswith("backbone.0."):
            out["backbone." + key[len("backbone.0."):]] = v
            continue
        m = _DEC_HEAD.match(key)
        if m:  # a second reference to a top-level head: check, do not store
            canonical = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            if canonical not in sd:
                problems.append(f"{key} has no counterpart {canonical}")
            elif not torch.equal(sd[canonical], v):
                problems.append(f"{key} differs from {canonical}, but they are one module")
            continue
        m = _HEAD.match(key)
        if m and not with_box_refine:
            name, i, rest = m.group(1), int(m.group(2)), m.group(3)
            first = f"{name}.0.{rest}"
            if i == 0:
                out[key] = v
            elif first not in sd:
                problems.append(f"{key} has no counterpart {first}")
            elif not torch.equal(sd[first], v):
                problems.append(f"{key} differs from {first}; without box refinement the heads are shared "
                                "(is this a box-refinement checkpoint?)")
            continue
        m = _DEC.match(key)
        if m:
            prefix, rest = m.groups()
            if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                if v.shape[0] % 3:
                    problems.append(f"{key} has shape {tuple(v.shape)}; expected 3*d_model rows (q, k, v)")
                    continue
                for p, part in zip(_QKV, v.chunk(3, 0)):
                    out[f"{prefix}self_attn.{p}.{kind}"] = part
                continue
            out[prefix + _swap_norms(rest)] = v
            continue
        out[key] = v
    if problems:
        raise ValueError("inconsistent official checkpoint:\n  " + "\n  ".join(problems))
    return out


def _variant(model: nn.Module) -> Tuple[bool, bool]:
    for name in ("with_box_refine", "two_stage", "num_decoder_layers"):
        if not hasattr(model, name):
            raise TypeError(f"model must be a DeformableDETR, got {type(model).__name__}")
    return model.with_box_refine, model.two_stage


def _listing(title: str, items: List[str], limit: int = 25) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown)


def load_official_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Load a state dict in the official naming into ``model`` (a :class:`DeformableDETR`).

    Every key must be used and every parameter and buffer of the model filled with a tensor
    of the right shape; otherwise a ``ValueError`` lists the missing keys (with their
    official names), the unexpected keys and the shape mismatches.
    """
    refine, two_stage = _variant(model)
    ours = official_to_ours(state_dict, with_box_refine=refine, two_stage=two_stage)
    expected = model.state_dict()
    missing = [f"{k} (official: {official_key(k)})" if official_key(k) != k else k
               for k in expected if k not in ours]
    unexpected = sorted({official_key(k) for k in ours if k not in expected})  # as named in the checkpoint
    shapes = [f"{official_key(k)}: checkpoint {tuple(ours[k].shape)}, model {tuple(expected[k].shape)}"
              + (f" (our {k})" if official_key(k) != k else "")
              for k in expected if k in ours and ours[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"the checkpoint does not fit DeformableDETR(with_box_refine={refine}, two_stage={two_stage}, "
                 f"num_classes={getattr(model, 'num_classes', '?')}, "
                 f"num_queries={getattr(model, 'num_queries', '?')}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)):
            if items:
                parts.append(_listing(title, items))
        raise ValueError("\n".join(parts))
    model.load_state_dict(ours, strict=True)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Dict[str, Tensor]:
    """The model state dict of an official checkpoint file (``torch.load(weights_only=True)``).

    The release stores ``{"model": ..., "args": argparse.Namespace, ...}``; the Namespace is
    the only non-tensor class it needs and is allowed explicitly.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(isinstance(v, Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"{path!r} holds neither a state dict nor a dict with a 'model' state dict "
                     f"(top-level keys: {sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")


def default_cache_dir() -> str:
    """``<torch hub dir>/checkpoints/ddetr_minimal``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", "ddetr_minimal")


def _release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"name must be one of {sorted(RELEASES)}, got {name!r}")
    return RELEASES[name]


def download_released(name: str, cache_dir: Optional[str] = None) -> str:
    """Download a released checkpoint (about 160 MB) unless it is already cached; return its path.

    An existing file is never overwritten. If Google Drive answers with a web page instead of
    the file, the partial download is removed and the error says where to get it by hand.
    """
    release = _release(name)
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"r50_{name}.pth")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    partial = path + ".partial"
    try:
        torch.hub.download_url_to_file(release.url, partial, progress=True)
    except Exception as err:
        raise RuntimeError(f"could not download {name} from {release.url} ({type(err).__name__}: {err}). "
                           f"Download it in a browser from {release.page_url}, then call "
                           f"load_released({name!r}, path=<file>).") from err
    with open(partial, "rb") as f:
        head = f.read(256).lstrip().lower()
    if head.startswith((b"<!doctype", b"<html")):
        os.remove(partial)
        raise RuntimeError(f"Google Drive sent a web page instead of {name}. Download it in a browser from "
                           f"{release.page_url}, then call load_released({name!r}, path=<file>).")
    os.replace(partial, path)
    return path


def load_released(name: str = "deformable_detr", path: Optional[str] = None, cache_dir: Optional[str] = None,
                  backend: str = "auto"):
    """Build the released ResNet-50 model ``name`` (see :data:`RELEASES`) and load its weights.

    ``path``: a checkpoint already on disk; without it the file is downloaded (once).
    Returns ``(model, criterion, postprocessor)`` as :func:`ddetr_minimal.models.build.build_model`,
    with the model in eval mode. Labels are COCO category ids.
    """
    from .build import build_model

    release = _release(name)
    model, criterion, post = build_model(
        "deformable", num_classes=COCO_NUM_CLASSES, backbone="resnet50", pretrained_backbone=False,
        with_box_refine=release.with_box_refine, two_stage=release.two_stage, n_levels=release.n_levels,
        backend=backend)
    load_official_state_dict(model, read_checkpoint(path or download_released(name, cache_dir)))
    return model.eval(), criterion, post
