"""Writing output files: atomically, with the permissions a user expects, never over an input, nothing left behind.

Every file minseg writes goes first to a temp file beside its target and is renamed onto it when complete, so a
reader never sees half a file and a failed run leaves the old one as it was. The temp file is created with mode
0666 less the umask (mkstemp's 0600 would make every output private); an output that already exists keeps its
mode. Its name is short and independent of the target's (`.minseg-<pid>-<random>.tmp`), so a legal 255-byte
output name still fits, and recognisable: a temp file left by a killed process (kill -9 runs no cleanup) is
removed by the next write into that folder once its process is gone.
"""
from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path
from typing import Callable

TEMP_PREFIX = ".minseg-"
TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 600  # a dead process's temp file older than this is removed (younger: maybe another host's)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: Path) -> None:
    """Delete `.minseg-<pid>-*.tmp` files in `folder` whose process no longer runs and that are STALE_AFTER_S old."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
            continue
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or _pid_alive(int(pid)) or now - entry.stat().st_mtime < STALE_AFTER_S:
                continue
            os.unlink(entry.path)
        except OSError:
            continue


def _new_temp(folder: Path) -> Path:
    """An empty temp file in `folder`, created with mode 0666 less the umask (as open() would)."""
    while True:
        tmp = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_temp(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp) on a fresh temp file beside `path` and return it, complete; removed if write fails.
    The temp file gets the mode of an existing `path` (an existing 0644 output stays 0644)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    remove_stale_temps(folder)
    tmp = _new_temp(folder)
    try:
        write(str(tmp))
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then rename the complete file onto `path`; nothing is left behind on failure."""
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (one path spelled twice, through a symlink, or a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def plan_outputs(planned: list[tuple[Path, list[Path]]], inputs: list[Path]) -> None:
    """Check a run's outputs before anything is written: `planned` pairs each input with the files it will
    produce. ValueError if an output would replace any input of the run (so a later step would read the
    replacement), or if two inputs would write the same output (d1/x.png and d2/x.png, or one file given twice).
    """
    writer: dict[Path, Path] = {}
    for source, outputs in planned:
        for out in outputs:
            for given in inputs:
                if same_file(out, given):
                    raise ValueError(f"{out}: would replace the input {given}; choose another output folder")
            key = out.resolve()
            if key in writer:
                raise ValueError(f"{writer[key]} and {source} would both write {out}: give them different names "
                                 "or run them separately")
            writer[key] = source


class OutputBatch:
    """All-or-nothing outputs of one run: `add` writes each to its temp file; leaving the `with` block without an
    error renames them all into place, an error (or Ctrl-C) removes them all, so a run that fails halfway writes
    nothing.

        with OutputBatch() as batch:
            for ...:
                batch.add(path, lambda tmp: picture.save(tmp))
    """

    def __init__(self):
        self.staged: list[tuple[Path, Path]] = []  # (temp, target)

    def add(self, path: str | os.PathLike, write: Callable[[str], None]) -> None:
        self.staged.append((write_temp(path, write), Path(path)))

    def __enter__(self) -> "OutputBatch":
        return self

    def __exit__(self, kind, error, tb) -> None:
        done = 0
        try:
            if kind is None:
                for tmp, target in self.staged:
                    os.replace(tmp, target)
                    done += 1
        finally:
            for tmp, _ in self.staged[done:]:
                tmp.unlink(missing_ok=True)

    @property
    def paths(self) -> list[Path]:
        return [target for _, target in self.staged]
