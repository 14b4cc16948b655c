"""Official checkpoints in one call: fetch (http(s) or file://), verify the hash, convert, cache.

The cache is `$MINSEG_HOME` (default `~/.cache/minseg`); each model's converted weights live at
`<cache>/<arch>.safetensors`, beside `<arch>.json`, the record of what was downloaded (address, the
check made and how strong it is, the sha256 of the original file and of the converted one). A cached
file is used only when its sha256 still matches the record; otherwise it is downloaded again.
The manifest is `weights/manifest.json` in the repository (or `$MINSEG_MANIFEST`).

Every failure (no network, no answer within the timeout, a response cut short, a hash mismatch, a bad
manifest) raises `DownloadError` with one line naming the address and the manual route
(`minseg convert`). Work happens in `<cache>/.partial-<arch>-<pid>-*/`, removed on any error; one left by
a killed run is removed by the next download once its process is gone.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from minseg.convert import convert_with_overrides
from minseg.errors import CheckpointError, DownloadError
from minseg.weights import save_weights

MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.json"
TIMEOUT = 30.0  # seconds to connect, and to wait for each read; $MINSEG_DOWNLOAD_TIMEOUT overrides
PARTIAL = ".partial-"  # prefix of the work folders inside the cache
STALE_AFTER = 24 * 3600  # a work folder this old is stale even if its process id was reused


def cache_dir() -> Path:
    return Path(os.environ.get("MINSEG_HOME", Path.home() / ".cache" / "minseg"))


def manifest_entry(arch: str, manifest: str | os.PathLike | None = None) -> dict:
    """The manifest's entry for `arch`, checked: a direct address and a plain file name (no folders)."""
    path = Path(manifest or os.environ.get("MINSEG_MANIFEST", MANIFEST))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights manifest (set MINSEG_MANIFEST)")
    try:
        checkpoints = json.loads(path.read_text())["checkpoints"]
        entries = {e["arch"]: e for e in checkpoints}
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON weights manifest ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f'{path}: a manifest is {{"checkpoints": [{{"arch": ..., "url": ..., "file": ...}}, ...]}}') from None
    if arch not in entries:
        raise ValueError(f"no official checkpoint listed for {arch!r} in {path}; convert one by hand with `minseg convert`")
    entry = entries[arch]
    if not entry.get("url"):
        raise ValueError(f"{arch}: no direct download address ({entry.get('note') or 'see the manifest'}); "
                         f"download it by hand and run `minseg convert`")
    name = entry.get("file")
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise CheckpointError(f"{path}: {arch}: 'file' must be a plain file name, not {name!r}")
    return entry


def check_strength(entry: dict, sha256: str | None = None) -> str:
    """What the hash check of `entry` proves, in words (a short prefix catches corruption, not a forgery)."""
    if sha256:
        return "sha256 pinned by the user (full, 256 bits)"
    if entry.get("sha256"):
        return "sha256 from the manifest (full, 256 bits)"
    prefix, algorithm = entry.get("hash_prefix"), entry.get("hash")
    if not prefix:
        return "none: no published hash (pin one with --sha256)"
    bits = 4 * len(prefix)
    if bits < 64:
        return (f"{algorithm} prefix {prefix} ({bits} bits: catches a corrupt download, not a forged one; "
                f"pin the full sha256 with --sha256)")
    return f"{algorithm} prefix {prefix} ({bits} bits)"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _timeout() -> float:
    value = os.environ.get("MINSEG_DOWNLOAD_TIMEOUT")
    try:
        return float(value) if value else TIMEOUT
    except ValueError:
        raise ValueError(f"MINSEG_DOWNLOAD_TIMEOUT={value!r}: not a number of seconds") from None


def fetch(url: str, dst: Path, progress: bool = True, timeout: float | None = None) -> None:
    """Copy `url` to `dst` in chunks; a progress line on stderr when it is a terminal.

    `timeout` bounds the connection and every read (no answer for that long is an error). A body shorter
    than its Content-Length is an error (http.client returns it silently when read in chunks).
    """
    timeout = _timeout() if timeout is None else timeout
    progress = progress and sys.stderr.isatty()
    shown = False
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dst, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                if progress and total:
                    bar = "#" * int(30 * done / total)
                    sys.stderr.write(f"\r{Path(url).name}: [{bar:<30}] {done / 2**20:.1f}/{total / 2**20:.1f} MB")
                    shown = True
            if total and done != total:
                raise http.client.IncompleteRead(b"", total - done)
    except http.client.IncompleteRead as e:
        raise DownloadError(f"{url}: the connection closed early ({_received(e)})") from None
    except TimeoutError:
        raise DownloadError(f"{url}: no answer within {timeout:g} s") from None
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = f"no answer within {timeout:g} s" if isinstance(e.reason, TimeoutError) else e.reason
        raise DownloadError(f"{url}: {reason}") from None
    except (http.client.HTTPException, OSError) as e:
        raise DownloadError(f"{url}: {type(e).__name__}: {e}") from None
    finally:
        if shown:
            sys.stderr.write("\n")  # an error message then starts on its own line


def _received(e: http.client.IncompleteRead) -> str:
    return f"{e.expected} bytes missing" if e.expected is not None else f"{len(e.partial)} bytes received"


def verify(path: Path, entry: dict, sha256: str | None = None) -> str:
    """Check `path` against the user's pin, the manifest's full sha256 or the name's hash prefix; its sha256.

    Raises CheckpointError on a mismatch.
    """
    digest = file_sha256(path)
    if sha256:
        algorithm, expected, actual = "sha256", sha256, digest
    elif entry.get("sha256"):
        algorithm, expected, actual = "sha256", entry["sha256"].lower(), digest
    elif entry.get("hash_prefix"):
        algorithm, expected = entry["hash"], entry["hash_prefix"].lower()
        actual = digest if algorithm == "sha256" else _hash(path, algorithm)
    else:
        return digest
    matches = actual.startswith(expected) if len(expected) < len(actual) else actual == expected
    if not matches:
        raise CheckpointError(f"{entry['file']}: {algorithm} {actual[:16]}... does not match the expected {expected}")
    return digest


def _hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cached_record(arch: str) -> dict | None:
    """The record of `arch`'s cached weights when the file still matches it (sha256), else None."""
    target, record_path = cache_dir() / f"{arch}.safetensors", cache_dir() / f"{arch}.json"
    if not (target.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(record, dict) or record.get("safetensors_sha256") != file_sha256(target):
        return None  # corrupt or replaced: not downloaded
    return record


def remove_stale_partials(cache: Path) -> None:
    """Remove work folders left by killed downloads: their process is gone, or they are a day old."""
    if not cache.is_dir():
        return
    for folder in cache.glob(PARTIAL + "*"):
        match = re.match(re.escape(PARTIAL) + r".*-(\d+)-[^-]*$", folder.name)
        try:
            old = time.time() - folder.stat().st_mtime > STALE_AFTER
        except OSError:
            continue
        if match is None or old or not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process
    return True


def _pinned(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"--sha256 {sha256!r}: a full sha256 is 64 hexadecimal digits")
    return sha256.lower()


def download(arch: str, *, manifest: str | os.PathLike | None = None, progress: bool = True, force: bool = False,
             sha256: str | None = None, timeout: float | None = None) -> Path:
    """Path of `arch`'s converted official weights, downloading, verifying and converting them on first use.

    `sha256` pins the full hash of the original file (64 hex digits); a cached file made from another
    download is replaced. Raises DownloadError (a CheckpointError) when the file cannot be fetched or
    does not match, and leaves nothing in the cache then.
    """
    sha256 = _pinned(sha256)
    cache = cache_dir()
    target, record_path = cache / f"{arch}.safetensors", cache / f"{arch}.json"
    record = None if force else cached_record(arch)
    if record is not None and (sha256 is None or record.get("source_sha256") == sha256):
        return target
    entry = manifest_entry(arch, manifest)
    url = entry["url"]
    manual = f"download it by hand and run `minseg convert --from {entry.get('source')} --arch {arch} FILE OUT.safetensors`"
    created = _missing_folders(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(cache)
        with tempfile.TemporaryDirectory(prefix=f"{PARTIAL}{arch}-{os.getpid()}-", dir=cache) as tmp:
            original = Path(tmp) / entry["file"]
            fetch(url, original, progress, timeout)
            try:
                source_sha256 = verify(original, entry, sha256)
            except CheckpointError as e:
                raise DownloadError(f"{url}: {e}") from None
            state, overrides = convert_with_overrides(entry["source"], original, arch=arch)
            converted = Path(tmp) / target.name
            save_weights(state, converted, arch=arch, source=entry["source"], overrides=overrides)
            record = {"arch": arch, "url": url, "file": entry["file"], "check": check_strength(entry, sha256),
                      "source_sha256": source_sha256, "safetensors_sha256": file_sha256(converted)}
            (Path(tmp) / record_path.name).write_text(json.dumps(record, indent=1) + "\n")
            with _locked(cache / f".{arch}.lock"):  # a concurrent download of the same arch: one pair wins whole
                os.replace(converted, target)
                os.replace(Path(tmp) / record_path.name, record_path)  # last: the pair is valid only from here
    except DownloadError as e:
        _remove_empty(created)
        raise DownloadError(f"{e}; {manual}") from None
    except OSError as e:  # the cache folder itself: not writable, disk full, ...
        _remove_empty(created)
        raise DownloadError(f"{cache}: {e.strerror or e}; {manual}") from None
    except BaseException:
        _remove_empty(created)
        raise
    return target


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (POSIX flock; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
