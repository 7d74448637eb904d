"""The official Deformable DETR checkpoint layout, and its conversion to and from ours.

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

"""
from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

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


def load_torch_file(path: str):
    """``torch.load(path, weights_only=True)`` on the CPU, allowing ``argparse.Namespace`` (the
    official release stores its command-line arguments in one).

    A missing file raises ``FileNotFoundError``; a truncated or damaged one a ``ValueError``
    naming the file; a file holding other Python objects ``pickle.UnpicklingError``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"could not read checkpoint {path!r} ({type(err).__name__}: {err}); it is truncated "
                         f"or not a PyTorch file ({os.path.getsize(path)} bytes): download it again") from err


def split_checkpoint(ckpt, path: str) -> Tuple[Dict[str, Tensor], Optional[dict]]:
    """``(state_dict, args)`` of a loaded checkpoint: the official release stores
    ``{"model": state_dict, "args": argparse.Namespace, ...}``; a bare state dict has no args."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        args = ckpt.get("args")
        return ckpt["model"], (vars(args) if isinstance(args, argparse.Namespace) else None)
    if isinstance(ckpt, dict) and all(isinstance(v, Tensor) for v in ckpt.values()):
        return ckpt, None
    raise ValueError(f"{path!r} holds neither a state dict nor a dict with a 'model' state dict "
                     f"(top-level keys: {sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__})")


def read_checkpoint(path: str) -> Dict[str, Tensor]:
    """The model state dict of a checkpoint file (see :func:`load_torch_file`)."""
    return split_checkpoint(load_torch_file(path), path)[0]
