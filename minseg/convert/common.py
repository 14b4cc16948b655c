"""What every converter shares: reading a checkpoint safely, ordered rename rules, named drops, validation.

A converter is a list of (pattern, replacement) regex rules applied in order to each key (first match
wins, like DETR's converter) plus a list of (pattern, reason) drops. Every source key must be renamed or
dropped by a named rule; the result must match the target model's keys and shapes exactly.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from minseg.convert.pickle_bounds import PickleBoundError, check_torch_file
from minseg.errors import CheckpointError
from minseg.registry import build_model
from minseg.weights import describe_mismatch, group_keys

Rule = tuple[str, str]     # (regex, replacement)
Drop = tuple[str, str]     # (regex, reason)


def read_torch_checkpoint(path: str | os.PathLike) -> object:
    """torch.load(weights_only=True) of a .pth/.pt file (zip or legacy format; torch.load hands a .safetensors
    path to safetensors); CheckpointError on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    try:
        check_torch_file(str(path))  # nesting and size bounded before the unpickler builds anything
    except PickleBoundError as e:
        raise CheckpointError(f"{e}; not loaded") from None
    try:
        with warnings.catch_warnings():  # torch warns on protocol 4/5 pickles: the load either works or says why
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise CheckpointError(f"{path}: refused to load (not a plain tensor checkpoint: {first})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError,
            KeyError, IndexError, ImportError, UnicodeDecodeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    unusual = tensors_without_values(loaded)
    if unusual:  # a file's meta tensors have a shape but no values (saving them fails); sparse/quantized aren't weights
        raise CheckpointError(f"{path}: tensors without plain values (meta device or a non-strided layout): "
                              f"{group_keys(unusual)}")
    return loaded


def tensors_without_values(obj: object, prefix: str = "") -> list[str]:
    """Names of the meta-device or non-strided tensors in a loaded checkpoint (dicts and lists walked)."""
    if isinstance(obj, torch.Tensor):
        return [prefix or "tensor"] if obj.is_meta or obj.layout != torch.strided else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [name for k, v in items for name in tensors_without_values(v, f"{prefix}.{short(k)}" if prefix else short(k))]


def as_state_dict(obj: object, where: str, nested: tuple[str, ...] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """The flat {name: tensor} inside a loaded checkpoint (a plain state dict, or one under 'state_dict'/'model')."""
    if isinstance(obj, dict):
        for key in nested:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{where}: not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where}: not a state dict; non-tensor entries: {group_keys([short(k) for k in bad])}")
    return dict(obj)


def short(obj: object, limit: int = 60) -> str:
    """str(obj) cut to `limit` characters, for naming a stray key of unknown size in a one-line message."""
    text = obj if isinstance(obj, str) else repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def load_source(checkpoint: str | os.PathLike | dict, reader=read_torch_checkpoint) -> tuple[dict, str]:
    """(state dict, description) from a path or an in-memory dict."""
    if isinstance(checkpoint, dict):
        return as_state_dict(checkpoint, "state dict"), "state dict"
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    return as_state_dict(reader(checkpoint), str(checkpoint)), str(checkpoint)


def rename(state: dict[str, torch.Tensor], rules: list[Rule], drops: list[Drop], where: str) -> dict[str, torch.Tensor]:
    """Apply named drops, then the first matching rename rule, to every key. Unmatched keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state.items():
        if any(re.fullmatch(pattern, key) for pattern, _ in drops):
            continue
        for pattern, replacement in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(f"^{pattern}$", replacement, key)] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise CheckpointError(f"{where}: keys no rule accounts for (wrong architecture?): {group_keys(unmatched)}")
    return out


def validate(state: dict[str, torch.Tensor], arch: str, where: str, **overrides) -> dict[str, torch.Tensor]:
    """Check `state` against model `arch` with `overrides` built on the meta device (keys, shapes); cast dtypes.
    The overrides come from the checkpoint's shapes (e.g. num_classes), so a value the model refuses is the file's."""
    try:
        with torch.device("meta"):
            expected = build_model(arch, **overrides).state_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    problems = describe_mismatch(expected, state)
    if problems:
        raise CheckpointError(f"{where}: does not convert to {arch}: {problems}")
    bad_dtype = [k for k, v in state.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"{where}: wrong dtype (float vs integer) for {group_keys(bad_dtype)}")
    return {k: state[k].to(expected[k].dtype) for k in expected}  # the model's key order and dtypes
