"""Training overhead: the bundle's train.json itself (``SupervisedTrainer``, its transforms, ``CacheDataset``,
weighted sampler, ``DataLoader``, handlers), parsed with MONAI's ``ConfigParser``, against a plain PyTorch loop on
the config's own network, loss, optimizer and ``train#dataloader``, and a plain loop on pre-made tensors (no
loading or augmentation at all). Figures are images over the wall time of ``--train-steps`` steps after
``--train-warmup`` steps, because an epoch pays for every loader stall that a median would hide."""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .bundles import Bundle
from .common import REPO, log, sig, sync, time_calls
from .training_data import TrainingData

OVERHEAD_TARGET_PERCENT = 10.0
# the trainer "starves" when it spends more than this share of its wall time waiting for the next batch
STARVATION_SHARE = 0.05


def training_batch(batch: int, patch: int, stats, seed: int, distance: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-made z-scored synthetic patches and their 3-class targets (with the distance map for 4-output networks)."""
    from nucleiseg_monai.synthetic import make_tile
    from nucleiseg_monai.transforms import ThreeClassTargetd

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in stats)
    to_target = ThreeClassTargetd("label", distance=distance)
    images, targets = [], []
    for i in range(batch):
        rgb, labels = make_tile(patch, seed=seed + i)
        images.append(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32)))
        targets.append(to_target({"label": torch.from_numpy(labels[None])})["label"])
    return (torch.stack(images) - mean) / std, torch.stack(targets)


def plain_training(network, loss_fn, optimizer, x, y, warmup: int, steps: int) -> dict:
    """Images per second of a bare PyTorch loop (zero_grad, forward, loss, backward, step)."""
    device = x.device
    network.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    step_times = time_calls(step, device, 0, steps)
    sync(device)
    wall = time.perf_counter() - t0
    return {"images_per_s": sig(x.shape[0] * steps / wall), "steps": steps, "batch": x.shape[0],
            "median_step_s": sig(statistics.median(step_times)), "wall_s": sig(wall)}


def training_parser(bundle: Bundle, device: torch.device, patch: int, batch: int, data: TrainingData | None,
                    run_dir: Path | None, args):
    """The bundle's train.json as ``monai.bundle run training`` reads it, overridden only where files go (a
    temporary folder, never the bundle's models/), the data (``TrainingData``), the device, patch and batch size,
    and one epoch: the loader long enough for warm-up, timed steps and a loader-alone check, the trainer stopping
    after warm-up and timed steps."""
    iterations = args.train_warmup + args.train_steps
    updates = {"device": f"$torch.device('{device}')", "patch_size": [patch, patch], "batch_size": batch}
    if data is not None:
        updates.update({**data.overrides, "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "runs"),
                        "epochs": 1, "epoch_length": iterations + min(args.train_steps, 5) + 1,
                        "train#trainer#epoch_length": iterations})
    return bundle.parser(updates)


@contextmanager
def config_determinism(parser) -> Iterator[None]:
    """Run the config's ``initialize`` (determinism, folders), then undo its global settings."""
    from monai.utils import set_determinism

    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        parser.get_parsed_content("initialize")
        yield
    finally:  # the config's set_determinism must not leak into the figures measured after this one
        set_determinism(None)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def plain_tensors(bundle: Bundle, device: torch.device, patch: int, batch: int, stats, args) -> dict:
    """The config's own network, loss and optimizer driven by a bare loop over pre-made tensors: the network's
    ceiling, with no data loading or augmentation at all."""
    parser = training_parser(bundle, device, patch, batch, None, None, args)
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    x, y = training_batch(batch, patch, stats, args.seed, parser.get_parsed_content("network_def").out_channels > 3)
    return plain_training(network, loss_fn, optimizer, x.to(device), y.to(device), args.train_warmup,
                          args.train_steps)


def plain_loader(bundle: Bundle, device: torch.device, patch: int, batch: int, data: TrainingData, run_dir: Path,
                 args) -> dict:
    """A bare PyTorch loop on the same network and data as the pipeline: the config's own ``train#dataloader``
    (dataset, cache, augmentation, sampler, workers), network, loss and optimizer; no engine, handlers or events."""
    parser = training_parser(bundle, device, patch, batch, data, run_dir, args)
    with config_determinism(parser):
        network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        loader = parser.get_parsed_content("train#dataloader")
        network.train()
        batches = iter(loader)
        done, wait = [], 0.0
        for i in range(args.train_warmup + args.train_steps):
            t0 = time.perf_counter()
            item = next(batches)
            if i >= args.train_warmup:
                wait += time.perf_counter() - t0
            x, y = item["image"].to(device), item["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(x), y)
            loss.backward()
            optimizer.step()
            sync(device)
            done.append(time.perf_counter())
        del batches
    wall = done[-1] - done[args.train_warmup - 1]
    return {"images_per_s": sig(batch * args.train_steps / wall), "steps": args.train_steps, "batch": batch,
            "median_step_s": sig(statistics.median(np.diff(done[args.train_warmup - 1:]))),
            "wall_s": sig(wall), "data_wait_share": sig(wait / wall, 3)}


class IterationClock:
    """Ignite handler: where each trainer iteration's wall time goes.

    ``fetch``: waiting for the data loader's next batch; ``step``: ITERATION_STARTED to MODEL_COMPLETED (batch to
    device, forward, loss, backward, optimizer step, then MONAI's decollate, which runs on MODEL_COMPLETED before
    this clock); ``done``: ITERATION_COMPLETED after the bundle's own handlers (logging, progress bar).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.fetch_start: list[float] = []
        self.fetch_end: list[float] = []
        self.start: list[float] = []
        self.model_done: list[float] = []
        self.done: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        stamp = time.perf_counter
        engine.add_event_handler(Events.GET_BATCH_STARTED, lambda e: self.fetch_start.append(stamp()))
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, lambda e: self.fetch_end.append(stamp()))
        engine.add_event_handler(Events.ITERATION_STARTED, lambda e: self.start.append(stamp()))
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: self._synced(self.model_done))
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self._synced(self.done))

    def _synced(self, stamps: list[float]) -> None:
        sync(self.device)
        stamps.append(time.perf_counter())

    def window(self, first: int, last: int) -> dict[str, float]:
        """Seconds of iterations first..last (0-based, inclusive), measured from the end of iteration first - 1."""
        wall = self.done[last] - self.done[first - 1]
        parts = {
            "data_wait": sum(self.fetch_end[i] - self.fetch_start[i] for i in range(first, last + 1)),
            "step": sum(self.model_done[i] - self.start[i] for i in range(first, last + 1)),
            "handlers": sum(self.done[i] - self.model_done[i] for i in range(first, last + 1)),
        }
        parts["engine_rest"] = wall - sum(parts.values())
        return {"wall": wall, **parts}


def pipeline(bundle: Bundle, device: torch.device, patch: int, batch: int, data: TrainingData, run_dir: Path,
             args) -> dict:
    """Images per second of the bundle's train.json as ``monai.bundle run training`` builds it (see
    ``training_parser`` for what is overridden)."""
    parser = training_parser(bundle, device, patch, batch, data, run_dir, args)
    warmup, iterations = args.train_warmup, args.train_warmup + args.train_steps
    t0 = time.perf_counter()
    with config_determinism(parser):  # as `monai.bundle run` does: determinism, folders, early stop
        trainer = parser.get_parsed_content("train#trainer")
        setup = time.perf_counter() - t0
        clock = IterationClock(device)
        clock.attach(trainer)
        trainer.run()
        # the loader alone, with the trainer idle: the fastest it can supply batches
        batches = iter(parser.get_parsed_content("train#dataloader"))
        supply = time_calls(functools.partial(next, batches), torch.device("cpu"), 1, min(args.train_steps, 5))
    if len(clock.done) < iterations:
        raise RuntimeError(f"{bundle.name}: the trainer ran {len(clock.done)} of {iterations} iterations")
    parts = clock.window(warmup, iterations - 1)
    wall = parts["wall"]
    return {
        "images_per_s": sig(batch * args.train_steps / wall), "steps": args.train_steps, "batch": batch,
        "median_iteration_s": sig(statistics.median(np.diff(clock.done[warmup - 1:iterations]))),
        "wall_s": sig(wall),
        "seconds": {k: sig(v) for k, v in parts.items() if k != "wall"},
        "share": {k: sig(v / wall, 3) for k, v in parts.items() if k != "wall"},
        "data_wait_share": sig(parts["data_wait"] / wall, 3),
        "loader_starves_network": parts["data_wait"] / wall > STARVATION_SHARE,
        "loader_alone_images_per_s": sig(batch / statistics.median(supply)),
        "setup_s": sig(setup),
        "num_workers": parser.get_parsed_content("num_workers"),
        "epoch_length": parser.get("epoch_length"),
        "config": str(bundle.train_config.relative_to(REPO) if bundle.train_config.is_relative_to(REPO)
                      else bundle.train_config),
    }


def training(bundle: Bundle, device: torch.device, data: TrainingData, ref_images_per_s: float, args, memory,
             workdir: Path) -> dict:
    """The bundle's pipeline against the plain loops, and against the reference's training images per second."""
    patch, batch = args.train_patch or bundle.patch_size, args.train_batch or bundle.batch_size
    tag = device.type
    with memory.phase(f"{tag}:train:{bundle.name}:plain_tensors"):
        tensors = plain_tensors(bundle, device, patch, batch, data.channel_stats, args)
    # Plain loop and pipeline alternate, round after round, and each keeps its fastest round: on a shared 2-core
    # machine a neighbour's burst slows one run by 20% or more, and noise only ever slows a run down.
    rounds: dict[str, list[dict]] = {"plain": [], "pipeline": []}
    for k in range(args.train_rounds):
        run_dir = workdir / f"train_{bundle.name}_{tag}_{k}"
        with memory.phase(f"{tag}:train:{bundle.name}:plain"):
            rounds["plain"].append(plain_loader(bundle, device, patch, batch, data, run_dir / "plain", args))
            gc.collect()  # the plain loop's persistent loader worker must be gone before the pipeline runs
        with memory.phase(f"{tag}:train:{bundle.name}:pipeline"):
            rounds["pipeline"].append(pipeline(bundle, device, patch, batch, data, run_dir / "pipeline", args))
            gc.collect()
    plain, piped = (max(rounds[key], key=lambda r: r["images_per_s"]) for key in ("plain", "pipeline"))
    overhead = sig((plain["images_per_s"] / piped["images_per_s"] - 1.0) * 100.0)
    data_cost = sig((tensors["images_per_s"] / piped["images_per_s"] - 1.0) * 100.0)
    log(f"[{tag}] {bundle.name} training: plain loop on the same loader {plain['images_per_s']:.3f} images/s, "
        f"pipeline {piped['images_per_s']:.3f} images/s (best of {args.train_rounds} alternating rounds), "
        f"overhead {overhead:.1f}%, waiting on data {100 * piped['data_wait_share']:.1f}% of the time; "
        f"plain loop on pre-made tensors {tensors['images_per_s']:.3f} images/s ({data_cost:.1f}% above the "
        f"pipeline)")
    return {
        "patch": patch, "batch": batch, "data": data.description["data"], "tiles": data.description["tiles"],
        "plain": plain, "pipeline": piped, "plain_tensors": tensors,
        "rounds_images_per_s": {key: [r["images_per_s"] for r in runs] for key, runs in rounds.items()},
        # the MONAI/ignite engine, handlers and events over a bare loop on the same network and data
        "overhead_percent": overhead, "overhead_target_percent": OVERHEAD_TARGET_PERCENT,
        "within_target": overhead <= OVERHEAD_TARGET_PERCENT,
        # the same inside the pipeline's own iterations: engine and handler time outside the step
        "engine_and_handlers_share": sig(piped["share"]["handlers"] + piped["share"]["engine_rest"], 3),
        # what loading and augmenting on the fly (in workers on the same cores) costs against no data at all
        "pretensor_over_pipeline_percent": data_cost,
        "pipeline_step_over_plain_step": sig(piped["seconds"]["step"] / piped["steps"] / tensors["median_step_s"], 3),
        # what a user gets: the bundle's pipeline against the reference network's plain loop
        "ratio_to_reference": sig(piped["images_per_s"] / ref_images_per_s),
    }
