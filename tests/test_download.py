"""`minseg download` / create_model(weights="official") end to end, over file:// and a local http.server.

Hostile and broken servers (issue 23 item 7): a response cut short, a server that never answers, 404,
nothing listening; a manifest that points outside the cache or has no `checkpoints`; a corrupt cache;
a killed run's work folder. Each case must raise DownloadError (one line naming the address and the
manual route) and leave nothing in the cache.
"""
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import minseg
from minseg.download import cached_record, check_strength, download

ARCH = "fcn_resnet50"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A torchvision FCN checkpoint named like torchvision's (sha256 prefix in the name), built once."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    folder = tmp_path_factory.mktemp("served")
    raw = folder / "raw.pth"
    torch.save(ref.state_dict(), raw)
    data = raw.read_bytes()
    path = folder / f"fcn_resnet50_coco-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    raw.rename(path)
    return ref, path, hashlib.sha256(data).hexdigest()


def cli(capsys, *argv):
    """`minseg ARGV` in this process: (exit status, stdout, stderr); an uncaught exception fails the test."""
    from minseg.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def write_manifest(tmp_path, monkeypatch, url, file, **extra):
    manifest = tmp_path / "manifest.json"
    entry = {"arch": ARCH, "source": "torchvision", "file": file, "url": url, **extra}
    manifest.write_text(json.dumps({"checkpoints": [entry]}))
    monkeypatch.setenv("MINSEG_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MINSEG_MANIFEST", str(manifest))
    return manifest


@pytest.fixture()
def official(checkpoint, tmp_path, monkeypatch):
    """The checkpoint behind a file:// address, with its name's sha256 prefix in the manifest."""
    ref, path, digest = checkpoint
    manifest = write_manifest(tmp_path, monkeypatch, path.as_uri(), path.name, hash="sha256", hash_prefix=digest[:8])
    return ref, path, manifest


class Handler(http.server.BaseHTTPRequestHandler):
    """/full/NAME serves the checkpoint; /cut/NAME promises it all and closes at half; /silent/NAME never answers."""

    body = b""

    def do_GET(self):
        kind = self.path.split("/")[1]
        if kind == "silent":
            time.sleep(3)
            return
        if kind not in ("full", "cut"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body if kind == "full" else self.body[: len(self.body) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(checkpoint):
    Handler.body = checkpoint[1].read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_verify_convert_cache(official, tmp_path):
    ref, path, manifest = official
    target = download(ARCH, progress=False)
    assert target == tmp_path / "cache" / "fcn_resnet50.safetensors"
    model = minseg.create_model(ARCH, weights="official")
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], ref(x)["out"])
    names = sorted(p.name for p in target.parent.iterdir())
    assert names == [".fcn_resnet50.lock", "fcn_resnet50.json", "fcn_resnet50.safetensors"]  # no work folder left
    record = json.loads((target.parent / "fcn_resnet50.json").read_text())
    assert record["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "32 bits" in record["check"] and "not a forged one" in record["check"]


def test_corrupt_download_refused_and_removed(official, tmp_path, monkeypatch):
    ref, path, manifest = official
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / path.name
    bad.write_bytes(bytes(data))
    write_manifest(tmp_path, monkeypatch, bad.as_uri(), bad.name, hash="sha256", hash_prefix=path.name[-12:-4])
    with pytest.raises(minseg.DownloadError, match="does not match.*minseg convert"):
        download(ARCH, progress=False)
    assert not (tmp_path / "cache").exists()  # created for this download, removed with it


def test_http_download_and_corrupt_cache(official, server, tmp_path, monkeypatch):
    ref, path, _ = official
    write_manifest(tmp_path, monkeypatch, f"{server}/full/{path.name}", path.name, hash="sha256",
                   hash_prefix=path.name[-12:-4])
    target = download(ARCH, progress=False, timeout=5)
    good = target.read_bytes()
    # a corrupt cached file is not "downloaded": it is fetched again
    target.write_bytes(good[:-10] + b"x" * 10)
    assert cached_record(ARCH) is None
    assert download(ARCH, progress=False, timeout=5) == target
    assert cached_record(ARCH) is not None and target.read_bytes()[-10:] != b"x" * 10
    # ... and with the server gone, that is an error, not the corrupt file
    target.write_bytes(good[:-10] + b"x" * 10)
    write_manifest(tmp_path, monkeypatch, f"{server}/nothing/{path.name}", path.name)
    with pytest.raises(minseg.DownloadError, match="404"):
        minseg.create_model(ARCH, weights="official")


@pytest.mark.parametrize("kind, message", [("cut", "closed early"), ("silent", "no answer within 0.5 s"),
                                           ("nothing", "HTTP 404 Not Found")])
def test_http_failures_leave_nothing(official, server, tmp_path, monkeypatch, kind, message):
    path = official[1]
    url = f"{server}/{kind}/{path.name}"
    write_manifest(tmp_path, monkeypatch, url, path.name)
    start = time.perf_counter()
    with pytest.raises(minseg.DownloadError) as info:
        download(ARCH, progress=False, timeout=0.5)
    assert time.perf_counter() - start < 2.5
    text = str(info.value)
    assert message in text and url in text and "minseg convert --from torchvision" in text and "\n" not in text
    assert not (tmp_path / "cache").exists()


def test_offline_error_from_python_and_cli(official, tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{official[1].name}"
    write_manifest(tmp_path, monkeypatch, url, official[1].name)
    with pytest.raises(minseg.DownloadError, match="refused"):
        minseg.create_model(ARCH, weights="official")
    rc, out, err = cli(capsys, "download", ARCH)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and url in err and "minseg convert" in err, err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("file", ["../../escape.pth", "/tmp/escape.pth", "sub/x.pth", "..", ""])
def test_manifest_file_outside_cache_refused(official, tmp_path, monkeypatch, file):
    write_manifest(tmp_path, monkeypatch, official[1].as_uri(), file)
    with pytest.raises(minseg.CheckpointError, match="plain file name"):
        download(ARCH, progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "escape.pth").exists()


@pytest.mark.parametrize("text", ['{"about": "no list"}', "[1, 2]", "{", '{"checkpoints": [{"url": "x"}]}'])
def test_malformed_manifest(tmp_path, monkeypatch, capsys, text):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(text)
    monkeypatch.setenv("MINSEG_HOME", str(tmp_path / "cache"))
    with pytest.raises(minseg.CheckpointError, match="manifest"):
        download(ARCH, manifest=manifest, progress=False)
    rc, out, err = cli(capsys, "download", ARCH, "--manifest", str(manifest))
    assert rc == 2 and err.count("\n") == 1 and str(manifest) in err, err


def test_stale_work_folder_of_a_dead_process_removed(official, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    stale = cache / f".partial-{ARCH}-{dead.pid}-abc"
    live = cache / f".partial-{ARCH}-{os.getpid()}-abc"  # a concurrent download in progress: kept
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "x.pth").write_bytes(b"partial")
    download(ARCH, progress=False)
    assert not stale.exists() and live.exists()


def test_pinned_sha256(official, tmp_path, checkpoint):
    digest = checkpoint[2]
    with pytest.raises(minseg.DownloadError, match="sha256 .* does not match the expected 0000"):
        download(ARCH, progress=False, sha256="0" * 64)
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        download(ARCH, progress=False, sha256="abc")
    download(ARCH, progress=False, sha256=digest.upper())
    record = json.loads((tmp_path / "cache" / "fcn_resnet50.json").read_text())
    assert record["source_sha256"] == digest and record["check"].startswith("sha256 pinned")


def test_check_strength_words():
    assert "24 bits" in check_strength({"hash": "md5", "hash_prefix": "c10459"})
    assert "not a forged one" in check_strength({"hash": "md5", "hash_prefix": "c10459"})
    assert "256 bits" in check_strength({}, sha256="a" * 64)
    assert check_strength({}).startswith("none")


def test_cli_download(official, tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "minseg", "download", ARCH], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "cache" / "fcn_resnet50.safetensors")
    assert "checked by sha256 prefix" in r.stderr and "32 bits" in r.stderr
    rc, out, err = cli(capsys, "download", "unet_resnet34")
    assert rc == 2 and err.count("\n") == 1 and "minseg convert" in err
    rc, out, err = cli(capsys, "download", ARCH, "unet_resnet34", "--sha256", "0" * 64)
    assert rc == 2 and "one model name" in err


def test_torch_hub_local(official):
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    model = torch.hub.load(str(repo), ARCH, source="local", weights="official")
    ref = official[0]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], ref(x)["out"])
