"""minseg's own weight files: safetensors with metadata (arch, source, minseg_version, overrides)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minseg.errors import CheckpointError
from minseg.files import atomic_write

VERSION = "0.1.0"


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike, *, arch: str, source: str,
                 overrides: dict | None = None) -> None:
    """Write a converted state dict as .safetensors, atomically, with arch/source/version metadata."""
    from safetensors.torch import save

    meta = {"arch": arch, "source": source, "minseg_version": VERSION, "overrides": json.dumps(overrides or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    data = save(tensors, metadata=meta)  # in memory: safetensors' save_file leaves its own temp file when killed
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of a minseg .safetensors file; CheckpointError if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    if "arch" not in meta:
        raise CheckpointError(f"{path}: safetensors file has no minseg metadata (convert it with `minseg convert`)")
    return state, meta


MAX_OVERRIDES_CHARS = 4096  # the overrides a converter records are a few numbers and names


def read_overrides(meta: dict[str, str], path: str | os.PathLike) -> dict:
    """The create_model overrides recorded in a weight file's metadata (a JSON object of option names), as a dict;
    CheckpointError naming the file when they are not one. Their values are checked by the model's config."""
    text = meta.get("overrides") or "{}"
    if len(text) > MAX_OVERRIDES_CHARS:
        raise CheckpointError(f"{path}: metadata 'overrides' is {len(text)} characters long "
                              f"(at most {MAX_OVERRIDES_CHARS})")
    try:
        overrides = json.loads(text)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: metadata 'overrides' is not valid JSON: {text[:40]!r}") from None
    if not isinstance(overrides, dict):
        raise CheckpointError(f"{path}: metadata 'overrides' must be a JSON object of options, "
                              f"got {type(overrides).__name__}")
    return overrides


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """load_state_dict(strict=True), turning every mismatch into one CheckpointError that lists the keys, grouped."""
    problems = describe_mismatch(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{what} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state, strict=True)


def describe_mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """'' when `got` has exactly the keys and shapes of `expected`; otherwise a readable summary."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shapes = [f"{k} expects {tuple(expected[k].shape)} but got {tuple(got[k].shape)}"
              for k in expected if k in got and expected[k].shape != got[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {group_keys(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected keys: {group_keys(extra)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
    return "; ".join(parts)


def group_keys(keys: list[str], limit: int = 12) -> str:
    """Group keys by their prefix before the last dot: 'a.b.{weight,bias}, c.d.weight'."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        head, _, tail = k.rpartition(".")
        groups.setdefault(head, []).append(tail)
    items = [f"{h}.{{{','.join(t)}}}" if len(t) > 1 else (f"{h}.{t[0]}" if h else t[0]) for h, t in groups.items()]
    return ", ".join(items[:limit]) + (f" ... (+{len(items) - limit} more groups)" if len(items) > limit else "")
