"""Bound a pickle's nesting and size before any unpickler builds it.

Both unpicklers minseg uses (torch's weights_only one for .pth, SafeUnpickler for detectron2 .pkl) admit only
plain containers and arrays, so a hostile pickle cannot run code; it can still hurt with shape alone:
- depth: a tuple nested a million deep is built fine, then hashing it as a dict key (or printing or freeing it)
  recurses in C and crashes the process (a 2 MB file, segfault); a hundred thousand deep gives a RecursionError;
- size: memo references (GET) let each level hold the one below twice, so 1 KB describes a tuple of 2**100
  leaves ("billion laughs"): hashing it never ends, printing it never fits.

`check_pickle` reads the opcodes with pickletools and replays only their effect on the stack, each stack
item reduced to (depth, size): the nesting below it and the number of objects it expands to, memo
references counted again each time they are used. Nothing is built, so the check costs a pass over the
opcodes and a few integers per stack item. It stops at the first bound passed.
"""
from __future__ import annotations

import io
import os
import pickletools
import zipfile
from typing import BinaryIO

MAX_DEPTH = 100          # containers inside containers; a checkpoint needs ~6 (dict > dict > tuple > tuple)
MAX_NODES = 2_000_000    # objects the data expands to: fcn_resnet50's state dict is <10k, Mask R-CNN v2's with
                         # an optimizer state <30k
MAX_EXPANSION = 10       # a zip checkpoint's members may hold at most this times the file's size (+1 MB): torch
                         # stores them uncompressed; a deflated bomb would expand 1000-fold inside torch.load
MAX_PICKLES = 5          # a legacy (non-zip) torch file is five pickles in a row, then raw storage bytes

# opcodes that change their first stack argument in place (the container gains what follows it)
IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


class PickleBoundError(ValueError):
    """A pickle nests deeper or expands to more objects than any checkpoint does."""


class _Node:
    """What the check keeps of a stack item: its nesting depth and the number of objects it expands to.
    Mutable because a memoised list or dict grows after it is memoised (APPEND, SETITEM, BUILD)."""
    __slots__ = ("depth", "size")

    def __init__(self, depth: int = 1, size: int = 1):
        self.depth, self.size = depth, size


class _Bounded:
    """A read-only stream that refuses a read longer than what is left (a declared 4 GB string in a 1 KB file
    fails here instead of allocating)."""

    def __init__(self, f: BinaryIO, length: int):
        self.f, self.left = f, length

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        if n > self.left:
            raise PickleBoundError(f"declares {n:,} bytes where only {self.left:,} are left")
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        line = self.f.readline(min(self.left, 1 << 16))
        self.left -= len(line)
        return line


def _check_one(stream: _Bounded, where: str) -> None:
    """Replay one pickle (up to its STOP) on a stack of _Nodes; PickleBoundError when a bound is passed."""
    stack: list = []
    marks: list[int] = []   # stack heights at each open MARK
    memo: dict = {}

    def pop_to_mark() -> list:
        if not marks:
            raise ValueError("no MARK")
        height = marks.pop()
        items = stack[height:]
        del stack[height:]
        return items

    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "MARK":
            marks.append(len(stack))
            if len(marks) > MAX_DEPTH:
                raise PickleBoundError(f"{where}: pickle nests deeper than {MAX_DEPTH} levels")
            continue
        if name in ("PROTO", "FRAME", "STOP"):
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _Node()))
            continue
        if name == "DUP":
            stack.append(stack[-1])
            continue
        if name == "POP":
            if marks and marks[-1] == len(stack):
                marks.pop()
            else:
                stack.pop()
            continue
        if name == "POP_MARK":
            pop_to_mark()
            continue
        # everything else pops its arguments (a marked slice and/or fixed items) and pushes one result
        before = [s.name for s in opcode.stack_before]
        args: list = []
        if "mark" in before:
            args = pop_to_mark()
            fixed = before.index("mark")   # items below the mark (APPENDS' list, SETITEMS' dict)
        else:
            fixed = len(before)
        if fixed:
            if len(stack) < fixed:
                raise ValueError("stack underflow")
            args = stack[-fixed:] + args
            del stack[-fixed:]
        if not opcode.stack_after:
            continue
        if name in IN_PLACE:
            target, added = args[0], args[1:]
            target.depth = max([target.depth] + [a.depth + 1 for a in added])
            target.size += sum(a.size for a in added)
            result = target
        else:
            result = _Node(1 + max((a.depth for a in args), default=0), 1 + sum(a.size for a in args))
        if result.depth > MAX_DEPTH:
            raise PickleBoundError(f"{where}: pickle nests deeper than {MAX_DEPTH} levels")
        if result.size > MAX_NODES:
            raise PickleBoundError(f"{where}: pickle expands to more than {MAX_NODES:,} objects "
                                   "(repeated references to shared parts)")
        stack.append(result)


def check_pickle(f: BinaryIO, length: int, where: str, count: int = 1) -> None:
    """Check the pickle(s) at the stream's position: PickleBoundError naming `where` if one nests deeper than
    MAX_DEPTH or expands to more than MAX_NODES objects. Any other defect (a truncated file, an unknown opcode,
    data after the pickles) is left to the real unpickler to report, so this check never refuses a readable
    ordinary checkpoint. `count`: how many pickles follow each other (five in a legacy torch file)."""
    stream = _Bounded(f, length)
    for _ in range(count):
        if stream.left <= 0:
            return
        try:
            _check_one(stream, where)
        except PickleBoundError:
            raise
        except Exception:  # not (or no longer) a pickle: the unpickler says what is wrong
            return


def check_torch_file(path: str) -> None:
    """check_pickle on every pickle torch.load would read from `path`: each *.pkl member of a zip checkpoint
    (whose members together may not expand beyond MAX_EXPANSION times the file), or the leading pickles of a
    legacy file."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                expanded, size = sum(info.file_size for info in archive.infolist()), os.path.getsize(path)
                if expanded > MAX_EXPANSION * size + (1 << 20):
                    raise PickleBoundError(f"{path}: its archive members expand to {expanded:,} bytes from a "
                                           f"{size:,}-byte file (a compressed bomb?)")
                for info in archive.infolist():
                    if info.filename.endswith(".pkl"):
                        with archive.open(info) as member:
                            check_pickle(member, info.file_size, f"{path} ({info.filename})")
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError):
            return  # torch.load reports the broken archive
        return
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        length = f.tell()
        f.seek(0)
        check_pickle(f, length, path, count=MAX_PICKLES)
