"""`minseg bench --data` (minseg_ref/bench_data.py): the loader against the training step and the eval's reads
against `minseg eval`, one row per model. These run it end to end on small images; no time is asserted."""
import contextlib

import pytest

from minseg.cli import main
from minseg.training import run as training_run
from minseg_ref import bench_data


def test_bench_data_prints_a_row_per_model(monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "SIZE", (48, 64))                   # small images and crops: a smoke run
    monkeypatch.setitem(training_run.DEFAULT_IMAGE_SIZE, "unet", 32)
    assert main(["bench", "--data", "--model", "unet_resnet34", "--repeats", "1"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["model", "device", "input", "loader", "step"] and set(lines[1]) == {"-"}
    row = lines[2].split()
    assert row[:2] == ["unet_resnet34", "cpu"] and "4 VOC jpg 48x64, batch 2" in lines[2]
    after_input = row.index("batch") + 2
    loader, step, ratio, reads, evals, eval_ratio, *note = row[after_input:]
    assert float(loader) > 0 and float(step) > 0 and float(reads) > 0 and float(evals) > 0
    assert ratio.endswith("x") and eval_ratio.endswith("x") and note[0] == "load" and note[2] == "->"
    assert lines[3].startswith("images/s. loader: minseg train's DataLoader") and err == ""


@pytest.mark.parametrize("argv, message", [
    (["--data", "--train"], "not allowed with argument"),
    (["--data", "--ops"], "--ops times inference operators; run it without --data"),
    (["--data", "--model", "resnet50"], "unknown model"),
])
def test_bench_data_refusals(argv, message, capsys):
    with pytest.raises(SystemExit) if "--train" in argv else contextlib.nullcontext():  # argparse exits itself
        assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""

