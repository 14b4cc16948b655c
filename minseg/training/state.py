"""A run's files in --out, written together and atomically, and the model a run starts from.

    last.safetensors  the model's state dict with minseg metadata (arch, overrides): create_model(NAME, weights=...)
    state.pt          what a resumed run needs besides the weights: step, total steps, optimiser, grad scaler, the run's
                      settings, and each rank's torch RNG states (the data order and augmentation are functions
                      of the seed and the step, so they need no state). Read back with torch.load(weights_only=True).
    log.jsonl         a line per logged step;  loss.png  the loss curves
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from minseg import registry
from minseg.errors import CheckpointError
from minseg.files import OutputBatch
from minseg.training.log import jsonl, loss_plot
from minseg.weights import VERSION, describe_mismatch, load_into, load_weights, read_overrides

RUN_FILES = ("last.safetensors", "state.pt", "log.jsonl", "loss.png")


def start_model(name: str, weights: str | None, num_classes: int | None, overrides: dict
                ) -> tuple[torch.nn.Module, dict]:
    """The model a fresh run starts from, and the create_model overrides that rebuild it.

    Without weights: random init with `overrides` (+ num_classes). With weights (a minseg .safetensors or
    "official"): the file's recorded overrides, then `overrides`; a num_classes different from the file's
    re-initialises exactly the tensors whose shape depends on it (the class-specific layers; the rest must match
    the file key for key and shape for shape) and says which on stderr."""
    if weights is None:
        built = {**overrides, **({"num_classes": num_classes} if num_classes else {})}
        return registry.build_model(name, **built), built
    if weights == "official":
        from minseg.download import download

        weights = str(download(name))
    state, meta = load_weights(weights)
    if meta["arch"] != name:
        raise CheckpointError(f"{weights}: weights are for {meta['arch']!r}, not {name!r}")
    recorded = read_overrides(meta, weights)
    built = {**recorded, **overrides}
    trained = registry.model_config(name, **built).num_classes
    if num_classes is None or num_classes == trained:
        model = registry.build_model(name, **built)
        load_into(model, state, what=str(weights))
        return model, built
    built["num_classes"] = num_classes
    model = registry.build_model(name, **built)
    fresh = model.state_dict()
    mismatched = sorted(k for k in fresh if k in state and state[k].shape != fresh[k].shape)
    kept = {k: v for k, v in state.items() if k not in mismatched}
    problems = describe_mismatch({k: v for k, v in fresh.items() if k not in mismatched}, kept)
    if problems:
        raise CheckpointError(f"{weights} does not fit {name} with num_classes={num_classes}: {problems}")
    model.load_state_dict({**fresh, **kept}, strict=True)
    layers = sorted({k.rpartition(".")[0] for k in mismatched})
    print(f"minseg train: --num-classes {num_classes} differs from the weights' {trained}: re-initialised "
          f"{', '.join(layers)} (random init); every other tensor comes from {weights}", file=sys.stderr)
    return model, built


def save_run(out: Path, model: torch.nn.Module, name: str, overrides: dict, state: dict, log: list[dict]) -> None:
    """Write the four run files, all or none (each to a temp file, renamed into place together)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"arch": name, "source": "minseg train", "minseg_version": VERSION, "overrides": json.dumps(overrides)}
    weights = save(tensors, metadata=meta)
    with OutputBatch() as batch:
        batch.add(out / "last.safetensors", lambda tmp: Path(tmp).write_bytes(weights))
        batch.add(out / "state.pt", lambda tmp: torch.save(state, tmp))
        batch.add(out / "log.jsonl", lambda tmp: Path(tmp).write_bytes(jsonl(log)))
        batch.add(out / "loss.png", lambda tmp: Path(tmp).write_bytes(loss_plot(log)))


def load_run(out: Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(state.pt, the weights of last.safetensors, log.jsonl's text) of a saved run; CheckpointError if absent."""
    for f in ("last.safetensors", "state.pt"):
        if not (out / f).is_file():
            raise CheckpointError(f"{out / f}: no such file; --resume needs a run saved in --out")
    try:
        state = torch.load(out / "state.pt", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"{out / 'state.pt'}: not a minseg training state ({e})") from None
    weights, _ = load_weights(out / "last.safetensors")
    log = (out / "log.jsonl").read_text() if (out / "log.jsonl").is_file() else ""
    return state, weights, log


def restore_model(name: str, overrides: dict, weights: dict[str, torch.Tensor], out: Path) -> torch.nn.Module:
    model = registry.build_model(name, **overrides)
    load_into(model, weights, what=str(out / "last.safetensors"))
    return model
