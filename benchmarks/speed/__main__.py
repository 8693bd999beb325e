"""``python -m benchmarks.speed``: every benchmark of the package in one run, results to JSON and the console."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __doc__ as PACKAGE_DOC
from .bundles import Bundle, load_bundle
from .common import DEFAULT_STATS, REPO, Phases, attempt, environment, log, ratio, sig, tiles
from .end_to_end import end_to_end, end_to_end_levers
from .inputs import Image, cryonuseg_image, synthetic_image
from .levers import levers
from .network import network_only
from .reference import forward as reference_forward
from .reference import train as reference_train
from .report import summary_lines
from .training import training
from .training_data import TrainingData, training_data

DEFAULT_BUNDLES = ("nuclei_unet_small", "nuclei_unet_full")


def device_section(device: torch.device, bundles: list[Bundle], args, memory: Phases, workdir: Path,
                   images: list[Image], data: TrainingData | None, errors: list[str]) -> dict:
    tag = device.type
    section: dict = {"device": str(device), "bundles": {}}
    x = tiles(args.batch, args.tile, device)

    log(f"[{tag}] reference forward: UNet 64-512, float32, no_grad, {args.batch} x {args.tile}^2 tiles")
    with memory.phase(f"{tag}:reference_forward"):
        reference = reference_forward(device, x, args)
    section["reference"] = {"forward": reference}
    ref_mp = reference["mp_per_s"]
    log(f"[{tag}] reference forward: {ref_mp:.3f} MP/s")

    def against_reference(figures: dict, label: str) -> dict:
        figures["ratio_to_reference"] = ratio(figures["mp_per_s"], ref_mp)
        log(f"[{tag}] {label}: {figures['mp_per_s']:.3f} MP/s ({figures['ratio_to_reference']:.2f}x reference)")
        return figures

    for bundle in bundles:
        entry: dict = {"weights": bundle.weights_note, "features": bundle.features,
                       "inference_settings": bundle.settings,
                       "inference_settings_source": f"{bundle.root.name}/configs/inference.json#predictor"}
        section["bundles"][bundle.name] = entry
        with memory.phase(f"{tag}:{bundle.name}:network_only"):
            entry["network_only"] = attempt(errors, f"{tag} {bundle.name} network only", lambda: against_reference(
                network_only(bundle, device, x, args), f"{bundle.name} network only"))
        for image in images:
            key = "end_to_end" if image.name == "synthetic" else f"end_to_end_{image.name}"
            with memory.phase(f"{tag}:{bundle.name}:{key}"):
                entry[key] = attempt(errors, f"{tag} {bundle.name} {key}", lambda: against_reference(
                    end_to_end(bundle, device, image, args, workdir), f"{bundle.name} end to end on {image.name}"))
        if not args.skip_levers and bundle.name == args.lever_bundle and images and entry.get(key):
            image = images[-1]  # real tissue where the sources are present
            log(f"[{tag}] end-to-end levers of {bundle.name} on {image.name}")
            with memory.phase(f"{tag}:{bundle.name}:end_to_end_levers"):
                entry["end_to_end_levers"] = attempt(errors, f"{tag} {bundle.name} end-to-end levers", lambda: [
                    {**row, "ratio_to_reference": ratio(row["mp_per_s"], ref_mp)} for row in end_to_end_levers(
                        bundle, device, image, args, workdir, entry[key]["mp_per_s"])])

    if not args.skip_levers:
        lever_bundle = next((b for b in bundles if b.name == args.lever_bundle), None)
        if lever_bundle is None:
            section["levers"] = {"skipped": f"bundle {args.lever_bundle} not benchmarked"}
        else:
            log(f"[{tag}] lever table on {lever_bundle.name}")
            with memory.phase(f"{tag}:levers"):
                section["levers"] = attempt(errors, f"{tag} levers", lambda: levers(lever_bundle, device, args))

    if data is None:
        return section
    patch = args.train_patch or (bundles[0].patch_size if bundles else 256)
    batch = args.train_batch or (bundles[0].batch_size if bundles else 8)
    log(f"[{tag}] training: reference UNet float32, batch {batch}, patch {patch}")
    with memory.phase(f"{tag}:train:reference"):
        section["reference"]["train"] = ref_train = reference_train(device, batch, patch, data.channel_stats, args)
    log(f"[{tag}] reference training: {ref_train['images_per_s']:.3f} images/s")
    for bundle in bundles:
        section["bundles"][bundle.name]["train"] = attempt(
            errors, f"{tag} {bundle.name} training",
            lambda: training(bundle, device, data, ref_train["images_per_s"], args, memory, workdir))
    return section


def make_inputs(args, bundles: list[Bundle], workdir: Path) -> tuple[list[Image], TrainingData | None, dict]:
    """The end-to-end images and the training data, with what each is and how long it took to make."""
    from nucleiseg_monai.sources import default_data_root

    setup: dict = {}
    images: list[Image] = []
    root = bundles[0].root if bundles else args.bundles_dir / DEFAULT_BUNDLES[0]
    if not args.skip_e2e:
        image, setup["slide"] = synthetic_image(args.size, args.seed, workdir)
        images.append(image)
        cryonuseg = Path(default_data_root(root)) / "cryonuseg"
        if cryonuseg.is_dir() and not args.synthetic_data:
            image, setup["cryonuseg_tile"] = cryonuseg_image(cryonuseg, args.size, workdir)
            images.append(image)
        else:
            setup["cryonuseg_tile"] = {"skipped": f"{cryonuseg} does not exist" if not cryonuseg.is_dir()
                                       else "--synthetic-data"}
    data = None
    if not args.skip_train:
        data = training_data(root, args, workdir)
        setup["dataset"] = data.description
    stats = data.channel_stats if data else (bundles[0].stats if bundles and bundles[0].stats else DEFAULT_STATS)
    setup["channel_stats"] = {"mean": list(stats[0]), "std": list(stats[1])}
    return images, data, setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=PACKAGE_DOC.split("\n\n")[0])
    add = p.add_argument
    add("--quick", action="store_true", help="tiny sizes and one repeat: a smoke test, not a benchmark")
    add("--bundles", nargs="+", default=list(DEFAULT_BUNDLES), help="bundle names (default: %(default)s)")
    add("--bundles-dir", type=Path, default=REPO / "bundles", help="where the bundles are (default: %(default)s)")
    add("--lever-bundle", default="nuclei_unet_small", help="bundle for the lever table (default: %(default)s)")
    add("--size", type=int, default=4096, help="side of the end-to-end images (default: %(default)s)")
    add("--tile", type=int, default=512, help="tile side of network-only figures (default: %(default)s)")
    add("--batch", type=int, default=4, help="tiles per forward of network-only figures (default: %(default)s)")
    add("--repeats", type=int, default=5, help="timed calls per inference figure (default: %(default)s)")
    add("--warmup", type=int, default=2, help="untimed calls before them (default: %(default)s)")
    add("--e2e-repeats", type=int, default=2, help="timed end-to-end runs per bundle and image (default: %(default)s)")
    add("--threads", type=int, default=None, help=f"torch threads (default: all {cpus} cores; 1 with --quick)")
    add("--train-steps", type=int, default=10, help="timed training steps (default: %(default)s)")
    add("--train-warmup", type=int, default=3, help="untimed training steps first, >= 1 (default: %(default)s)")
    add("--train-rounds", type=int, default=2,
        help="alternating rounds of plain loop and pipeline; each keeps its fastest (default: %(default)s)")
    add("--train-patch", type=int, default=None, help="training patch side (default: the bundle's patch_size)")
    add("--train-batch", type=int, default=None, help="training batch size (default: the bundle's batch_size)")
    add("--train-tiles", type=int, default=10,
        help="training tiles per source, and synthetic tiles when the sources are absent (default: %(default)s)")
    add("--train-tile", type=int, default=512, help="side of synthetic tiles, as CryoNuSeg's (default: %(default)s)")
    add("--synthetic-data", action="store_true",
        help="synthetic training data and no CryoNuSeg tile even where shared/datasets holds the real sources")
    add("--skip-train", action="store_true", help="no training figures")
    add("--skip-e2e", action="store_true", help="no end-to-end figures")
    add("--skip-levers", action="store_true", help="no lever table")
    add("--no-compile", dest="compile", action="store_false", help="leave torch.compile out of the levers")
    add("--cpu-only", action="store_true", help="no CUDA section even where a GPU is present")
    add("--seed", type=int, default=0, help="synthetic data seed (default: %(default)s)")
    add("--output", type=Path, default=REPO / "benchmarks" / "results" / "speed.json",
        help="JSON results (default: benchmarks/results/speed.json)")
    add("--predictor-overrides", type=json.loads, default={}, metavar="JSON",
        help="keywords of SlidePredictor.from_bundle for the end-to-end runs, e.g. '{\"region_size\": 1536}'")
    args = p.parse_args(argv)
    if args.threads is None:  # one thread keeps the smoke test steady on a busy machine
        args.threads = 1 if args.quick else cpus
    if args.quick:
        # tiny everything; several regions so that stitching still runs
        args.size, args.tile, args.batch, args.repeats, args.warmup, args.e2e_repeats = 256, 64, 2, 1, 1, 1
        args.train_steps, args.train_warmup, args.train_patch, args.train_batch = 2, 1, 64, 2
        args.train_tiles, args.train_tile, args.compile, args.train_rounds = 6, 96, False, 1
        args.predictor_overrides = {"roi_size": 64, "region_size": 128, "region_margin": 32,
                                    **args.predictor_overrides}
    for name in ("size", "tile", "batch", "repeats", "e2e_repeats", "threads", "train_steps", "train_warmup",
                 "train_tiles", "train_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.tile % 16:
        p.error(f"--tile must be a multiple of 16 (the 4-pooling U-Net needs it), got {args.tile}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    memory = Phases()
    results: dict = {
        "environment": environment(args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": "inference: median of --repeats calls after --warmup calls (CUDA events on GPU); training: "
                  "images over the wall time of --train-steps steps after --train-warmup steps; ratios are "
                  "figure / reference figure on the same device in the same run",
        "notes": [],
        "errors": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nucleiseg_speed_") as tmp:
        workdir = Path(tmp)
        # OpenVINO models made in this run only: every run starts as a first run on a new machine would
        os.environ["NUCLEISEG_CACHE_DIR"] = str(workdir / "cache")
        bundles: list[Bundle] = []
        for name in args.bundles:
            loaded = load_bundle(args.bundles_dir, name, workdir)
            if isinstance(loaded, str):
                results["notes"].append(f"{name} skipped: {loaded}")
                log(f"{name} skipped: {loaded}")
            else:
                bundles.append(loaded)
        with memory.phase("setup:inputs"):
            images, data, results["setup"] = make_inputs(args, bundles, workdir)
        devices = [torch.device("cpu")]
        if torch.cuda.is_available() and not args.cpu_only:
            devices.append(torch.device("cuda"))
        for device in devices:
            results[device.type] = device_section(device, bundles, args, memory, workdir, images, data,
                                                  results["errors"])
    results["memory"] = memory.report()
    results["phase_seconds"] = memory.seconds
    results["total_seconds"] = sig(time.perf_counter() - started)
    from nucleiseg_monai.atomic import write_json_atomic

    write_json_atomic(results, args.output)
    print("\n".join(summary_lines(results)))
    print(f"results written to {args.output}")
    for error in results["errors"]:
        print(f"FAILED {error}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
