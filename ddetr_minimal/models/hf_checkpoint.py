"""Read Deformable DETR checkpoints in the Hugging Face layout (``save_pretrained``).

A folder written by ``DeformableDetrForObjectDetection.save_pretrained`` (and the hub repos
SenseTime/deformable-detr, ...) holds ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``. The tensors are the official ones under other names:

================================================================  ==============================================
Hugging Face                                                      ours
================================================================  ==============================================
``model.backbone.conv_encoder.model.*`` (timm ResNet)             ``backbone.body.*`` (same torchvision names)
``model.input_proj.*``, ``model.level_embed``                     ``input_proj.*``, ``transformer.level_embed``
``model.query_position_embeddings.weight``                        ``query_embed.weight`` (query_pos, then tgt)
``model.{reference_points,enc_output,pos_trans}...``              ``transformer.{...}``
encoder ``self_attn_layer_norm``, ``fc1``, ``fc2``,               ``norm1``, ``linear1``, ``linear2``, ``norm2``
``final_layer_norm``
decoder ``self_attn.out_proj`` (``o_proj``), ``encoder_attn``,    ``self_attn.out_proj``, ``cross_attn``,
``self_attn_layer_norm``, ``encoder_attn_layer_norm``,            ``norm1``, ``norm2``, ``norm3``
``final_layer_norm``
``class_embed.i``, ``bbox_embed.i``, ``model.decoder.*_embed.i``  ``class_embed``, ``bbox_embed`` (one shared
                                                                  pair, or one per layer with refinement)
================================================================  ==============================================

Newer transformers releases name the FFN ``mlp.fc1`` and the self-attention output ``o_proj``
in memory but write the older names to disk; both are read. ``save_pretrained`` leaves out a
head that is tied to another one (a shared head is stored once, the decoder's reference to
the heads in place of the heads themselves); a head absent from the file is the head it is
tied to: the decoder's copy, else head 0.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

import torch

Tensor = torch.Tensor

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"

_BACKBONE = re.compile(r"^model\.backbone\.(?:conv_encoder\.)?model\.(.*)$")
_HEAD = re.compile(r"^(?:model\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.([a-z0-9_]+)\.(.*)$")
_TRANSFORMER = ("level_embed", "reference_points.", "enc_output.", "enc_output_norm.", "pos_trans.",
                "pos_trans_norm.")
# sub-module renames inside an encoder / decoder layer (either transformers naming)
_ENCODER = {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2",
            "final_layer_norm": "norm2"}
_DECODER = {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "encoder_attn": "cross_attn",
            "encoder_attn_layer_norm": "norm2", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3"}


def is_hf_state_dict(keys) -> bool:
    """True for the Hugging Face layout (every tensor of the detector lives under ``model.``)."""
    keys = list(keys)
    return any(k == "model.level_embed" or k.startswith("model.encoder.layers.") for k in keys)


def _layer_key(kind: str, i: str, module: str, rest: str) -> str | None:
    if module == "mlp" and rest.split(".")[0] in ("fc1", "fc2"):  # mlp.fc1.weight -> fc1 + weight
        module, rest = rest.split(".", 1)
    table = _ENCODER if kind == "encoder" else _DECODER
    if module not in table:
        return None
    if module == "self_attn" and rest.startswith("o_proj."):
        rest = "out_proj." + rest[len("o_proj."):]
    return f"transformer.{kind}.layers.{i}.{table[module]}.{rest}"


def hf_to_ours(state_dict: Dict[str, Tensor], *, with_box_refine: bool, two_stage: bool, num_decoder_layers: int
               ) -> Tuple[Dict[str, Tensor], Dict[str, str], List[str], List[str]]:
    """Rename a Hugging Face state dict into ours.

    Returns ``(ours, source, unexpected, conflicts)``: our tensors, the file's name of each of
    our keys (for error messages), the file's keys that fit nowhere, and the copies of one head
    that differ. The caller decides what to do with them.
    """
    ours: Dict[str, Tensor] = {}
    source: Dict[str, str] = {}
    unexpected: List[str] = []
    problems: List[str] = []
    heads: Dict[Tuple[str, int, str], List[Tuple[str, Tensor]]] = {}
    for key, v in state_dict.items():
        new = None
        m = _BACKBONE.match(key)
        if m:
            new = "backbone.body." + m.group(1)
        elif _HEAD.match(key):
            name, i, rest = _HEAD.match(key).groups()
            heads.setdefault((name, int(i), rest), []).append((key, v))
            continue
        elif _LAYER.match(key):
            new = _layer_key(*_LAYER.match(key).groups())
        elif key.startswith("model.input_proj."):
            new = key[len("model."):]
        elif key == "model.query_position_embeddings.weight":
            new = "query_embed.weight"
        elif key.startswith("model.") and key[len("model."):].startswith(_TRANSFORMER):
            new = "transformer." + key[len("model."):]
        if new is None:
            unexpected.append(key)
            continue
        ours[new], source[new] = v, key
    n_pred = num_decoder_layers + int(two_stage)
    names = sorted({(name, rest) for name, _, rest in heads})
    for name, rest in names:
        copies = {i: heads.get((name, i, rest), []) for i in range(n_pred)}
        for i, found in copies.items():
            for key, v in found[1:]:
                if not torch.equal(v, found[0][1]):
                    problems.append(f"{key} differs from {found[0][0]}, but they are one module")
        extra = sorted(i for (n, i, r) in heads if n == name and r == rest and i >= n_pred)
        unexpected += [key for i in extra for key, _ in heads[(name, i, rest)]]
        if not copies[0]:
            continue  # reported as a missing key by the caller
        first_key, first = copies[0][0]
        for i in range(n_pred if with_box_refine else 1):
            key, v = copies[i][0] if copies[i] else (f"{first_key} (tied to head {i})", first)
            ours[f"{name}.{i}.{rest}"], source[f"{name}.{i}.{rest}"] = v, key
        if not with_box_refine:  # one shared head: every stored copy must be the same tensor
            for i in range(1, n_pred):
                for key, v in copies[i]:
                    if not torch.equal(v, first):
                        problems.append(f"{key} differs from {first_key}; without box refinement the heads "
                                        "are shared (is this a box-refinement checkpoint?)")
    return ours, source, unexpected, problems


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def _backbone_name(cfg: dict) -> str:
    sub = cfg.get("backbone_config") or {}
    name = cfg.get("backbone") or sub.get("backbone")
    if sub and sub.get("model_type") not in (None, "timm_backbone"):
        name = None  # a transformers ResNet, whose parameters have other names
    return name


def arch_from_config(cfg: dict, where: str) -> dict:
    """``build_model`` keyword arguments for a transformers ``DeformableDetrConfig`` (as a dict).

    Raises ``ValueError`` (naming ``where``, the config file) for what this package does not
    build: another backbone than a timm ResNet-50/101, dilation, learned position embeddings,
    an activation other than ReLU, or different encoder and decoder head counts, points or FFN widths.
    """
    if cfg.get("model_type") != "deformable_detr":
        raise ValueError(f"{where}: model_type must be 'deformable_detr', got {cfg.get('model_type')!r}")
    problems = []
    backbone = _backbone_name(cfg)
    if backbone not in ("resnet50", "resnet101"):
        problems.append(f"backbone {backbone!r} (expected a timm 'resnet50' or 'resnet101')")
    for key, expected in (("dilation", False), ("position_embedding_type", "sine"), ("activation_function", "relu")):
        if cfg.get(key, expected) != expected:
            problems.append(f"{key} = {cfg.get(key)!r} (expected {expected!r})")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_n_points", "decoder_n_points"),
                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if cfg.get(enc) != cfg.get(dec):
            problems.append(f"{enc} = {cfg.get(enc)} but {dec} = {cfg.get(dec)} (expected equal)")
    if problems:
        raise ValueError(f"{where} describes a model this package does not build: " + "; ".join(problems))
    two_stage = bool(cfg.get("two_stage", False))
    return dict(backbone=backbone, d_model=cfg["d_model"], n_heads=cfg["encoder_attention_heads"],
                enc_layers=cfg["encoder_layers"], dec_layers=cfg["decoder_layers"],
                dim_feedforward=cfg["encoder_ffn_dim"], n_levels=cfg["num_feature_levels"],
                n_points=cfg["encoder_n_points"], with_box_refine=bool(cfg.get("with_box_refine", False)),
                two_stage=two_stage,
                num_queries=cfg["two_stage_num_proposals"] if two_stage else cfg["num_queries"])


def class_names_from_config(cfg: dict) -> List[str] | None:
    """``id2label`` as a list indexed by label, or None when the config has none."""
    id2label = cfg.get("id2label")
    if not id2label:
        return None
    n = max(int(i) for i in id2label) + 1
    return [id2label.get(str(i), id2label.get(i, "N/A")) for i in range(n)]


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def hf_files(path: str) -> Tuple[str, str | None]:
    """``(weights file, config.json or None)`` for a folder or a weights file inside one."""
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"folder {path!r} holds none of {', '.join(WEIGHT_FILES)} "
                                    f"(found: {sorted(os.listdir(path))[:10]})")
    else:
        weights = path
    config = os.path.join(os.path.dirname(weights), CONFIG_FILE)
    return weights, config if os.path.isfile(config) else None


def read_config(path: str) -> dict:
    """The JSON config at ``path`` (a clear error when it is not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path!r} is not valid JSON ({err}); is the download complete?") from err


def read_safetensors(path: str) -> Dict[str, Tensor]:
    """Every tensor of a ``.safetensors`` file (the ``safetensors`` package is imported here only)."""
    try:
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError(f"reading {path!r} needs the safetensors package: pip install safetensors") from err
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own error type for a damaged header or a short file
        raise ValueError(f"could not read safetensors file {path!r} ({type(err).__name__}: {err}); "
                         "it is truncated or not a safetensors file: download it again") from err


def hf_key(key: str) -> str:
    """The Hugging Face name of one of our tensors (for error messages; older transformers naming)."""
    if key.startswith("backbone.body."):
        return "model.backbone.conv_encoder.model." + key[len("backbone.body."):]
    if key == "query_embed.weight":
        return "model.query_position_embeddings.weight"
    if key.startswith("input_proj."):
        return "model." + key
    m = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.([a-z0-9_]+)\.(.*)$", key)
    if m:
        kind, i, module, rest = m.groups()
        table = {v: k for k, v in (_ENCODER if kind == "encoder" else _DECODER).items()}
        return f"model.{kind}.layers.{i}.{table.get(module, module)}.{rest}"
    if key.startswith("transformer."):
        return "model." + key[len("transformer."):]
    return key
