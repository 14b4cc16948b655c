"""`minseg eval`: a model's metrics on a dataset, on one process or data-parallel under torchrun.

- semantic models on a semantic dataset: mIoU and per-class IoU from one confusion matrix (minseg.metrics);
- maskrcnn_* and yolact_* on COCO instances: box and mask AP through pycocotools, on the predictions written to
  predictions.json (COCO results format, the dataset's own category ids, compressed RLE masks);
- panoptic_fpn_* on COCO panoptic: PQ, SQ, RQ for all, things and stuff, with panopticapi's rules (void and
  crowd regions).

Under `torchrun --nproc_per_node N` each process predicts the images i with i % N == rank; the per-image records
are gathered and put back in dataset order before any number is computed, so N processes print exactly what one
prints. Only rank 0 prints and writes.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from minseg.data.labels import LabelMap, family, label_map
from minseg.errors import DataError
from minseg.metrics import confusion_matrix, mean_iou, panoptic_quality, panoptic_stats

KIND_OF_FAMILY = {"semantic": "semantic", "torchvision": "instances", "yolact": "instances", "detectron2": "panoptic"}


# --- one process or many -------------------------------------------------------------------------------------

def start_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes in the environment (gloo on CPU, nccl on
    CUDA) when there is more than one process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # nccl gathers objects on this device
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(value, world: int) -> list:
    """Every process's `value`, in rank order (one process: [value])."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


class Progress:
    """`eval: done/total images, images/s, ETA` on stderr from rank 0, once a second from the first second on."""

    def __init__(self, total: int, show: bool):
        self.total, self.show = total, show
        self.start = self.last = time.perf_counter()

    def step(self, done: int) -> None:
        now = time.perf_counter()
        if self.show and now - self.last >= 1.0:
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate else 0.0
            print(f"eval: {done}/{self.total} images, {rate:.2f} images/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)
            self.last = now


# --- one image -> one record ---------------------------------------------------------------------------------

def semantic_classes(model) -> int:
    """The number of classes a semantic model predicts (smp's one-channel binary output counts as 2)."""
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
    channels = (out["out"] if isinstance(out, dict) else out).shape[1]
    return max(channels, 2)


def semantic_record(model, image: torch.Tensor, target: dict, num_classes: int) -> torch.Tensor:
    """Tensor[C, C] confusion counts of one image (rows: target class)."""
    (out,) = model.predict([image.permute(1, 2, 0).numpy()])
    return confusion_matrix(out["labels"].cpu(), target["mask"], num_classes)


def thing_category(labels: LabelMap, label: int) -> int:
    if labels.family != "torchvision" and not 0 <= label < len(labels.thing_ids):
        raise ValueError(f"the model predicts thing label {label}, but the dataset has {len(labels.thing_ids)} thing "
                         f"categories: fine-tune with --num-classes to match")
    return labels.thing_category(label)


def instance_record(model, model_name: str, image: torch.Tensor, image_id, labels: LabelMap) -> list[dict]:
    """COCO result dicts of one image."""
    from minseg.coco import image_results

    (out,) = model.predict([image.permute(1, 2, 0).numpy()])
    return image_results(out, image_id, lambda label: thing_category(labels, label),
                         truncate_boxes=family(model_name) == "yolact")


def panoptic_record(model, image: torch.Tensor, target: dict, labels: LabelMap) -> dict[int, dict]:
    """panoptic_stats of one image, both sides in the dataset's category ids."""
    (out,) = model.predict([image.permute(1, 2, 0).numpy()])
    pred_categories = {0: -1}
    for s in out["segments_info"]:
        if s["isthing"]:
            pred_categories[s["id"]] = thing_category(labels, s["category_id"])
        elif 1 <= s["category_id"] <= len(labels.stuff_ids):
            pred_categories[s["id"]] = labels.stuff_category(s["category_id"])
        else:
            raise ValueError(f"the model predicts stuff label {s['category_id']}, but the dataset has "
                             f"{len(labels.stuff_ids)} stuff categories: fine-tune with --num-classes to match")
    target_categories = {0: -1} | {s["id"]: s["category_id"] for s in target["segments"]}
    crowds = {s["id"] for s in target["segments"] if s["iscrowd"]}
    return panoptic_stats(out["panoptic_seg"].cpu(), pred_categories, target["panoptic"], target_categories,
                          target_crowds=crowds)


# --- the whole dataset ---------------------------------------------------------------------------------------

def evaluate(model_name: str, model, dataset, *, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Predict this process's shard, gather every record, and summarise. Returns the metrics dict; for instance
    datasets also "predictions" (the COCO results, in dataset order). A DataError on any process is raised on
    rank 0 (the others exit with status 2), so that the run stops everywhere with one message."""
    kind = KIND_OF_FAMILY[family(model_name)]
    if dataset.kind != kind:
        raise ValueError(f"{model_name} needs a {kind} dataset, but the data is a {dataset.kind} dataset")
    labels = label_map(model_name, dataset.categories)
    num_classes = semantic_classes(model) if kind == "semantic" else None
    if num_classes is not None:
        dataset.num_classes = num_classes  # labels >= num_classes (other than 255) are refused per item
    shard = range(rank, len(dataset), world)
    records, error, meter = [], None, Progress(len(dataset), progress and rank == 0)
    try:
        with torch.inference_mode():
            for n, i in enumerate(shard, 1):
                image, target, info = dataset[i]
                if kind == "semantic":
                    records.append((i, semantic_record(model, image, target, num_classes)))
                elif kind == "instances":
                    records.append((i, instance_record(model, model_name, image, info["image_id"], labels)))
                else:
                    records.append((i, panoptic_record(model, image, target, labels)))
                meter.step(min(n * world, len(dataset)))
    except (DataError, ValueError) as e:
        if world == 1:
            raise
        error = str(e)
    everything = gather((error, records), world)
    errors = [e for e, _ in everything if e is not None]
    if errors:
        if rank == 0:
            raise DataError(errors[0])
        raise SystemExit(2)
    ordered = [record for _, record in sorted((r for _, rs in everything for r in rs), key=lambda r: r[0])]
    if kind == "semantic":
        return semantic_metrics(ordered, num_classes, dataset.categories)
    if kind == "instances":
        return instance_metrics(ordered, dataset)
    return panoptic_metrics(ordered, dataset.categories)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # json has no nan


def semantic_metrics(confusions: list[torch.Tensor], num_classes: int, categories: list[dict]) -> dict:
    result = mean_iou(sum(confusions, torch.zeros(num_classes, num_classes, dtype=torch.int64)))
    names = {c["id"]: c["name"] for c in categories}
    return {"miou": result["miou"], "pixel_acc": result["pixel_acc"],
            "per_class": [{"id": k, "name": names.get(k, f"class {k}"), "iou": _finite(v)}
                          for k, v in enumerate(result["iou"].tolist())]}


def instance_metrics(per_image: list[list[dict]], dataset) -> dict:
    from minseg.coco import coco_eval

    predictions = [r for image in per_image for r in image]
    box, box_per_class = coco_eval(dataset.annotation_file, predictions, "bbox")
    mask, mask_per_class = coco_eval(dataset.annotation_file, predictions, "segm")
    return {"bbox": box, "segm": mask, "predictions": predictions,
            "per_class": [{"id": c["id"], "name": c["name"], "bbox_ap": _finite(box_per_class.get(c["id"], math.nan)),
                           "segm_ap": _finite(mask_per_class.get(c["id"], math.nan))} for c in dataset.categories]}


def panoptic_metrics(per_image: list[dict], categories: list[dict]) -> dict:
    things = {c["id"] for c in categories if c["isthing"]}
    result = panoptic_quality(per_image, things)
    per_class = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"], **result["per_class"][c["id"]]}
                 for c in categories if c["id"] in result["per_class"]]
    return {"all": result["all"], "things": result["things"], "stuff": result["stuff"], "per_class": per_class}


# --- printing and writing ------------------------------------------------------------------------------------

def _number(value) -> str:
    """A fraction in percent; "-" for none (pycocotools' -1: no ground truth of that size)."""
    return "     -" if value is None or value < 0 else f"{100 * value:6.2f}"


def report(metrics: dict, kind: str) -> str:
    """The summary line(s) and the per-class table, in percent."""
    if kind == "semantic":
        lines = [f"mIoU {_number(metrics['miou'])}   pixel accuracy {_number(metrics['pixel_acc'])}", "",
                 f"{'class':<24} {'IoU':>6}"]
        lines += [f"{c['name'][:24]:<24} {_number(c['iou'])}" for c in metrics["per_class"]]
    elif kind == "instances":
        lines = [f"{what:<4} " + "  ".join(f"{k} {_number(v).strip()}" for k, v in metrics[key].items())
                 for what, key in (("box", "bbox"), ("mask", "segm"))]
        lines += ["", f"{'category':<24} {'box AP':>6} {'mask AP':>7}"]
        lines += [f"{c['name'][:24]:<24} {_number(c['bbox_ap'])} {_number(c['segm_ap']):>7}" for c in metrics["per_class"]]
    else:
        lines = [f"{'':<7} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'#':>4}"]
        lines += [f"{k:<7} " + " ".join(_number(metrics[k][m]) for m in ("pq", "sq", "rq")) + f" {metrics[k]['n']:>4}"
                  for k in ("all", "things", "stuff")]
        lines += ["", f"{'category':<24} {'thing':>5} {'PQ':>6} {'SQ':>6} {'RQ':>6} {'TP':>5} {'FP':>5} {'FN':>5}"]
        lines += [f"{c['name'][:24]:<24} {'yes' if c['isthing'] else 'no':>5} " + " ".join(_number(c[m]) for m in ("pq", "sq", "rq"))
                  + f" {c['tp']:>5} {c['fp']:>5} {c['fn']:>5}" for c in metrics["per_class"]]
    return "\n".join(lines)


def write_outputs(out: Path, metrics: dict, predictions: list[dict] | None) -> list[Path]:
    """metrics.json (and predictions.json) into `out`, atomically and together."""
    import json

    from minseg.files import OutputBatch

    out.mkdir(parents=True, exist_ok=True)
    with OutputBatch() as batch:
        batch.add(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1) + "\n"))
        if predictions is not None:
            batch.add(out / "predictions.json", lambda tmp: Path(tmp).write_text(json.dumps(predictions)))
    return batch.paths


def main(args) -> int:
    """The `minseg eval` command (arguments from minseg.cli). Under torchrun only rank 0 reports an error; the
    other processes leave with status 2 silently."""
    import torch.distributed as dist

    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError):
        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(2) from None
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> int:
    import minseg
    from minseg.data import open_dataset
    from minseg.registry import check_name

    check_name(args.model)  # before reading a dataset that may be large
    if args.weights is not None and not Path(args.weights).is_file():
        raise ValueError(f"{args.weights}: no such weights file")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    kind = KIND_OF_FAMILY[family(args.model)]
    dataset = open_dataset(args.data, split=args.split)  # the layout and the json are checked here
    if kind == "instances" and dataset.kind == "instances":
        from minseg.coco import require_pycocotools

        require_pycocotools()
    rank, world = start_distributed(args.device)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" and world > 1 else args.device
    model = minseg.create_model(args.model, weights=args.weights).to(device)
    start = time.perf_counter()
    metrics = evaluate(args.model, model, dataset, rank=rank, world=world)
    seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    predictions = metrics.pop("predictions", None)
    metrics = {"model": args.model, "weights": str(args.weights), "data": str(args.data), "split": args.split,
               "kind": kind, "images": len(dataset), **metrics}
    print(report(metrics, kind))
    print(f"eval: {len(dataset)} images in {seconds:.1f}s ({len(dataset) / seconds:.2f} images/s, {world} "
          f"process{'es' if world > 1 else ''})", file=sys.stderr)
    if out is not None:
        for path in write_outputs(out, metrics, predictions):
            print(f"wrote {path}", file=sys.stderr)
    return 0
