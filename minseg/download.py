"""Official checkpoints in one call: fetch (http(s) or file://), verify the hash, convert, cache.

The cache is `$MINSEG_HOME` (default `~/.cache/minseg`); each model's converted weights live at
`<cache>/<arch>.safetensors`. The manifest is `weights/manifest.json` in the repository (or `$MINSEG_MANIFEST`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

from minseg.convert import convert_with_overrides
from minseg.errors import CheckpointError
from minseg.weights import save_weights

MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.json"


def cache_dir() -> Path:
    return Path(os.environ.get("MINSEG_HOME", Path.home() / ".cache" / "minseg"))


def manifest_entry(arch: str, manifest: str | os.PathLike | None = None) -> dict:
    path = Path(manifest or os.environ.get("MINSEG_MANIFEST", MANIFEST))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights manifest (set MINSEG_MANIFEST)")
    entries = {e["arch"]: e for e in json.loads(path.read_text())["checkpoints"]}
    if arch not in entries:
        raise ValueError(f"no official checkpoint listed for {arch!r} in {path}")
    entry = entries[arch]
    if not entry.get("url"):
        raise ValueError(f"{arch}: no direct download address ({entry.get('note') or 'see the manifest'}); "
                         f"download it by hand and run `minseg convert`")
    return entry


def fetch(url: str, dst: Path, progress: bool = True) -> None:
    """Copy `url` to `dst` in chunks, with a progress bar on stderr."""
    with urllib.request.urlopen(url) as response, open(dst, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        while chunk := response.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            if progress and total:
                bar = "#" * int(30 * done / total)
                sys.stderr.write(f"\r{Path(url).name}: [{bar:<30}] {done / 2**20:.1f}/{total / 2**20:.1f} MB")
        if progress and total:
            sys.stderr.write("\n")


def verify(path: Path, entry: dict) -> None:
    """Full sha256 where the manifest has one (`sha256`), else the name's hash prefix (`hash`, `hash_prefix`)."""
    if entry.get("sha256"):
        algorithm, expected = "sha256", entry["sha256"]
    elif entry.get("hash_prefix"):
        algorithm, expected = entry["hash"], entry["hash_prefix"]
    else:
        return
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if not h.hexdigest().startswith(expected):
        raise CheckpointError(f"{entry['file']}: {algorithm} {h.hexdigest()[:16]}... does not match the published {expected}")


def download(arch: str, *, manifest: str | os.PathLike | None = None, progress: bool = True, force: bool = False) -> Path:
    """Path of `arch`'s converted official weights, downloading, verifying and converting them on first use."""
    target = cache_dir() / f"{arch}.safetensors"
    if target.is_file() and not force:
        return target
    entry = manifest_entry(arch, manifest)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        original = Path(tmp) / entry["file"]
        fetch(entry["url"], original, progress)
        verify(original, entry)  # a corrupt or mismatching download is refused; the temp dir removes it
        state, overrides = convert_with_overrides(entry["source"], original, arch=arch)
        save_weights(state, target, arch=arch, source=entry["source"], overrides=overrides)
    return target
