"""detectron2 checkpoints (model-zoo `.pkl`, or `.pth` from its trainer) -> minseg Panoptic FPN.

A model-zoo `.pkl` (e.g. COCO-PanopticSegmentation/panoptic_fpn_R_50_3x/139514569/model_final_c10459.pkl) is a plain
pickle of {"model": {name: numpy float32 array}, "__author__": "Detectron2 Model Zoo"}. detectron2 reads it with
pickle.load, which would run any code a tampered file carries; here it goes through an unpickler that can only
rebuild numpy arrays, dtypes and plain containers (SafeUnpickler) and refuses everything else. `.pth` files are
{"model": state_dict, ...} read with torch.load(weights_only=True).

detectron2's own names are renamed into minseg's by the ordered rules below (first match wins); every other key is
an error unless a named drop accounts for it.
"""
from __future__ import annotations

import collections
import codecs
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from minseg.convert.common import Drop, Rule, as_state_dict, read_torch_checkpoint, rename, short, validate
from minseg.convert.pickle_bounds import PickleBoundError, check_pickle
from minseg.errors import CheckpointError
from minseg.weights import group_keys

# ---------------------------------------------------------------------------------------------------- reading

NUMERIC_KINDS = "biufc"  # bool, int, uint, float, complex: no objects, strings, records or sub-arrays


def _dtype(*args) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"dtype {dtype} is not allowed (only plain numeric dtypes)")
    return dtype


class _NdarrayType:
    """Stands for numpy.ndarray in a pickle: _reconstruct's first argument, and nothing callable (a pickle calling
    numpy.ndarray itself could ask for any dtype or size)."""


def _reconstruct(subtype, shape, dtype_code) -> np.ndarray:
    # the empty array numpy's pickle protocol fills through ndarray.__setstate__ (numpy/_core/multiarray._reconstruct);
    # numpy always pickles shape (0,): the data comes with BUILD, checked there
    if subtype is not _NdarrayType:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    if shape not in ((0,), [0], 0):
        raise pickle.UnpicklingError(f"unexpected array reconstruction shape {shape!r}")
    return np.ndarray.__new__(np.ndarray, (0,), _dtype(dtype_code))


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:
    # pickle protocol 5 form of an array (numpy/_core/numeric._frombuffer)
    array = np.frombuffer(bytes(buffer), dtype=_dtype(dtype))
    return array.reshape(shape, order=order if order in ("C", "F") else "C").copy()


def _latin1_encode(text, encoding="utf-8") -> bytes:
    # protocol-2 pickles spell raw bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin1 byte strings are allowed")
    return codecs.encode(text, "latin1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # numpy 1.x spelling
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x spelling
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}

BYTE_ORDERS = ("<", ">", "|", "=")


def _check_dtype_state(dtype: np.dtype, state) -> None:
    """A dtype's BUILD state may set its byte order only: anything else (numpy's flags, fields, sizes) must be what
    numpy itself pickles for this dtype. Crafted flags otherwise make numpy raise SystemError, or turn a float dtype
    object-capable (flag 0x01) after the object check."""
    expected = dtype.__reduce__()[2]
    if (not isinstance(state, tuple) or len(state) != len(expected) or state[1] not in BYTE_ORDERS
            or state[:1] + state[2:] != expected[:1] + expected[2:]):
        raise pickle.UnpicklingError(f"dtype state {short(state)} is not numpy's own for {dtype}")


def _check_array_state(state) -> None:
    """An ndarray's BUILD state: (version, shape, dtype, fortran_order, raw bytes) with a dtype built by _dtype and
    as many bytes as the shape needs."""
    if not (isinstance(state, tuple) and len(state) == 5):
        raise pickle.UnpicklingError("array state is not numpy's (version, shape, dtype, order, data)")
    _, shape, dtype, _, data = state
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise pickle.UnpicklingError(f"array dtype {short(dtype)} is not allowed")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"array shape {short(shape)} is not a tuple of sizes")
    if not isinstance(data, (bytes, bytearray)) or len(data) != math.prod(shape) * dtype.itemsize:
        raise pickle.UnpicklingError(f"array data does not hold {short(shape)} {dtype} values")


class SafeUnpickler(pickle._Unpickler):
    """Unpickler whose only globals are numpy array reconstruction, dtypes, OrderedDict and latin1 bytes, and whose
    BUILD (an object's __setstate__) reaches only arrays and dtypes, with their states checked first. The Python
    unpickler (pickle._Unpickler), not the C one, so that BUILD can be checked; a checkpoint has few opcodes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{short(module)}.{short(name)}' is not allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")

    def load_build(self):
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.dtype):
            _check_dtype_state(target, state)
        elif type(target) is np.ndarray:
            _check_array_state(state)
        else:
            raise pickle.UnpicklingError(f"setting the state of a {type(target).__name__} is not allowed")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def read_pkl(path: str | os.PathLike) -> dict:
    """A detectron2 model-zoo .pkl -> {"model": {name: ndarray}, "__author__": ...}; CheckpointError on anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            check_pickle(f, path.stat().st_size, str(path))  # nesting and size bounded before anything is built
            f.seek(0)
            data = SafeUnpickler(f, encoding="latin1").load()  # latin1: detectron2's own choice, for Python-2 pickles
    except PickleBoundError as e:
        raise CheckpointError(f"{e}; not loaded") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, MemoryError,
            UnicodeDecodeError, ImportError, SystemError, RecursionError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable pickle ({type(e).__name__}: {short(str(e), 200)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a detectron2 checkpoint (a pickled {type(data).__name__})")
    if "__author__" not in data or "model" not in data:
        found = ", ".join(sorted(short(k) for k in data)[:8])
        raise CheckpointError(f"{path}: not a detectron2 model-zoo file (no 'model'/'__author__'; found {found}); "
                              "Caffe2/Detectron1 .pkl files are not supported")
    return data


def read_checkpoint(path: str | os.PathLike) -> dict:
    """.pkl through SafeUnpickler; anything else (.pth, zip) through torch.load(weights_only=True)."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path) and path.suffix.lower() in (".pkl", ".pickle"):
        return read_pkl(path)
    return read_torch_checkpoint(path)


def to_tensors(obj: object, where: str) -> object:
    """The checkpoint with its {"model": {name: ndarray}} turned into tensors (other containers left as they are)."""
    if not isinstance(obj, dict):
        return obj
    model = obj.get("model", obj)
    if not isinstance(model, dict):
        return obj
    converted, bad = {}, []
    for key, value in model.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            converted[key] = torch.from_numpy(np.array(value, copy=True))
        elif isinstance(value, torch.Tensor):
            converted[key] = value
        else:
            bad.append(str(key))
    if bad:
        raise CheckpointError(f"{where}: entries that are not numeric arrays: {group_keys(bad)}")
    return converted


# ---------------------------------------------------------------------------------------------------- renaming

NORM = r"(weight|bias|running_mean|running_var)"
STAGES = (2, 3, 4, 5)  # detectron2's res2..res5 are minseg's (torchvision's) layer1..layer4

BACKBONE: list[Rule] = [
    # ResNet (MSRA layout) -> minseg's torchvision-style names: stem.conv1 = conv1 + bn1, convK.norm = bnK,
    # shortcut (conv + norm) = downsample.0 / downsample.1
    (r"backbone\.bottom_up\.stem\.conv1\.weight", r"backbone.conv1.weight"),
    (rf"backbone\.bottom_up\.stem\.conv1\.norm\.{NORM}", r"backbone.bn1.\1"),
    *[(rf"backbone\.bottom_up\.res{k}\.(\d+)\.conv([123])\.weight", rf"backbone.layer{k - 1}.\1.conv\2.weight")
      for k in STAGES],
    *[(rf"backbone\.bottom_up\.res{k}\.(\d+)\.conv([123])\.norm\.{NORM}", rf"backbone.layer{k - 1}.\1.bn\2.\3")
      for k in STAGES],
    *[(rf"backbone\.bottom_up\.res{k}\.0\.shortcut\.weight", rf"backbone.layer{k - 1}.0.downsample.0.weight")
      for k in STAGES],
    *[(rf"backbone\.bottom_up\.res{k}\.0\.shortcut\.norm\.{NORM}", rf"backbone.layer{k - 1}.0.downsample.1.\1")
      for k in STAGES],
]

SEMANTIC: list[Rule] = [
    # SemSegFPNHead: one Sequential per level named p2..p5 (convs at 0, 2, 4; Upsample between); each detectron2
    # Conv2d keeps its GroupNorm inside as `.norm`, minseg's ConvNormAct has them at .0 (conv) and .1 (norm)
    *[(rf"sem_seg_head\.p{k}\.(\d)\.weight", rf"sem_seg_head.levels.{k - 2}.\1.0.weight") for k in (2, 3, 4, 5)],
    *[(rf"sem_seg_head\.p{k}\.(\d)\.norm\.(weight|bias)", rf"sem_seg_head.levels.{k - 2}.\1.1.\2") for k in (2, 3, 4, 5)],
    (r"sem_seg_head\.predictor\.(weight|bias)", r"sem_seg_head.predictor.\1"),
]

NECK_AND_HEADS: list[Rule] = [
    # FPN: detectron2 names the convs by level (2..5) on the backbone; minseg's shared FPN indexes them 0..3,
    # each a Sequential(conv[, norm])
    *[(rf"backbone\.fpn_lateral{k}\.(weight|bias)", rf"fpn.lateral.{k - 2}.0.\1") for k in (2, 3, 4, 5)],
    *[(rf"backbone\.fpn_output{k}\.(weight|bias)", rf"fpn.output.{k - 2}.0.\1") for k in (2, 3, 4, 5)],
    # RPN head (one shared 3x3 conv)
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", r"rpn.conv.0.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", r"rpn.cls_logits.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", r"rpn.bbox_pred.\1"),
    # box head fc1/fc2 and predictor (background is the last row of cls_score: no reordering)
    *[(rf"roi_heads\.box_head\.fc{k}\.(weight|bias)", rf"roi_heads.box_head.fc.{k - 1}.\1") for k in (1, 2)],
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"roi_heads.box_predictor.\1.\2"),
    # mask head: mask_fcn1..4 -> conv.0..3 (Sequential(conv, ReLU)), deconv, 1x1 predictor with 80 channels
    *[(rf"roi_heads\.mask_head\.mask_fcn{k}\.(weight|bias)", rf"roi_heads.mask_head.conv.{k - 1}.0.\1")
      for k in (1, 2, 3, 4)],
    (r"roi_heads\.mask_head\.(deconv|predictor)\.(weight|bias)", r"roi_heads.mask_head.\1.\2"),
]

DROPS: list[Drop] = [
    (r"proposal_generator\.anchor_generator\.cell_anchors\.\d+",
     "model-zoo files from 2019 keep the anchor templates, since made non-persistent; minseg computes them"),
    (r"pixel_(mean|std)", "preprocessing constants stored by some checkpoints; minseg keeps them in the model config"),
]

ARCHS = ("panoptic_fpn_resnet50", "panoptic_fpn_resnet101")


def rename_detectron2(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """detectron2 names -> minseg names; CheckpointError listing keys no rule or drop accounts for."""
    return rename(state, BACKBONE + NECK_AND_HEADS + SEMANTIC, DROPS, where)


DEPTH_BY_RES4_BLOCKS = {6: 50, 23: 101}


def check_depth(state: dict[str, torch.Tensor], arch: str, where: str) -> None:
    """A clear error when an R-50 checkpoint is converted for the R-101 model or the other way round."""
    blocks = {int(k.split(".")[3]) for k in state if k.startswith("backbone.bottom_up.res4.")}
    depth = DEPTH_BY_RES4_BLOCKS.get(len(blocks))
    if depth is not None and f"resnet{depth}" not in arch:
        raise CheckpointError(f"{where}: a ResNet-{depth} Panoptic FPN checkpoint ({len(blocks)} res4 blocks); "
                              f"convert it with arch='panoptic_fpn_resnet{depth}', not {arch!r}")


def convert(checkpoint: str | os.PathLike | dict, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    if isinstance(checkpoint, dict):
        where, raw = "state dict", checkpoint
    elif isinstance(checkpoint, (str, os.PathLike)):
        where, raw = str(checkpoint), read_checkpoint(checkpoint)
    else:
        raise CheckpointError(f"checkpoint must be a path or a state dict, got {type(checkpoint).__name__}")
    state = as_state_dict(to_tensors(raw, where), where)
    check_depth(state, arch, where)
    state = rename_detectron2(state, where)
    overrides = {}
    if "roi_heads.box_predictor.cls_score.weight" in state:
        num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1  # background is the last row
        if num_classes != 80:
            overrides["num_classes"] = num_classes
    if "sem_seg_head.predictor.weight" in state and state["sem_seg_head.predictor.weight"].shape[0] != 54:
        overrides["num_sem_seg_classes"] = state["sem_seg_head.predictor.weight"].shape[0]
    return validate(state, arch, where, **overrides), overrides
