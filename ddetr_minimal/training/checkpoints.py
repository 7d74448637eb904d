"""Trained toy detectors kept in the repository: ``load_trained(name)``.

The repeated convergence experiment (:mod:`ddetr_minimal.training.repeated`) keeps, for one seed, the
final weights of DETR, Deformable DETR and its variants, and DETR and Deformable DETR at 0, 10,
50 and 100 % of their training. Each file holds the weights in half precision (a toy detector
is well under 3 MB) and the hyper-parameters that rebuild the model; ``manifest.json`` beside
them lists every file with its run, epoch, AP, command and commit::

    from ddetr_minimal.training.checkpoints import load_trained, list_trained
    model, postprocessor, info = load_trained("deformable_s0_e010")

A file whose weights do not fit the model its hyper-parameters build raises a ``ValueError``
naming the file and the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from ..measure.records import RESULTS_URL, save_atomic, write_json

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "checkpoints"
# where they live online, for an installed package without the repository's data (as in Colab)
CHECKPOINTS_URL = RESULTS_URL.replace("/data/results/", "/data/checkpoints/")
MANIFEST = "manifest.json"
# the hyper-parameters a checkpoint keeps: what build_model_from_args reads
MODEL_ARGS = ("model", "backbone", "pretrained_backbone", "with_box_refine", "two_stage", "d_model", "n_heads",
              "enc_layers", "dec_layers", "dim_feedforward", "dropout", "num_queries", "n_points", "n_levels",
              "aux_loss", "detr_focal")


def write_trained(path, state: dict, args: dict, class_names, info: dict) -> None:
    """Write ``state`` (a model state dict; floats stored in half precision) with the model's
    hyper-parameters ``args`` (only :data:`MODEL_ARGS` are kept), its class names and ``info``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    half = {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}
    save_atomic({"model": half, "args": {k: args[k] for k in MODEL_ARGS if k in args},
                 "class_names": list(class_names), "info": dict(info)}, Path(path))


def cache_dir() -> Path:
    """Where checkpoints fetched online are kept: ``$DDETR_MINIMAL_CACHE/checkpoints``, by default
    under ``~/.cache/ddetr_minimal``."""
    base = os.environ.get("DDETR_MINIMAL_CACHE") or Path.home() / ".cache" / "ddetr_minimal"
    return Path(base) / "checkpoints"


def _local(root, file: str, online) -> Path:
    """``root/file``; when it is missing, ``root`` is the repository's folder and ``online``
    (default: only in Colab) holds, the copy fetched once from :data:`CHECKPOINTS_URL` into
    :func:`cache_dir` (a missing path when the fetch fails)."""
    path = Path(root) / file
    if path.is_file() or Path(root) != DEFAULT_DIR:
        return path
    if online is None:
        online = "google.colab" in sys.modules
    cached = cache_dir() / file
    if online and not cached.is_file():
        import urllib.request

        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".tmp")
        try:
            with urllib.request.urlopen(CHECKPOINTS_URL + file, timeout=60) as response:
                tmp.write_bytes(response.read())
            os.replace(tmp, cached)
        except OSError:
            tmp.unlink(missing_ok=True)
    return cached if cached.is_file() else path


def read_manifest(root=DEFAULT_DIR, online=None) -> dict:
    """``{name: entry}`` of ``root/manifest.json`` (empty when there is none). Without the
    repository's ``data/`` (an installed package), in Colab or with ``online=True``, the
    manifest of the published repository."""
    path = _local(root, MANIFEST, online)
    return json.loads(path.read_text())["checkpoints"] if path.is_file() else {}


def write_manifest(root, entries: dict, provenance: dict) -> None:
    write_json(Path(root) / MANIFEST, {**provenance, "note": "weights in half precision; AP is a fraction "
                                       "in [0, 1], None where that epoch was not evaluated",
                                       "checkpoints": dict(sorted(entries.items()))})


def list_trained(root=DEFAULT_DIR) -> list[str]:
    """The names :func:`load_trained` accepts."""
    return sorted(read_manifest(root))


def mismatched_keys(model: torch.nn.Module, state: dict) -> dict:
    """``{"missing": [...], "unexpected": [...], "shape": {key: (file, model)}}`` of ``state``
    against ``model``'s state dict (all empty when it fits)."""
    own = model.state_dict()
    return {"missing": sorted(set(own) - set(state)), "unexpected": sorted(set(state) - set(own)),
            "shape": {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(set(own) & set(state))
                      if tuple(state[k].shape) != tuple(own[k].shape)}}


def load_file(path, device="cpu"):
    """``(model, postprocessor, info)`` from one checkpoint file, the model in float32 and eval mode."""
    from .train import build_model_from_args

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"model", "args", "class_names"} <= set(ckpt):
        raise ValueError(f"{path} is not a trained checkpoint (expected the keys model, args, class_names)")
    args = SimpleNamespace(**{"n_levels": 4, "aux_loss": True, "detr_focal": False, "with_box_refine": False,
                              "two_stage": False, "pretrained_backbone": False, **ckpt["args"]})
    model, _, postprocessor = build_model_from_args(args, len(ckpt["class_names"]))
    bad = mismatched_keys(model, ckpt["model"])
    if any(bad.values()):
        parts = [f"{what} keys {keys}" for what, keys in (("missing", bad["missing"]), ("unexpected", bad["unexpected"]))
                 if keys]
        parts += [f"key {k} has shape {f} in the file but {m} in the model" for k, (f, m) in bad["shape"].items()]
        raise ValueError(f"checkpoint {path} does not fit the {args.model} model its hyper-parameters build: "
                         + "; ".join(parts))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    model.to(device).eval()
    return model, postprocessor, {"file": str(path), "class_names": ckpt["class_names"], "args": ckpt["args"],
                                  **ckpt.get("info", {})}


def load_trained(name: str, root=DEFAULT_DIR, device="cpu", online=None):
    """``(model, postprocessor, info)`` of the trained checkpoint ``name`` (see :func:`list_trained`),
    e.g. ``"detr_s0_e100"``; ``info`` holds its manifest entry (run, epoch, AP, command, commit).
    ``online``: see :func:`read_manifest` (the file is fetched once into :func:`cache_dir`)."""
    entries = read_manifest(root, online)
    if name not in entries:
        raise KeyError(f"no trained checkpoint named {name!r} in {root}; available: {sorted(entries) or 'none'}")
    model, post, info = load_file(_local(root, entries[name]["file"], online), device)
    return model, post, {**info, **entries[name], "name": name}


def snapshots(group: str, seed: int = 0, root=DEFAULT_DIR) -> list[str]:
    """The names of the checkpoints of ``group`` (e.g. ``"detr"``) and ``seed`` in the manifest,
    in the order of their epochs (the last is the end of training)."""
    entries = read_manifest(root)
    names = [n for n, e in entries.items() if e.get("group") == group and e.get("seed") == seed]
    if not names:
        groups = sorted({(e.get("group"), e.get("seed")) for e in entries.values()})
        raise KeyError(f"no checkpoint of group {group!r} and seed {seed!r} in {root}; there are (group, seed) "
                       f"{groups or 'none'}")
    return sorted(names, key=lambda n: entries[n]["epoch"])


def final_checkpoint(group: str, seed: int = 0, root=DEFAULT_DIR) -> str:
    """The name of the last-epoch checkpoint of ``group`` and ``seed`` (see :func:`snapshots`)."""
    return snapshots(group, seed, root)[-1]
