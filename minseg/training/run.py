"""`minseg train`: the training loop around a model, a dataset and its family's recipe.

    1. check everything (model, dataset, every sample, labels) before anything is written to --out
    2. build or restore the model, optimiser and RNG states; wrap it in DDP under torchrun
    3. each step: the step's samples (a function of the seed and the step), augmented, the family's loss,
       backward, optimiser step with the scheduled lr; log; save every --save-every steps and at the end

The data order is torch's DistributedSampler (a permutation seeded by seed + epoch, rank r reading positions
r, r + N, ...), and each sample's augmentation draws from a generator seeded by (seed, epoch, its position):
so one process with batch B*N sees the same augmented samples in each step as N processes with batch B, and a
resumed run sees exactly those of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from minseg import registry
from minseg.training import adapters, distributed, optim, state
from minseg.training.log import Progress, read_jsonl

DEFAULT_EPOCHS = {"semantic": 30, "maskrcnn": 26, "unet": 40, "panoptic_fpn": 37, "yolact": 54}  # the originals'
DEFAULT_IMAGE_SIZE = {"semantic": 520, "unet": 320, "maskrcnn": 800, "panoptic_fpn": 800}  # yolact: the model's


@dataclasses.dataclass
class Settings:
    """The command line of `minseg train` (see minseg/cli.py for each option's meaning)."""
    model: str
    data: str
    out: str
    weights: str | None = None
    num_classes: int | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 2
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    resume: bool = False
    split: str | None = None
    workers: int = 0
    augment: bool = True
    image_size: int | None = None
    options: dict | None = None  # create_model options of a fresh run (e.g. Panoptic FPN's norm, freeze_at)
    freeze_bn: bool = False
    dropout: bool = True
    sync_bn: bool = False
    log_every: int = 10
    save_every: int = 1000
    check_replicas: bool = False


class Augmented(torch.utils.data.Dataset):
    """dataset[(index, sample_seed)] -> the family's augmented (image, target)."""

    def __init__(self, dataset, recipe: adapters.Recipe):
        self.dataset, self.recipe = dataset, recipe

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        image, target, _ = self.dataset[index]
        return adapters.augment(self.recipe, image, target, torch.Generator().manual_seed(seed))


def as_list(batch: list) -> list:
    return batch


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) & (2 ** 63 - 1)


def check_samples(dataset, world: distributed.World) -> None:
    """Read every sample of this rank's shard; the first problem of any rank (a DataError naming its file) stops
    every rank."""
    from minseg.errors import DataError

    problem = None
    for i in range(world.rank, len(dataset), world.size):
        try:
            dataset[i]
        except DataError as e:
            problem = str(e)
            break
    problems = [p for p in distributed.gather(problem, world) if p]
    if problems:
        raise DataError(problems[0])


def epoch_batches(sampler: DistributedSampler, epoch: int, seed: int, batch: int, world: distributed.World,
                  first: int) -> list[list[tuple[int, int]]]:
    """This rank's batches of epoch `epoch` from batch `first` on, as (index, sample seed) pairs."""
    sampler.set_epoch(epoch)
    indices = list(sampler)
    steps = len(indices) // batch
    return [[(indices[p], sample_seed(seed, epoch, world.rank + world.size * p))
             for p in range(b * batch, (b + 1) * batch)] for b in range(first, steps)]


def digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes: equal exactly when the replicas are bitwise equal."""
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(s: Settings, *, stop_after: int | None = None) -> Path:
    """Run (or resume) a training run as `s` describes; returns --out. stop_after: end after that step as an
    interrupted run would (its state saved), which is how the tests interrupt a run."""
    from minseg.data import open_dataset
    from minseg.data.labels import label_map
    from minseg.errors import CheckpointError

    registry.check_name(s.model)
    family = adapters.family_of(s.model)
    out = Path(s.out)
    world = distributed.setup(torch.device(s.device))
    saved, log = None, []
    if s.resume:
        saved, weights, log_text = state.load_run(out)
        if saved["config"]["model"] != s.model:
            raise CheckpointError(f"{out}: holds a {saved['config']['model']} run, not {s.model}")
        fields = {f.name for f in dataclasses.fields(Settings)}
        kept = {k: v for k, v in saved["config"].items() if k in fields}  # the run's settings, as it began
        now = {k: getattr(s, k) for k in ("data", "split", "device", "workers", "log_every", "save_every",
                                          "check_replicas")}
        length = {"steps": s.steps, "epochs": s.epochs} if s.steps or s.epochs else {"steps": saved["total"]}
        s = Settings(**{**kept, **now, **length, "out": s.out, "resume": True})
        log = read_jsonl(log_text, saved["step"])
    elif any((out / f).exists() for f in state.RUN_FILES):
        raise ValueError(f"{out}: already holds a training run; use --resume, or another --out")

    # 1. the dataset, every sample checked, before --out is touched
    dataset = open_dataset(s.data, split=s.split)
    if dataset.kind != adapters.DATASET_KIND[family]:
        wanted = adapters.DATASET_KIND[family]
        raise ValueError(f"{s.data}: a {dataset.kind} dataset; {s.model} trains on {wanted} data")
    needed = adapters.classes_needed(family, dataset.categories)
    overrides = dict(saved["config"]["overrides"]) if saved else dict(s.options or {})
    if not saved and family == "semantic" and s.weights is None:
        overrides["aux_loss"] = True  # torchvision's reference trains FCN / DeepLabV3 with --aux-loss
    if not saved and s.image_size and family == "maskrcnn":  # the model resizes: min_size, max_size scaled alike
        overrides.update(min_size=s.image_size, max_size=round(s.image_size * 1333 / 800))
    if not saved and s.image_size and family == "panoptic_fpn":  # predict()'s test resize, scaled alike
        overrides.update(min_size_test=s.image_size, max_size_test=round(s.image_size * 1333 / 800))
    if not saved and family == "yolact":  # its input side (prior scales follow); train.py's BatchNorm rule
        overrides.update({"max_size": s.image_size} if s.image_size else {})
        overrides["freeze_bn"] = s.freeze_bn or s.batch_size < 6  # frozen below 6 images per GPU
    num_classes = s.num_classes
    if num_classes is None and s.weights is None and not saved:
        if needed == 0:
            raise ValueError(f"{s.data}: no classes.txt names the classes; pass --num-classes")
        num_classes = needed
    torch.manual_seed(s.seed)  # the same initial weights on every rank
    if saved:
        model = state.restore_model(s.model, overrides, weights, out)
    else:
        model, overrides = state.start_model(s.model, s.weights, num_classes, overrides)
    C = registry.model_config(s.model, **overrides).num_classes
    if family in ("semantic", "unet"):  # reopened to bound the mask labels (binary U-Net: 0 and 1)
        dataset = open_dataset(s.data, split=s.split, num_classes=max(C, 2))
    elif needed > C:
        raise ValueError(f"{s.data}: its categories need num_classes={needed}, {s.model} has {C}; "
                         f"pass --num-classes {needed}")
    size = model.cfg.max_size if family == "yolact" else s.image_size or DEFAULT_IMAGE_SIZE[family]
    recipe = adapters.Recipe(family, label_map(s.model, dataset.categories), C, s.augment, size)
    check_samples(dataset, world)
    images = len(dataset)
    if family not in ("semantic", "unet"):  # as the original's training set: images without an object left out
        kept = [i for i in range(images) if adapters.trains_on(family, dataset.objects(i))]
        dataset = torch.utils.data.Subset(dataset, kept)
        if not dataset:
            raise ValueError(f"{s.data}: none of its {images} images holds an object {s.model} trains on")

    # 2. model, optimiser, data order
    model.to(world.device).train()
    if s.freeze_bn:  # BatchNorm as a frozen affine map: running statistics, no gradient (torchvision's FrozenBN)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
                m.requires_grad_(False)
    if not s.dropout:  # dropout off (eval mode): a forward with no random draw
        for m in model.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.eval()
    core = model
    model = distributed.wrap(model, world, s.sync_bn, find_unused=family not in ("semantic", "unet"))
    global_batch = s.batch_size * world.size
    lr = s.lr if s.lr is not None else optim.default_lr(family, global_batch)
    optimizer = optim.build_optimizer(family, core, lr)
    scaler = torch.amp.GradScaler("cuda") if s.amp and world.device.type == "cuda" else None
    sampler = DistributedSampler(range(len(dataset)), num_replicas=world.size, rank=world.rank, shuffle=True,
                                 seed=s.seed, drop_last=True)
    per_epoch = len(sampler) // s.batch_size
    if per_epoch == 0:
        raise ValueError(f"{s.data}: {len(dataset)} images to train on, fewer than one batch of {global_batch}")
    total = s.steps or (s.epochs or DEFAULT_EPOCHS[family]) * per_epoch
    step = 0
    if saved:
        step = saved["step"]
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"][world.rank % len(saved["rng"])])
    else:
        torch.manual_seed(s.seed + world.rank)  # each rank its own draws (anchor and proposal sampling)
    config = {**{k: v for k, v in dataclasses.asdict(s).items() if k not in ("steps", "epochs")},
              "overrides": overrides, "lr": lr, "image_size": size}
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        dropped = images - len(dataset)
        left_out = f", {dropped} without objects left out as the original's" if dropped else ""
        print(f"minseg train: {s.model} on {len(dataset)} images ({adapters.DATASET_KIND[family]}{left_out}), "
              f"{world.size} process(es) x batch {s.batch_size}, {total} steps ({per_epoch} per epoch), lr {lr:g}, "
              f"from step {step}", file=sys.stderr)
    saved_at = step

    def save(at: int) -> None:
        nonlocal saved_at
        saved_at = at
        rng = distributed.gather(torch.get_rng_state(), world)
        if world.main:
            run_state = {"step": at, "total": total, "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler else None, "rng": rng, "config": config}
            state.save_run(out, core, s.model, overrides, run_state, log)
        distributed.barrier(world)

    # 3. the steps
    progress = Progress(total, step, global_batch)
    low = torch.bfloat16 if world.device.type == "cpu" else torch.float16
    autocast = torch.autocast(world.device.type, dtype=low, enabled=s.amp)
    try:
        while step < total:
            epoch = step // per_epoch
            batches = epoch_batches(sampler, epoch, s.seed, s.batch_size, world, step % per_epoch)
            # its own generator: a DataLoader seeds its workers from the global one otherwise, one draw per epoch,
            # and a run resumed mid-epoch would then draw differently from an uninterrupted one
            loader = DataLoader(Augmented(dataset, recipe), batch_sampler=batches[:total - step], collate_fn=as_list,
                                num_workers=s.workers, generator=torch.Generator().manual_seed(s.seed + epoch))
            t_data = time.perf_counter()
            for batch in loader:
                t0 = time.perf_counter()
                current = optim.set_lr(optimizer, family, lr, step, total)
                with autocast:
                    losses = adapters.LOSSES[family](model, recipe, batch, world.device)
                loss = sum(losses.values())
                if not torch.isfinite(loss):  # torchvision's references stop here too
                    raise ValueError(f"loss is {loss.item()} at step {step + 1}; stopping (try a lower --lr)")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                step += 1
                if s.check_replicas and len(set(distributed.gather(digest(core), world))) > 1:
                    raise RuntimeError(f"the ranks' weights differ after step {step}")
                if step % s.log_every == 0 or step == total:
                    values = {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}
                    values = distributed.mean_of(values, world)
                    line = {"step": step, **values, "lr": current, "seconds": round(time.perf_counter() - t0, 4),
                            "data_seconds": round(t0 - t_data, 4)}
                    log.append(line)
                    if world.main:
                        progress.show(line)
                if step % s.save_every == 0 or step == total or step == stop_after:
                    save(step)
                if step == stop_after:
                    return out
                t_data = time.perf_counter()
    except KeyboardInterrupt:  # not saved here: Ctrl-C may land inside optimizer.step(), half the weights updated
        if world.main and saved_at:
            print(f"minseg train: interrupted; {out} holds step {saved_at} (continue with --resume)", file=sys.stderr)
        raise
    finally:
        distributed.teardown(world)
    return out
