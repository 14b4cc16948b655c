"""Hostile and broken inputs, round two (issue 23): no crash, no hang, no overwritten input, nothing left behind.

Every file here is generated small; anything that could crash the interpreter (a segfault in an unpickler) runs
in a subprocess, so a regression fails its test instead of the suite.
"""
import io
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import minseg
from minseg.convert import pickle_bounds
from minseg.files import OutputBatch, atomic_write, plan_outputs
from minseg.image import MAX_PIXELS, load_rgb

DEEP = b"\x80\x02}" + b"(" * 10**6 + b"t" * 10**6 + b"J\x01\x00\x00\x00s."  # the 2 MB crash


def laughs(levels: int) -> bytes:
    """A dict whose key is a tuple holding the level below twice, `levels` deep (memo references): 2**levels
    leaves described in ~5 bytes a level."""
    body = b"\x80\x02}K\x01"
    for i in range(levels):
        body += b"q" + bytes([i]) + b"h" + bytes([i]) + b"\x86"  # BINPUT i, BINGET i, TUPLE2
    return body + b"K\x01s."


def torch_zip_with(pkl: bytes) -> bytes:
    """A torch zip checkpoint whose archive/data.pkl is `pkl` (the other records from a real torch.save)."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, pkl if info.filename.endswith("data.pkl") else src.read(info))
    return out.getvalue()


def zip_bomb(path: Path, mb: int) -> None:
    """A deflated torch checkpoint of one float tensor of `mb` MB of zeros: about mb KB on disk, and torch.load
    would inflate all of it (a 1 MB file -> 1 GB)."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(12345)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith("data/0"):
                with dst.open(info.filename, "w") as member:  # streamed: the test never holds it
                    for _ in range(mb):
                        member.write(bytes(1 << 20))
            else:
                data = src.read(info)
                if info.filename.endswith("data.pkl"):  # 12345 (BININT2) -> the new element count (BININT)
                    data = data.replace(b"M\x39\x30", b"J" + struct.pack("<i", mb << 18))
                dst.writestr(info.filename, data)


def legacy_truncated(mb: int) -> bytes:
    """A legacy torch file declaring a tensor of `mb` MB and holding 60 KB of it."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(12345)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue().replace(b"M\x39\x30", b"J" + struct.pack("<i", mb << 18))
    return data.replace(struct.pack("<q", 12345), struct.pack("<q", mb << 18))[:60_000]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "minseg", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kwargs)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and len(lines[0]) < 1200, r.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# 1. pickles: depth and size bounded before anything is built

HOSTILE_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import minseg
    results = {}
    for source, arch, path in json.loads(sys.argv[1]):
        t = time.time()
        try:
            minseg.convert(source, path, arch=arch)
            results[f"{source}:{path}"] = ["accepted", time.time() - t]
        except minseg.CheckpointError as e:
            results[f"{source}:{path}"] = [str(e), time.time() - t]
    print(json.dumps(results))
""")


def test_deep_and_exponential_pickles_refused_by_every_source(tmp_path):
    """The 2 MB segfault, 100k deep (RecursionError), 1 KB and 163-byte billion laughs: as a plain pickle, as a
    legacy torch file and as archive/data.pkl in a zip; through every source; in a subprocess (a crash fails here)."""
    payloads = {"deep": DEEP, "deep100k": b"\x80\x02}" + b"(" * 10**5 + b"t" * 10**5 + b"J\x01\x00\x00\x00s.",
                "laughs1k": laughs(200), "laughs163": laughs(30)}
    assert len(payloads["laughs163"]) < 170 and len(payloads["laughs1k"]) < 1100
    jobs = []
    for name, pkl in payloads.items():
        (tmp_path / f"{name}.pkl").write_bytes(pkl)
        (tmp_path / f"{name}.pth").write_bytes(torch_zip_with(pkl))
        jobs.append(("detectron2", "panoptic_fpn_resnet50", str(tmp_path / f"{name}.pkl")))
        for source, arch in (("torchvision", "fcn_resnet50"), ("smp", "unet_resnet34"), ("yolact", "yolact_resnet50"),
                             ("detectron2", "panoptic_fpn_resnet50")):
            jobs.append((source, arch, str(tmp_path / f"{name}.pth")))
        jobs.append(("torchvision", "fcn_resnet50", str(tmp_path / f"{name}.pkl")))  # legacy torch.load path
    r = subprocess.run([sys.executable, "-c", HOSTILE_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    results = json.loads(r.stdout)
    assert len(results) == len(jobs)
    for job, (message, seconds) in results.items():
        assert "nests deeper" in message or "expands to more than" in message, (job, message[:300])
        assert len(message) < 400 and seconds < 5, (job, len(message), seconds)


def test_deep_pickle_cli_exit_2(tmp_path):
    (tmp_path / "evil.pth").write_bytes(torch_zip_with(DEEP))
    r = run_cli("convert", "--from", "torchvision", "--arch", "fcn_resnet50", tmp_path / "evil.pth",
                tmp_path / "out.safetensors")
    assert_one_line_error(r, "nests deeper")
    assert sorted(os.listdir(tmp_path)) == ["evil.pth"]


def test_bounds_are_exact_and_spare_ordinary_nesting():
    def nested(depth):  # depth containers, one inside the other
        obj = 1
        for _ in range(depth):
            obj = [obj]
        return pickle.dumps({"x": obj}, protocol=2)

    for protocol_bytes, ok in ((nested(pickle_bounds.MAX_DEPTH - 2), True), (nested(pickle_bounds.MAX_DEPTH), False)):
        check = lambda: pickle_bounds.check_pickle(io.BytesIO(protocol_bytes), len(protocol_bytes), "x")
        if ok:
            check()
        else:
            with pytest.raises(pickle_bounds.PickleBoundError, match="nests deeper"):
                check()
    shared = [0] * 1000
    fine = pickle.dumps([shared] * 1000)  # 1M objects once expanded: under the bound
    pickle_bounds.check_pickle(io.BytesIO(fine), len(fine), "x")
    too_many = pickle.dumps([shared] * 3000)
    with pytest.raises(pickle_bounds.PickleBoundError, match="expands"):
        pickle_bounds.check_pickle(io.BytesIO(too_many), len(too_many), "x")


def test_real_checkpoints_pass_the_bounds(tmp_path):
    """A whole Mask R-CNN state dict plus an optimizer state, zip and legacy, protocols 2 and 4."""
    state = minseg.create_model("maskrcnn_resnet50_fpn").state_dict()
    checkpoint = {"model": state, "optimizer": {"state": {i: {"momentum_buffer": torch.zeros(1)} for i in range(300)}}}
    for kwargs in ({}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}):
        path = tmp_path / "ckpt.pth"
        torch.save(checkpoint, path, **kwargs)
        pickle_bounds.check_torch_file(str(path))


def test_declared_huge_string_and_zip_bomb_refused(tmp_path):
    huge = b"\x80\x02}X\x01\x00\x00\x00aB\xff\xff\xff\x7fs."  # BINBYTES declaring 2 GB in a 20-byte file
    (tmp_path / "huge.pkl").write_bytes(huge)
    with pytest.raises(minseg.CheckpointError):
        minseg.convert("detectron2", tmp_path / "huge.pkl", arch="panoptic_fpn_resnet50")
    zip_bomb(tmp_path / "bomb.pth", 64)
    assert (tmp_path / "bomb.pth").stat().st_size < 100_000
    with pytest.raises(minseg.CheckpointError, match="expand"):
        minseg.convert("torchvision", tmp_path / "bomb.pth", arch="fcn_resnet50")


# ---------------------------------------------------------------------------------------------------------------------
# 5. numpy dtypes and arrays inside detectron2 pickles

class CraftedDtype:
    def __init__(self, code="f4", byteorder="<", flags=0):
        self.code, self.byteorder, self.flags = code, byteorder, flags

    def __reduce__(self):
        return (np.dtype, (self.code, False, True), (3, self.byteorder, None, None, None, -1, -1, self.flags))


class CraftedArray:
    def __init__(self, dtype, data, shape=(2,)):
        self.dtype, self.data, self.shape = dtype, data, shape

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, self.shape, self.dtype, False, self.data))


class DirectNdarray:
    def __reduce__(self):
        return (np.ndarray, ((3,), "O"))


def d2_file(tmp_path, value, name="w.pkl"):
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"model": {"w": value}, "__author__": "x"}, protocol=2))
    return path


@pytest.mark.parametrize("value,match", [
    (CraftedArray(CraftedDtype(flags=0x01), bytes(8)), "not numpy's own"),           # object-capable float dtype
    (CraftedArray(CraftedDtype(flags=0x7FFFFFFF), bytes(8)), "not numpy's own"),     # SystemError before
    (CraftedArray(CraftedDtype(code="O8"), bytes(16)), "not allowed"),                # object dtype
    (CraftedArray(CraftedDtype(code="V8"), bytes(16)), "not allowed"),                # raw void records
    (CraftedArray(CraftedDtype(), bytes(4)), "does not hold"),                        # data shorter than the shape
    (DirectNdarray(), "not"),                                                          # numpy.ndarray called directly
])
def test_crafted_numpy_pickles_refused(tmp_path, value, match):
    with pytest.raises(minseg.CheckpointError, match=match):
        minseg.convert("detectron2", d2_file(tmp_path, value), arch="panoptic_fpn_resnet50")


def test_numpy_byte_orders_still_read(tmp_path):
    from minseg.convert.detectron2 import read_pkl

    for dtype in (">f4", "<f8", "|u1", "<i8", "?"):
        value = np.arange(6).astype(dtype).reshape(2, 3)
        got = read_pkl(d2_file(tmp_path, value))["model"]["w"]
        expected = pickle.loads(pickle.dumps(value, protocol=2))  # what plain pickle gives (numpy may swap to native)
        assert got.dtype == expected.dtype and np.array_equal(got, value)


# ---------------------------------------------------------------------------------------------------------------------
# 6, 11. meta tensors; torch's protocol warnings

def test_meta_tensors_refused(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"backbone.conv1.weight": torch.empty(64, 3, 7, 7, device="meta")}, path)
    with pytest.raises(minseg.CheckpointError, match="meta"):
        minseg.convert("torchvision", path, arch="fcn_resnet50")


def test_protocol_4_checkpoint_prints_no_warning(tmp_path):
    from minseg.convert.common import read_torch_checkpoint

    for kwargs in ({"pickle_protocol": 4}, {"pickle_protocol": 4, "_use_new_zipfile_serialization": False}):
        path = tmp_path / "p4.pth"
        torch.save({"a": torch.zeros(2)}, path, **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                read_torch_checkpoint(path)
            except minseg.CheckpointError:
                pass  # torch's own verdict on the file; what matters is that nothing more is printed
        assert not [w for w in caught if "pickle protocol" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------------
# 3, 12. images: decompression bombs, empty images

def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height 8-bit grey, with one tiny IDAT: a few hundred bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000), (9000, 8000)])
def test_decompression_bombs_refused_in_one_line(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(*size))
    assert path.stat().st_size < 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes either
        with pytest.raises(ValueError, match="limit") as info:
            load_rgb(path)
    assert "\n" not in str(info.value) and f"{MAX_PIXELS:,}" in str(info.value)


def test_empty_images_refused():
    for shape in ((0, 5, 3), (5, 0, 3)):
        with pytest.raises(ValueError, match="empty image"):
            load_rgb(np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match="empty image"):
        minseg.create_model("unet_resnet34").predict(np.zeros((0, 5, 3), np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# 12. predict leaves the model as it found it

def test_predict_does_not_change_a_model_in_train_mode():
    torch.manual_seed(0)
    model = minseg.create_model("unet_resnet34", num_classes=3).train()
    model.decoder.eval()  # a mixture of modes must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (result,) = model.predict(image)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert modes == {name: m.training for name, m in model.named_modules()}
    with torch.no_grad():
        expected = model.eval()(((torch.from_numpy(image).permute(2, 0, 1).float() / 255
                                  - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
                                 / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))[None])[0].softmax(0)
    torch.testing.assert_close(result["probs"], expected)  # predicted in eval mode


# ---------------------------------------------------------------------------------------------------------------------
# 2, 8, 9, 10. outputs: planned before writing, all or nothing, umask honoured, short temp names, no leftovers

def test_plan_outputs_refuses_inputs_and_collisions(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "a.m.png"
    a.touch(), b.touch()
    with pytest.raises(ValueError, match="would replace the input"):
        plan_outputs([(a, [tmp_path / "a.m.png"]), (b, [tmp_path / "a.m.m.png"])], [a, b])
    (tmp_path / "link.png").symlink_to(a)
    with pytest.raises(ValueError, match="would replace the input"):
        plan_outputs([(b, [tmp_path / "link.png"])], [a, b])
    with pytest.raises(ValueError, match="would both write"):
        plan_outputs([(tmp_path / "d1/x.png", [tmp_path / "x.m.png"]), (tmp_path / "d2/x.png", [tmp_path / "x.m.png"])],
                     [])


def test_cli_predict_never_replaces_an_input_or_writes_one_path_twice(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(src / "a.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(src / "a.unet_resnet34.png")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = run_cli("predict", "--model", "unet_resnet34", src / "a.png", src / "a.unet_resnet34.png", "--out", src)
    assert_one_line_error(r, "would replace the input")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / d / "x.png")
    r = run_cli("predict", "--model", "unet_resnet34", tmp_path / "d1/x.png", tmp_path / "d2/x.png", "--out",
                tmp_path / "out")
    assert_one_line_error(r, "would both write")
    assert not (tmp_path / "out").exists()


def test_cli_predict_all_or_nothing_modes_and_long_names(tmp_path):
    """A bad image among good ones: exit 2, nothing written. Then a good run under umask 027 with a 250-byte output
    name and an existing 0604 output: outputs 0640 (the existing one keeps 0604), no temp file left."""
    good = tmp_path / ("x" * (250 - len(".unet_resnet34.json")) + ".png")
    Image.new("RGB", (16, 16), (90, 90, 90)).save(good)
    (tmp_path / "text.jpg").write_text("not an image")
    out = tmp_path / "out"
    r = run_cli("predict", "--model", "unet_resnet34", good, tmp_path / "text.jpg", "--out", out)
    assert_one_line_error(r, "text.jpg")
    assert not out.exists()
    out.mkdir()
    existing = out / (good.stem + ".unet_resnet34.json")
    existing.write_text("old")
    existing.chmod(0o604)
    r = run_cli("predict", "--model", "unet_resnet34", good, "--out", out, preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert len(names) == 2 and all(len(n.encode()) <= 250 for n in names)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o604 and existing.read_text() != "old"
    assert stat.S_IMODE((out / (good.stem + ".unet_resnet34.png")).stat().st_mode) == 0o640


def test_atomic_write_umask_and_stale_temps(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "new.bin", lambda tmp: Path(tmp).write_bytes(b"1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".minseg-{dead.pid}-0000.tmp"          # kill -9 leftover of a finished process
    young = tmp_path / f".minseg-{dead.pid}-0001.tmp"          # just as dead, but recent: maybe another host's
    alive = tmp_path / f".minseg-{os.getpid()}-0002.tmp"       # a running writer's
    for p in (stale, young, alive):
        p.write_bytes(b"partial")
    old_time = time.time() - 3600
    os.utime(stale, (old_time, old_time))
    os.utime(alive, (old_time, old_time))
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "fails.bin", lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert sorted(os.listdir(tmp_path)) == sorted(["new.bin", young.name, alive.name])


def test_output_batch_is_all_or_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    for error in (ValueError, KeyboardInterrupt):
        with pytest.raises(error):
            with OutputBatch() as batch:
                batch.add(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("new"))
                batch.add(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("new"))
                raise error()
        assert sorted(os.listdir(tmp_path)) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"
    with OutputBatch() as batch:
        batch.add(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("new"))
    assert sorted(os.listdir(tmp_path)) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "new"


def test_convert_output_mode_and_no_safetensors_temp(tmp_path):
    from minseg.weights import save_weights

    (tmp_path / "w.safetensors").write_bytes(b"old")
    (tmp_path / "w.safetensors").chmod(0o644)
    old = os.umask(0o077)
    try:
        save_weights({"a": torch.zeros(2)}, tmp_path / "w.safetensors", arch="fcn_resnet50", source="torchvision")
        save_weights({"a": torch.zeros(2)}, tmp_path / "v.safetensors", arch="fcn_resnet50", source="torchvision")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644  # existing mode kept
    assert stat.S_IMODE((tmp_path / "v.safetensors").stat().st_mode) == 0o600  # the umask's choice
    assert sorted(os.listdir(tmp_path)) == ["v.safetensors", "w.safetensors"]


# ---------------------------------------------------------------------------------------------------------------------
# 11, 12. Ctrl-C, bench --repeats 0

def test_ctrl_c_exits_130_with_one_line():
    script = ("import sys, minseg.cli as cli\n"
              "def interrupted(args):\n    raise KeyboardInterrupt\n"
              "cli.cmd_list = interrupted\nsys.exit(cli.main(['list']))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr.strip() == "minseg list: interrupted", r.stderr


def test_ctrl_c_during_predict_leaves_nothing(tmp_path):
    """SIGINT once the first image's outputs are staged: exit 130, one line, no output and no temp file."""
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (384, 384), (i, 100, 200)).save(paths[-1])
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "minseg", "predict", "--model", "unet_resnet34", *map(str, paths),
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # as from a terminal: a shell's background job (CI started with `&`) inherits SIGINT
                               # ignored, and Python then installs no KeyboardInterrupt handler
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(n.endswith(".tmp") for n in os.listdir(out))):
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.strip().splitlines() if "runs on random init" not in line]  # the weights note
    assert process.returncode == 130 and lines == ["minseg predict: interrupted"], stderr[-2000:]
    assert not out.exists()


def test_bench_repeats_zero_refused():
    r = run_cli("bench", "--repeats", "0")
    assert r.returncode == 2 and "at least 1" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# memory: the largest resident set a hostile file under 1 MB causes

RSS_SCRIPT = textwrap.dedent("""
    # peak resident set per file: /proc/self/status VmHWM after resetting it (clear_refs 5); getrusage's ru_maxrss
    # would carry the parent's peak across exec
    import json, sys
    import torch
    import minseg
    from minseg.image import load_rgb

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    grown = {}
    for kind, source, arch, path in json.loads(sys.argv[1]):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        try:
            if kind == "image":
                load_rgb(path)
            else:
                minseg.convert(source, path, arch=arch)
        except ValueError:
            pass
        grown[path.rsplit("/", 1)[-1]] = (status("VmHWM") - before) / 1024
    print(json.dumps(grown))
""")


def test_hostile_files_under_1mb_stay_under_50mb_resident(tmp_path):
    """Each hostile file kind under 1 MB, loaded in a fresh process after torch is imported: the peak resident
    set grows by less than 50 MB (measured: at most 5 MB, from a list of half a million Nones; without the expansion
    bound a 300 KB zip bomb alone took 302 MB)."""
    files = {
        "deep.pkl": b"\x80\x02}" + b"(" * 450_000 + b"t" * 450_000 + b"J\x01\x00\x00\x00s.",
        "laughs.pkl": laughs(200),
        "wide.pkl": pickle.dumps({"model": [None] * 480_000, "__author__": "x"}, protocol=2),  # ~1M objects
        "huge.pkl": b"\x80\x02}X\x01\x00\x00\x00aB\xff\xff\xff\x7fs.",
        "bomb.png": png_header_only(60000, 60000),
    }
    files["deep.pth"] = torch_zip_with(files["deep.pkl"])
    files["wide.pth"] = torch_zip_with(files["wide.pkl"])
    files["legacy_huge.pth"] = legacy_truncated(1000)
    zip_bomb(tmp_path / "bomb.pth", 150)  # 150 KB; without the expansion bound torch.load takes 150 MB
    jobs = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in sorted(os.listdir(tmp_path)):
        assert (tmp_path / name).stat().st_size < 1 << 20, name
        kind = "image" if name.endswith(".png") else "checkpoint"
        source, arch = ("detectron2", "panoptic_fpn_resnet50") if name.endswith(".pkl") else ("torchvision", "fcn_resnet50")
        jobs.append((kind, source, arch, str(tmp_path / name)))
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grown_mb = json.loads(r.stdout)
    print("peak resident set growth, MB:", {k: round(v, 1) for k, v in grown_mb.items()})
    assert max(grown_mb.values()) < 50, grown_mb
