"""`minseg bench --data`: is data loading the bottleneck? The loader alone against the training step, and the
dataset reads alone against `minseg eval`, per family, on a generated dataset of realistic image size.

For each model a small dataset of 480x640 images is written to a temporary folder by minseg_ref/tiny_data.py
(Pascal VOC with JPEGs for the semantic models, COCO instances and COCO panoptic with PNGs for the others), then:

- training: `minseg train` itself (minseg.training.run.train) runs 1 + repeats steps of batch 2 with the family's
  default recipe (augmentation and sizes) and one loading process (--workers 0); its log.jsonl times each step's
  batch from the loader (data_seconds: read, decode, augment) and the step itself (seconds: forward, loss,
  backward, optimiser). The first step is a warm-up. The lr is 1e-6 so that random-init runs stay finite (Panoptic
  FPN's diverges at its default lr); what a step costs does not depend on it.
- eval: the dataset's reads alone (what `minseg eval` does per image before predicting, `repeats` passes), then
  `minseg eval`'s own loop (minseg.evaluate.evaluate: predict, metric accumulation and the final summary, COCO AP
  through pycocotools included) once over the dataset, after one warm-up prediction. The model is random init
  with as many classes as the dataset has, so a detector's time depends on how many boxes pass its score
  threshold: the note gives the detections per image.

Everything is reported in images per second, with the ratios loader / step and reads / eval: how many times
faster the data comes than the model takes it. On a shared machine the ratios are the point, not the speeds: the
note gives the 1-minute load average before and after each row.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DATA_BENCH = ["fcn_resnet50", "deeplabv3_resnet50", "unet_resnet34", "maskrcnn_resnet50_fpn", "yolact_resnet50",
              "panoptic_fpn_resnet50"]
IMAGES, SIZE, BATCH, LR = 4, (480, 640), 2, 1e-6


@dataclass
class DataRow:
    model: str
    device: str
    input: str
    loader_ips: float        # the training loader alone, images/s
    step_ips: float          # the training step alone, images/s
    reads_ips: float         # the eval's dataset reads alone, images/s
    eval_ips: float          # minseg eval's loop, images/s
    note: str = ""

    @property
    def train_ratio(self) -> float:
        return self.loader_ips / self.step_ips

    @property
    def eval_ratio(self) -> float:
        return self.reads_ips / self.eval_ips


def write_dataset(family: str, root: Path) -> tuple[Path, str | None, str]:
    """(folder, split, description) of a generated dataset of the family's layout."""
    from minseg_ref import tiny_data

    if family in ("semantic", "unet"):  # VOC's train list holds the first half of the names
        return tiny_data.write_voc(root, n=2 * IMAGES, size=SIZE), "train", "VOC jpg"
    if family in ("maskrcnn", "yolact"):
        return tiny_data.write_coco_instances(root, n=IMAGES, size=SIZE), None, "COCO png"
    return tiny_data.write_coco_panoptic(root, n=IMAGES, size=SIZE), None, "panoptic png"


def train_timings(name: str, data: Path, split: str | None, out: Path, device: str, repeats: int
                  ) -> tuple[list[float], list[float]]:
    """(loader seconds, step seconds) per batch of `minseg train`'s steps after the first."""
    from minseg.training.run import Settings, train

    settings = Settings(model=name, data=str(data), out=str(out), split=split, steps=1 + repeats,
                        batch_size=BATCH, lr=LR, device=device, log_every=1, workers=0)
    with contextlib.redirect_stderr(io.StringIO()):  # the run's progress lines
        train(settings)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]
    return [line["data_seconds"] for line in lines], [line["seconds"] for line in lines]


def eval_model(name: str, family: str, dataset) -> torch.nn.Module:
    """Random init with the dataset's classes (Panoptic FPN: its things, and its stuff + 1 semantic classes)."""
    import minseg
    from minseg.training.adapters import classes_needed

    overrides = {"num_classes": classes_needed(family, dataset.categories)}
    if family == "panoptic_fpn":
        overrides["num_sem_seg_classes"] = 1 + sum(not c["isthing"] for c in dataset.categories)
    return minseg.create_model(name, **overrides)


def eval_timings(name: str, family: str, data: Path, split: str | None, device: str, repeats: int
                 ) -> tuple[float, float, str]:
    """(reads images/s, eval images/s, note) of `minseg eval`'s loop on the dataset."""
    from minseg.data import open_dataset
    from minseg.evaluate import evaluate

    dataset = open_dataset(data, split=split)
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        passes.append(time.perf_counter() - start)
    model = eval_model(name, family, dataset).to(device)
    with torch.inference_mode():  # warm-up
        model.predict([dataset[0][0].permute(1, 2, 0).numpy()])
    start = time.perf_counter()
    metrics = evaluate(name, model, dataset, progress=False)
    seconds = time.perf_counter() - start
    note = ""
    if "predictions" in metrics:
        note = f"eval: {len(metrics['predictions']) / len(dataset):.0f} detections/image"
    return len(dataset) / statistics.median(passes), len(dataset) / seconds, note


def bench_data(name: str, device: str, repeats: int) -> DataRow:
    from minseg.training.adapters import family_of

    family = family_of(name)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="minseg-bench-data-") as tmp:
        data, split, layout = write_dataset(family, Path(tmp) / "data")
        loader, steps = train_timings(name, data, split, Path(tmp) / "run", device, repeats)
        reads, evals, note = eval_timings(name, family, data, split, device, repeats)
    H, W = SIZE
    note = "; ".join(filter(None, [f"load {load:.1f} -> {os.getloadavg()[0]:.1f}", note]))  # the machine's, 1 min
    return DataRow(name, device, f"{IMAGES} {layout} {H}x{W}, batch {BATCH}", BATCH / statistics.median(loader),
                   BATCH / statistics.median(steps), reads, evals, note)


def run(models: list[str] | None, device: str = "cpu", ops: bool = False, repeats: int = 3,
        on_row: Callable[[DataRow], None] | None = None) -> list[DataRow]:
    """The loader and eval benchmark of each of `models` (DATA_BENCH when None); `on_row` gets each row as soon
    as it is measured, while a progress line on stderr (terminals only) names the model being timed."""
    from minseg import registry
    from minseg.training.adapters import family_of
    from minseg_ref.progress import Progress

    if ops:
        raise ValueError("--ops times inference operators; run it without --data")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    for name in models or []:
        registry.check_name(name)
        family_of(name)  # a ValueError for a model without a training recipe
    names = models or DATA_BENCH
    rows = []
    with Progress(len(names)) as progress:
        for i, name in enumerate(names, 1):
            progress.step(i, f"{name} (loader, training steps, eval)")
            rows.append(bench_data(name, device, repeats))
            progress.clear()
            if on_row is not None:
                on_row(rows[-1])
    return rows


def format_header() -> str:
    header = (f"{'model':<24} {'device':<6} {'input':<32} {'loader':>7} {'step':>7} {'ratio':>7} "
              f"{'reads':>7} {'eval':>7} {'ratio':>7}  note")
    return header + "\n" + "-" * len(header)


def format_row(r: DataRow) -> str:
    return (f"{r.model:<24} {r.device:<6} {r.input:<32} {r.loader_ips:>7.2f} {r.step_ips:>7.3f} {r.train_ratio:>6.0f}x "
            f"{r.reads_ips:>7.2f} {r.eval_ips:>7.3f} {r.eval_ratio:>6.0f}x  {r.note}")


def format_footer(rows: list[DataRow]) -> str:
    return ("images/s. loader: minseg train's DataLoader alone (read, decode, the recipe's augmentation; --workers 0); "
            "step: its training step (forward, loss, backward, optimiser); ratio = loader / step\n"
            "reads: minseg eval's dataset reads alone; eval: its loop (predict, metrics, summary; random init); "
            "ratio = reads / eval\nloader, step: medians of --repeats steps after a warm-up step; "
            "reads: median of --repeats passes; eval: one pass over the dataset after a warm-up prediction")
