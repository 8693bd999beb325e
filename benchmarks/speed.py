#!/usr/bin/env python
"""Speed of nucleiseg-monai, measured side by side in one run, to a JSON file and the console.

1. reference: the reference notebooks' U-Net (64-512 features, 3 poolings) as a plain float32 PyTorch forward;
2. per bundle: network-only and end-to-end (file -> all outputs, ``SlidePredictor``) megapixels per second, each
   also as a ratio to the reference measured in the same run;
3. a lever table for the small bundle's network (precision, layout, graph capture, threads, tile, batch) and the
   cost of post-processing per megapixel;
4. training images per second: the bundle's own MONAI/ignite config vs a plain PyTorch loop on the same network
   and the same DataLoader (the pipeline's overhead), how long the trainer waits on its data loader, and a plain
   loop on pre-made tensors (what loading and augmenting on the fly costs);
5. peak resident memory per phase; 6. on CUDA (when present) the same figures again with CUDA events.

Method: warm-up calls, then the median of ``--repeats`` timed calls (inference); training figures are images over
the wall time of ``--train-steps`` steps after ``--train-warmup`` steps, because an epoch pays for every loader
stall that a median would hide. Run from the repository root::

    python benchmarks/speed.py                      # full size (about 20-30 min on 2 CPU cores)
    python benchmarks/speed.py --quick --output /tmp/speed.json   # tiny sizes, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLES = ("nuclei_unet_small", "nuclei_unet_full")
OVERHEAD_TARGET_PERCENT = 10.0
# the trainer "starves" when it spends more than this share of its wall time waiting for the next batch
STARVATION_SHARE = 0.05
# network widths compared in the lever table (the bundle's own is skipped): 0.2.0's small bundle (16-128), 0.1.0's
# (24-192), double, half and a 2-pooling variant
VARIANT_FEATURES = ((24, 48, 96, 192), (32, 64, 128, 256), (8, 16, 32, 64), (16, 32, 64, 128), (16, 32, 64))
# SlidePredictor keywords a bundle's inference config may set; anything else there (network, paths) is not speed
PREDICTOR_KEYS = ("roi_size", "overlap", "sw_batch_size", "padding_mode", "region_size", "region_margin",
                  "postprocess_params", "amp", "channels_last", "runtime", "jit", "prefetch", "tissue_threshold", "label_tile",
                  "compression")


# ------------------------------------------------------------------------------------------------ timing, memory

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def sig(x: float, digits: int = 4) -> float:
    """Round to significant digits; ratios are computed from the rounded figures, so the JSON is consistent."""
    return float(f"{x:.{digits}g}") if x and math.isfinite(x) else x


def rate(amount: float, times: list[float], unit: str) -> dict:
    """``amount`` (megapixels or images) per call over the median call time."""
    median = statistics.median(times)
    return {f"{unit}_per_s": sig(amount / median), "median_s": sig(median), "min_s": sig(min(times)),
            "repeats": len(times)}


def ratio(a: float, b: float) -> float:
    return sig(a / b)


class Phases:
    """Wall time and peak resident memory per phase (VmHWM after resetting it via /proc/self/clear_refs)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.cuda_peaks: dict[str, float] = {}
        self.overall_mb = self._ru_maxrss_mb()
        self.resettable = self._reset()

    @staticmethod
    def _ru_maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm_mb() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
        return None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        # the reset also lowers ru_maxrss, so the overall peak is kept here across resets
        self.overall_mb = max(self.overall_mb, self._ru_maxrss_mb())
        if self.resettable:
            self._reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = sig(time.perf_counter() - t0, 3)
            if torch.cuda.is_available():
                self.cuda_peaks[name] = sig(torch.cuda.max_memory_allocated() / 2**20)
            peak = self._hwm_mb() if self.resettable else None
            self.peaks[name] = sig(peak if peak is not None else self._ru_maxrss_mb())
            self.overall_mb = max(self.overall_mb, self._ru_maxrss_mb())

    def report(self) -> dict:
        self.overall_mb = max(self.overall_mb, self._ru_maxrss_mb())
        return {
            "peak_rss_mb": sig(self.overall_mb),
            "phase_peak_rss_mb": self.peaks,
            **({"phase_peak_cuda_allocated_mb": self.cuda_peaks} if self.cuda_peaks else {}),
            "children_peak_rss_mb": sig(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0),
            "method": ("per phase: VmHWM after resetting it (/proc/self/clear_refs 5) at the phase start"
                       if self.resettable else "per phase: ru_maxrss so far (cannot reset the peak here)")
                      + "; children: finished data-loader workers (ru_maxrss of RUSAGE_CHILDREN)",
        }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ environment

def environment(threads: int) -> dict:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # not Linux
        pass
    model = model or platform.processor() or platform.machine()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # private, but what oneDNN itself checks
    except (AttributeError, RuntimeError):
        bf16 = None
    import monai

    env = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16,
        "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        env["cuda_version"] = torch.version.cuda
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32  # the float32 reference convolutions use it
    return env


# ------------------------------------------------------------------------------------------------ bundles

@dataclass
class Bundle:
    """What the benchmark needs from a bundle: its network, weights, channel stats and inference settings."""

    name: str
    root: Path
    train_config: Path
    features: list[int]
    weights: Path | None
    weights_note: str
    stats: tuple[list[float], list[float]] | None
    predictor: dict = field(default_factory=dict)
    predictor_source: str = ""
    patch_size: int = 256
    batch_size: int = 8

    def parser(self):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(self.train_config))
        parser.read_meta(str(self.train_config.parent / "metadata.json"))
        return parser

    def network(self) -> torch.nn.Module:
        """A fresh network from the config's ``network_def``, with the trained weights when there are some."""
        from nucleiseg_monai.networks import load_weights

        net = self.parser().get_parsed_content("network_def", lazy=False)
        if self.weights is not None:
            load_weights(net, self.weights)
        return net.eval()


def _find_target(config: object, suffix: str, prefix: str = "") -> str | None:
    """Config id (``a#b``) of the first dict whose ``_target_`` ends with ``suffix``."""
    if isinstance(config, dict):
        if str(config.get("_target_", "")).endswith(suffix):
            return prefix
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return None
    for key, value in items:
        found = _find_target(value, suffix, f"{prefix}#{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def load_bundle(bundles_dir: Path, name: str) -> Bundle | str:
    """The bundle, or a sentence saying why it cannot be benchmarked."""
    from monai.bundle import ConfigParser

    from nucleiseg_monai.networks import load_weights

    root = bundles_dir / name
    train_config = root / "configs" / "train.json"
    if not train_config.is_file():
        return f"{train_config} does not exist (bundle not created yet)"
    parser = ConfigParser()
    parser.read_config(str(train_config))
    parser.read_meta(str(train_config.parent / "metadata.json"))
    network_def = parser.get("network_def")
    weights = root / "models" / "model.pt"
    shown = weights.relative_to(REPO) if weights.is_relative_to(REPO) else weights
    if weights.is_file():
        try:  # a checkpoint from an older network_def must not pass for this one
            load_weights(parser.get_parsed_content("network_def", lazy=False), weights)
            note = f"trained: {shown}"
        except (RuntimeError, ValueError, KeyError) as err:
            weights, note = None, f"random init ({shown} does not fit network_def: {str(err)[:120]})"
    else:
        weights, note = None, f"random init (no {shown})"
    stats_file = root / "models" / "channel_stats.json"
    stats = None
    if stats_file.is_file():
        data = json.loads(stats_file.read_text())
        stats = ([float(v) for v in data["mean"]], [float(v) for v in data["std"]])

    # inference settings: SlidePredictor's defaults with the bundle's bf16 + channels_last, the bundle's
    # post-processing parameters, then whatever a configs/inference.json predictor sets explicitly
    predictor: dict = {"roi_size": 512, "overlap": 0.25, "sw_batch_size": 4, "region_size": 2048,
                       "region_margin": 128, "amp": True, "channels_last": True, "tissue_threshold": 0.0}
    source = "SlidePredictor defaults, amp + channels_last (no configs/inference.json)"
    if parser.get("postprocess_params") is not None:
        predictor["postprocess_params"] = parser.get_parsed_content("postprocess_params")
        source += "; postprocess_params from train.json"
    inference_config = root / "configs" / "inference.json"
    if inference_config.is_file():
        from nucleiseg_monai.inference import inference_configs
        from nucleiseg_monai.overrides import load_config

        # alone, or as the overlay over train.json that SlidePredictor.from_bundle reads
        inference = ConfigParser(load_config(inference_configs(root)))
        inference.read_meta(str(root / "configs" / "metadata.json"))
        target = _find_target(inference.get(), "SlidePredictor")
        if target is not None:
            for key in PREDICTOR_KEYS:
                if inference.get(f"{target}#{key}") is not None:
                    predictor[key] = inference.get_parsed_content(f"{target}#{key}")
            source = f"SlidePredictor defaults overridden by {inference_config.name}#{target}"
    return Bundle(
        name=name, root=root, train_config=train_config, features=list(network_def.get("features", [])),
        weights=weights, weights_note=note, stats=stats, predictor=predictor, predictor_source=source,
        patch_size=int(parser.get("patch_size", [256])[0]), batch_size=int(parser.get("batch_size", 8)),
    )


# ------------------------------------------------------------------------------------------------ inference

def reference_network(device: torch.device) -> torch.nn.Module:
    """The reference notebooks' small U-Net; 3 output classes here (the 1-class head costs nothing measurable)."""
    from nucleiseg_monai.networks import REFERENCE_SMALL, UNet

    torch.manual_seed(0)
    return UNet(features=REFERENCE_SMALL, out_channels=3).to(device).eval()


def forward_rate(net: torch.nn.Module, x: torch.Tensor, args, grad_mode: str = "inference_mode") -> dict:
    """Megapixels per second of ``net`` on the batch ``x``."""
    context = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode

    def call() -> None:
        with context():
            net(x)

    times = time_calls(call, x.device, args.warmup, args.repeats)
    return rate(x.shape[0] * x.shape[-2] * x.shape[-1] / 1e6, times, "mp")


def tiles(batch: int, size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=generator).to(device)


def bundle_inference_network(bundle: Bundle, device: torch.device, x: torch.Tensor) -> torch.nn.Module:
    """The network as the bundle's SlidePredictor runs it (runtime, precision, layout) for inputs like x."""
    from nucleiseg_monai.inference import prepare_network, weights_sha256

    p = bundle.predictor
    net = bundle.network().to(device).eval()
    runtime = p.get("runtime") or ("auto" if p.get("jit") else "eager")
    return prepare_network(net, runtime, bool(p.get("amp")), bool(p.get("channels_last")), tuple(x.shape),
                           weights_sha256(net), device)


def make_predictor(bundle: Bundle, device: torch.device, overrides: dict, stats):
    from nucleiseg_monai.inference import SlidePredictor

    mean, std = bundle.stats or stats
    settings = {**bundle.predictor, **overrides}
    return SlidePredictor(bundle.network(), channel_mean=mean, channel_std=std, device=device, progress=False,
                          overwrite=True, **settings), settings


def end_to_end(bundle: Bundle, device: torch.device, slide_path: Path, slide_shape, stats, args, workdir: Path,
               overrides: dict) -> dict:
    """Megapixels per second of ``SlidePredictor.predict_slide`` over a TIFF, all outputs written."""
    predictor, settings = make_predictor(bundle, device, overrides, stats)
    # warm-up on one region window: the same network call shapes (incl. the last, partial sliding-window batch)
    side = min(settings["region_size"], max(slide_shape)) + 2 * settings["region_margin"]
    predictor.network.probs(np.full((side, side, 3), 200, np.uint8))
    times, result = [], None
    for i in range(args.e2e_repeats):
        out_dir = workdir / f"e2e_{bundle.name}_{device.type}_{i}"
        _sync(device)
        t0 = time.perf_counter()
        result = predictor.predict_slide(slide_path, out_dir)
        _sync(device)
        times.append(time.perf_counter() - t0)
    height, width = slide_shape
    figures = rate(height * width / 1e6, times, "mp")
    figures.update({"image_shape": [height, width], "nuclei": result.nuclei,
                    "regions_processed": result.regions_processed})
    # the phases overlap when the network runs ahead in its own thread; one serial run shows what each costs and
    # what the overlap gains
    prefetch, predictor.prefetch = predictor.prefetch, False
    try:
        figures["serial"] = serial_breakdown(predictor, device, slide_path, slide_shape,
                                             workdir / f"e2e_{bundle.name}_{device.type}_serial")
    finally:
        predictor.prefetch = prefetch
    figures["prefetch_gain"] = ratio(figures["mp_per_s"], figures["serial"]["mp_per_s"])
    figures["settings"] = {k: settings[k] for k in sorted(settings)}
    return figures


def serial_breakdown(predictor, device: torch.device, slide_path: Path, slide_shape, out_dir: Path) -> dict:
    """One run with no prefetching: megapixels per second and where the time goes, from the seconds per phase the
    predictor records (``SlideResult.timings``); "other" is what no phase holds (opening outputs, the bar)."""
    _sync(device)
    t0 = time.perf_counter()
    result = predictor.predict_slide(slide_path, out_dir)
    _sync(device)
    total = time.perf_counter() - t0
    height, width = slide_shape
    breakdown = {f"{phase}_s": seconds for phase, seconds in result.timings.items()}
    breakdown["other_s"] = max(0.0, total - sum(breakdown.values()))
    return {
        "mp_per_s": sig(height * width / 1e6 / total), "seconds": sig(total),
        "breakdown_s": {k: sig(v) for k, v in breakdown.items()},
        "breakdown_share": {k.removesuffix("_s"): sig(v / total, 3) for k, v in breakdown.items()},
        "postprocess_mp_per_s": sig(height * width / 1e6 / breakdown["watershed_s"])
        if breakdown["watershed_s"] > 0 else None,
    }


# ------------------------------------------------------------------------------------------------ levers

def levers(bundle: Bundle, device: torch.device, args, stats) -> dict:
    """Each inference lever's megapixels per second and gain over the plain float32 forward."""
    from nucleiseg_monai.networks import MixedPrecision, prepare_for_inference

    base_net = bundle.network().to(device)
    x = tiles(args.batch, args.tile, device)
    rows: list[dict] = []

    def add(name: str, net: Callable | None, inp: torch.Tensor = x, grad_mode: str = "inference_mode",
            skipped: str | None = None, **extra) -> None:
        row = {"lever": name, "tile": inp.shape[-1], "batch": inp.shape[0], **extra}
        if skipped is None:
            try:
                row.update(forward_rate(net, inp, args, grad_mode))
            except Exception as err:  # one lever failing (e.g. a compiler missing) must not lose the table
                skipped = f"{type(err).__name__}: {str(err)[:200]}"
        if skipped is not None:
            row.update({"mp_per_s": None, "skipped": skipped})
        rows.append(row)
        log(f"  lever {name:<48s} " + (f"{row['mp_per_s']:8.3f} MP/s" if row["mp_per_s"] else f"skipped: {skipped}"))

    def bundle_setting() -> torch.nn.Module:
        return MixedPrecision(copy.deepcopy(base_net), torch.bfloat16, channels_last=True)

    cl = copy.deepcopy(base_net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    add("float32 plain (no_grad)", base_net, grad_mode="no_grad")
    add("+ inference_mode", base_net)
    add("+ channels_last", cl, x_cl)
    add("+ bf16 autocast (bundle setting)", bundle_setting())
    add("bf16 autocast without channels_last", MixedPrecision(copy.deepcopy(base_net), torch.bfloat16, False))

    for runtime in ("torch", "openvino"):  # the fast inference copies a predictor's runtime option makes
        try:
            fast = prepare_for_inference(copy.deepcopy(base_net), runtime, torch.bfloat16, tuple(x.shape))
            add(f"runtime {runtime}, bf16", fast)
        except (ImportError, ValueError) as err:  # OpenVINO not installed, or not on this device
            add(f"runtime {runtime}, bf16", None, skipped=f"{type(err).__name__}: {str(err)[:200]}")

    if args.compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(bundle_setting())
            with torch.inference_mode():
                compiled(x)  # compilation happens here, not in the timed calls
            add("torch.compile (bf16 autocast, channels_last)", compiled,
                compile_s=sig(time.perf_counter() - t0))
        except Exception as err:
            add("torch.compile (bf16 autocast, channels_last)", None,
                skipped=f"{type(err).__name__}: {str(err)[:200]}")
    else:
        add("torch.compile (bf16 autocast, channels_last)", None,
            skipped="not run (--quick or --no-compile; compiling takes about a minute per shape on 2 cores)")

    if device.type == "cpu":
        for threads in sorted({1, 2, args.threads}):
            if threads > (os.cpu_count() or 1):
                continue
            torch.set_num_threads(threads)
            try:
                add(f"bundle setting, {threads} thread(s)", bundle_setting(), threads=threads)
            finally:
                torch.set_num_threads(args.threads)

    net = bundle_setting()
    for size in (args.tile // 2, args.tile, args.tile * 2):
        add(f"bundle setting, tile {size}", net, tiles(args.batch, size, device))
    for batch in sorted({1, 4, args.batch}):
        add(f"bundle setting, batch {batch}", net, tiles(batch, args.tile, device))

    # narrower, wider and shallower variants of the bundle's network (untrained: speed does not depend on the
    # weights; their accuracy comes from training them, see the model cards)
    for features in VARIANT_FEATURES:
        if list(features) == bundle.features:
            continue
        parser = bundle.parser()
        parser.update({"network_def#features": list(features)})
        variant = parser.get_parsed_content("network_def", lazy=False).to(device).eval()
        add(f"bundle setting, features {'-'.join(map(str, features))}",
            MixedPrecision(variant, torch.bfloat16, channels_last=True),
            parameters=sum(p.numel() for p in variant.parameters()))

    baseline = rows[0]["mp_per_s"]
    for row in rows:
        row["gain"] = ratio(row["mp_per_s"], baseline) if row["mp_per_s"] else None
    return {"bundle": bundle.name, "weights": bundle.weights_note, "baseline": rows[0]["lever"], "rows": rows,
            "postprocess": postprocess_cost(bundle, device, args, stats)}


def postprocess_cost(bundle: Bundle, device: torch.device, args, stats) -> dict:
    """Seconds per megapixel of ``instances_from_probs`` on the network's softmax and on ideal probabilities."""
    from nucleiseg_monai.postprocess import instances_from_probs
    from nucleiseg_monai.synthetic import make_tile
    from nucleiseg_monai.transforms import encode_three_class

    size = args.tile * 2  # one larger tile, so per-image constant costs do not dominate at small tiles
    rgb, truth = make_tile(size, seed=args.seed + 1)
    params = bundle.predictor.get("postprocess_params", {})
    predictor, _ = make_predictor(bundle, device, {"roi_size": args.tile}, stats)
    cpu = torch.device("cpu")  # network.probs returns numpy and post-processing is numpy: host clock for both
    network_times = time_calls(lambda: predictor.network.probs(rgb), cpu, args.warmup, args.repeats)
    probs_net = predictor.network.probs(rgb)
    ideal = np.eye(3, dtype=np.float32)[encode_three_class(truth)].transpose(2, 0, 1).copy()
    mp = size * size / 1e6
    out = {"tile": size, "params": params, "synthetic_nuclei": int(truth.max()),
           "network_and_sliding_window": rate(mp, network_times, "mp")}
    for name, probs in (("on_network_probs", probs_net), ("on_ideal_probs", ideal)):
        times = time_calls(lambda p=probs: instances_from_probs(p, **params), cpu, args.warmup, args.repeats)
        figures = rate(mp, times, "mp")
        figures["s_per_mp"] = sig(1.0 / figures["mp_per_s"])
        figures["nuclei"] = int(instances_from_probs(probs, **params).max())
        out[name] = figures
    out["on_network_probs"]["weights"] = bundle.weights_note
    out["postprocess_share_of_network_time"] = sig(
        out["network_and_sliding_window"]["mp_per_s"] / out["on_network_probs"]["mp_per_s"], 3)
    return out


# ------------------------------------------------------------------------------------------------ training

def training_batch(batch: int, patch: int, stats, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-made z-scored synthetic patches and their 3-class targets."""
    from nucleiseg_monai.synthetic import make_tile
    from nucleiseg_monai.transforms import encode_three_class

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in stats)
    images, targets = [], []
    for i in range(batch):
        rgb, labels = make_tile(patch, seed=seed + i)
        images.append(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32)))
        targets.append(torch.from_numpy(encode_three_class(labels)[None].astype(np.int64)))
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
    _sync(device)
    t0 = time.perf_counter()
    step_times = time_calls(step, device, 0, steps)
    _sync(device)
    wall = time.perf_counter() - t0
    return {"images_per_s": sig(x.shape[0] * steps / wall), "steps": steps, "batch": x.shape[0],
            "median_step_s": sig(statistics.median(step_times)), "wall_s": sig(wall)}


def bundle_overrides(bundle: Bundle, device: torch.device, patch: int, batch: int) -> dict:
    return {"device": f"$torch.device('{device}')", "patch_size": [patch, patch], "batch_size": batch,
            "bundle_root": str(bundle.root)}


def plain_bundle_training(bundle: Bundle, device: torch.device, patch: int, batch: int, stats, args) -> dict:
    """The bundle config's own network, loss and optimizer driven by a bare loop over pre-made tensors: the
    network's ceiling, with no data loading or augmentation at all."""
    parser = bundle.parser()
    parser.update(bundle_overrides(bundle, device, patch, batch))
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    x, y = training_batch(batch, patch, stats, args.seed)
    return plain_training(network, loss_fn, optimizer, x.to(device), y.to(device), args.train_warmup,
                          args.train_steps)


def training_parser(bundle: Bundle, device: torch.device, patch: int, batch: int, dataset_dir: Path, run_dir: Path,
                    args):
    """The bundle's train.json as ``monai.bundle run training`` reads it, overridden only where files go (a
    temporary folder, never the bundle's models/), the dataset (synthetic, in the CryoNuSeg layout), the device,
    patch and batch size, and one loader epoch long enough for warm-up, timed steps and a loader-alone check."""
    from nucleiseg_monai.data import make_datalist

    n_train = len(make_datalist(dataset_dir)["training"])  # the split train.json will make of these tiles
    iterations = args.train_warmup + args.train_steps
    supply_batches = min(args.train_steps, 5)
    parser = bundle.parser()
    parser.update({
        **bundle_overrides(bundle, device, patch, batch),
        "dataset_dir": str(dataset_dir),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "runs"),
        "epochs": 1,
        "samples_per_tile": math.ceil((iterations + supply_batches + 1) * batch / n_train),
        "train#trainer#epoch_length": iterations,
    })
    return parser


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


def plain_loader_training(bundle: Bundle, device: torch.device, patch: int, batch: int, dataset_dir: Path,
                          workdir: Path, args) -> dict:
    """A bare PyTorch loop on the same network and data as the pipeline: the config's own DataLoader (same
    dataset, cache, augmentation, workers), network, loss and optimizer, with no engine, handlers or events."""
    parser = training_parser(bundle, device, patch, batch, dataset_dir,
                             workdir / f"plain_{bundle.name}_{device.type}", args)
    with config_determinism(parser):
        network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        loader = parser.get_parsed_content("train#dataloader")
        network.train()
        batches = iter(loader)
        done, wait = [], 0.0
        for i in range(args.train_warmup + args.train_steps):
            t0 = time.perf_counter()
            data = next(batches)
            if i >= args.train_warmup:
                wait += time.perf_counter() - t0
            x, y = data["image"].to(device), data["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(network(x), y)
            loss.backward()
            optimizer.step()
            _sync(device)
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
        _sync(self.device)
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


def pipeline_training(bundle: Bundle, device: torch.device, patch: int, batch: int, dataset_dir: Path,
                      workdir: Path, args) -> dict:
    """Images per second of the bundle's train.json as ``monai.bundle run training`` builds it (see
    ``training_parser`` for what is overridden)."""
    parser = training_parser(bundle, device, patch, batch, dataset_dir, workdir / f"train_{bundle.name}_{device.type}",
                             args)
    warmup, iterations = args.train_warmup, args.train_warmup + args.train_steps
    supply_batches = min(args.train_steps, 5)
    t0 = time.perf_counter()
    with config_determinism(parser):  # as `monai.bundle run` does: determinism, folders, early stop
        trainer = parser.get_parsed_content("train#trainer")
        setup = time.perf_counter() - t0
        clock = IterationClock(device)
        clock.attach(trainer)
        trainer.run()
        # the loader alone, with the trainer idle: the fastest it can supply batches
        batches = iter(parser.get_parsed_content("train#dataloader"))
        supply = time_calls(functools.partial(next, batches), torch.device("cpu"), 1, supply_batches)
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
        "samples_per_tile": parser.get("samples_per_tile"),
        "config": str(bundle.train_config.relative_to(REPO) if bundle.train_config.is_relative_to(REPO)
                      else bundle.train_config),
    }


# ------------------------------------------------------------------------------------------------ the run

def attempt(errors: list[str], label: str, fn: Callable[[], dict]) -> dict | None:
    """``fn()``, or None with the error recorded: one failing figure must not lose the others (exit code 1)."""
    try:
        return fn()
    except Exception as err:
        errors.append(f"{label}: {type(err).__name__}: {err}")
        log(f"FAILED {label}:\n{traceback.format_exc()}")
        return None


def device_section(device: torch.device, bundles: list[Bundle], args, memory: Phases, workdir: Path,
                   slide_path: Path | None, slide_shape, dataset_dir: Path | None, stats, errors: list[str]) -> dict:
    tag = device.type
    section: dict = {"device": str(device), "bundles": {}}
    x = tiles(args.batch, args.tile, device)

    log(f"[{tag}] reference forward: UNet 64-512, float32, no_grad, {args.batch} x {args.tile}^2 tiles")
    with memory.phase(f"{tag}:reference_forward"):
        ref = reference_network(device)
        reference = {"network": "UNet(features=(64, 128, 256, 512), out_channels=3)", "precision": "float32",
                     "channels_last": False, "autocast": False, "grad_mode": "no_grad", "tile": args.tile,
                     "batch": args.batch, "parameters": sum(p.numel() for p in ref.parameters()),
                     **forward_rate(ref, x, args, "no_grad")}
    section["reference"] = {"forward": reference}
    ref_mp = reference["mp_per_s"]
    log(f"[{tag}] reference forward: {ref_mp:.3f} MP/s")

    def network_only(bundle: Bundle) -> dict:
        net = bundle_inference_network(bundle, device, x)
        # counted on a fresh copy: a frozen graph holds its weights as constants, not parameters
        figures = {"parameters": sum(p.numel() for p in bundle.network().parameters()), **forward_rate(net, x, args),
                   "tile": args.tile, "batch": args.batch, "grad_mode": "inference_mode"}
        figures["ratio_to_reference"] = ratio(figures["mp_per_s"], ref_mp)
        log(f"[{tag}] {bundle.name} network only: {figures['mp_per_s']:.3f} MP/s "
            f"({figures['ratio_to_reference']:.2f}x reference)")
        return figures

    def whole_image(bundle: Bundle) -> dict:
        figures = end_to_end(bundle, device, slide_path, slide_shape, stats, args, workdir, args.predictor_overrides)
        figures["ratio_to_reference"] = ratio(figures["mp_per_s"], ref_mp)
        log(f"[{tag}] {bundle.name} end to end: {figures['mp_per_s']:.3f} MP/s "
            f"({figures['ratio_to_reference']:.2f}x reference), {figures['nuclei']} nuclei, "
            f"no-prefetch run {figures['serial']['mp_per_s']:.3f} MP/s with shares {figures['serial']['breakdown_share']}")
        return figures

    for bundle in bundles:
        entry: dict = {"weights": bundle.weights_note, "features": bundle.features,
                       "inference_settings": bundle.predictor, "inference_settings_source": bundle.predictor_source}
        section["bundles"][bundle.name] = entry
        with memory.phase(f"{tag}:{bundle.name}:network_only"):
            entry["network_only"] = attempt(errors, f"{tag} {bundle.name} network only", lambda: network_only(bundle))
        if slide_path is not None:
            with memory.phase(f"{tag}:{bundle.name}:end_to_end"):
                entry["end_to_end"] = attempt(errors, f"{tag} {bundle.name} end to end", lambda: whole_image(bundle))

    if not args.skip_levers:
        lever_bundle = next((b for b in bundles if b.name == args.lever_bundle), None)
        if lever_bundle is None:
            section["levers"] = {"skipped": f"bundle {args.lever_bundle} not benchmarked"}
        else:
            log(f"[{tag}] lever table on {lever_bundle.name}")
            with memory.phase(f"{tag}:levers"):
                section["levers"] = attempt(errors, f"{tag} levers", lambda: levers(lever_bundle, device, args, stats))

    if args.skip_train or dataset_dir is None:
        return section
    patch = args.train_patch or (bundles[0].patch_size if bundles else 256)
    batch = args.train_batch or (bundles[0].batch_size if bundles else 8)
    log(f"[{tag}] training: reference UNet float32, batch {batch}, patch {patch}")
    with memory.phase(f"{tag}:train:reference"):
        from monai.losses import DiceCELoss

        net = reference_network(device)
        xb, yb = training_batch(batch, patch, stats, args.seed)
        section["reference"]["train"] = ref_train = {
            "network": reference["network"], "precision": "float32", "loss": "DiceCELoss", "optimizer": "AdamW",
            "patch": patch,
            **plain_training(net, DiceCELoss(to_onehot_y=True, softmax=True),
                             torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4),
                             xb.to(device), yb.to(device), args.train_warmup, args.train_steps),
        }
    log(f"[{tag}] reference training: {ref_train['images_per_s']:.3f} images/s")

    def train(bundle: Bundle) -> dict:
        b_patch, b_batch = args.train_patch or bundle.patch_size, args.train_batch or bundle.batch_size
        with memory.phase(f"{tag}:train:{bundle.name}:plain_tensors"):
            tensors = plain_bundle_training(bundle, device, b_patch, b_batch, stats, args)
        # Plain loop and pipeline alternate, round after round, and each keeps its fastest round: on a shared
        # 2-core machine a neighbour's burst slows one run by 20% or more, and noise only ever slows a run down.
        rounds: dict[str, list[dict]] = {"plain": [], "pipeline": []}
        for k in range(args.train_rounds):
            with memory.phase(f"{tag}:train:{bundle.name}:plain"):
                rounds["plain"].append(plain_loader_training(bundle, device, b_patch, b_batch, dataset_dir,
                                                             workdir / f"round{k}", args))
                gc.collect()  # the plain loop's persistent loader worker must be gone before the pipeline runs
            with memory.phase(f"{tag}:train:{bundle.name}:pipeline"):
                rounds["pipeline"].append(pipeline_training(bundle, device, b_patch, b_batch, dataset_dir,
                                                            workdir / f"round{k}", args))
                gc.collect()
        plain, pipeline = (max(rounds[key], key=lambda r: r["images_per_s"]) for key in ("plain", "pipeline"))
        overhead = sig((plain["images_per_s"] / pipeline["images_per_s"] - 1.0) * 100.0)
        data_cost = sig((tensors["images_per_s"] / pipeline["images_per_s"] - 1.0) * 100.0)
        log(f"[{tag}] {bundle.name} training: plain loop on the same loader {plain['images_per_s']:.3f} images/s, "
            f"pipeline {pipeline['images_per_s']:.3f} images/s (best of {args.train_rounds} alternating rounds), "
            f"overhead {overhead:.1f}%, waiting on data {100 * pipeline['data_wait_share']:.1f}% of the time; "
            f"plain loop on pre-made tensors {tensors['images_per_s']:.3f} images/s ({data_cost:.1f}% above the "
            f"pipeline)")
        return {
            "patch": b_patch, "batch": b_batch, "plain": plain, "pipeline": pipeline, "plain_tensors": tensors,
            "rounds_images_per_s": {key: [r["images_per_s"] for r in runs] for key, runs in rounds.items()},
            # the MONAI/ignite engine, handlers and events over a bare loop on the same network and data
            "overhead_percent": overhead, "overhead_target_percent": OVERHEAD_TARGET_PERCENT,
            "within_target": overhead <= OVERHEAD_TARGET_PERCENT,
            # the same inside the pipeline's own iterations: engine and handler time outside the step
            "engine_and_handlers_share": sig(pipeline["share"]["handlers"] + pipeline["share"]["engine_rest"], 3),
            # what loading and augmenting on the fly (in workers on the same cores) costs against no data at all
            "pretensor_over_pipeline_percent": data_cost,
            "pipeline_step_over_plain_step": sig(pipeline["seconds"]["step"] / pipeline["steps"]
                                                 / tensors["median_step_s"], 3),
            # what a user gets: the bundle's pipeline against the reference network's plain loop
            "ratio_to_reference": ratio(pipeline["images_per_s"], ref_train["images_per_s"]),
        }

    for bundle in bundles:
        section["bundles"][bundle.name]["train"] = attempt(errors, f"{tag} {bundle.name} training",
                                                           lambda: train(bundle))
    return section


def make_inputs(args, workdir: Path) -> tuple[Path | None, tuple[int, int], Path | None, dict]:
    """The synthetic slide (TIFF) for end-to-end runs and the synthetic dataset for the training pipeline."""
    from nucleiseg_monai import synthetic

    setup: dict = {}
    slide_path, shape, dataset_dir = None, (args.size, args.size), None
    if not args.skip_e2e:
        t0 = time.perf_counter()
        slide = synthetic.make_slide((args.size, args.size), seed=args.seed)
        slide_path = synthetic.write_slide(slide, workdir / "synthetic_slide.tif")
        setup["slide"] = {"shape": list(shape), "nuclei": slide.n_nuclei, "tissue": "everywhere",
                          "seconds": sig(time.perf_counter() - t0)}
    if not args.skip_train:
        t0 = time.perf_counter()
        dataset_dir = synthetic.write_dataset(workdir / "dataset", n_tiles=args.train_tiles, size=args.train_tile,
                                              organs=synthetic.ORGANS[:2], seed=args.seed)
        setup["dataset"] = {"tiles": args.train_tiles, "tile": args.train_tile,
                            "seconds": sig(time.perf_counter() - t0)}
    return slide_path, shape, dataset_dir, setup


def summary_lines(results: dict) -> list[str]:
    """The console table: each figure, and its ratio to the reference where it has one."""
    env = results["environment"]
    lines = []

    def row(label: str, figures: dict | None, key: str, ratio_key: str | None = "ratio_to_reference") -> None:
        if not figures:
            lines.append(f"{label:<64s}{'failed':>12s}")
            return
        value = figures.get(key)
        rel = figures.get(ratio_key) if ratio_key else None
        text = f"{value:>12.3f}" if isinstance(value, (int, float)) else f"{'skipped':>12s}"
        lines.append(f"{label:<64s}{text}" + (f"{rel:>8.2f}" if isinstance(rel, (int, float)) else ""))

    for tag in ("cpu", "cuda"):
        section = results.get(tag)
        if not section:
            continue
        device = env["cpu_model"] if tag == "cpu" else env["cuda"]
        lines.append(f"== {tag}: {device}, {env['threads']} threads, torch {env['torch']}, bf16 native "
                     f"{env['bf16_native']}")
        lines.append(f"{'figure':<64s}{'value':>12s}{'x ref':>8s}")
        ref = section["reference"]
        row("reference forward (64-512 fp32, no_grad) MP/s", {**ref["forward"], "r": 1.0}, "mp_per_s", "r")
        for name, b in section["bundles"].items():
            row(f"{name} network only MP/s", b.get("network_only"), "mp_per_s")
            if "end_to_end" in b:
                row(f"{name} end to end MP/s", b["end_to_end"], "mp_per_s")
                if b["end_to_end"]:
                    row("  same, no prefetch (serial phases) MP/s", b["end_to_end"]["serial"], "mp_per_s", None)
        if "train" in ref:
            row("reference training (fp32) images/s", {**ref["train"], "r": 1.0}, "images_per_s", "r")
        for name, b in section["bundles"].items():
            if "train" not in b:
                continue
            t = b["train"]
            row(f"{name} training, bundle pipeline images/s",
                t and {**t["pipeline"], "ratio_to_reference": t["ratio_to_reference"]}, "images_per_s")
            if t:
                row(f"{name} training, plain loop, same loader images/s", t["plain"], "images_per_s", None)
                row(f"  pipeline overhead % (target <= {OVERHEAD_TARGET_PERCENT:g})", t, "overhead_percent", None)
                row("  share of the pipeline's time waiting on data", t["pipeline"], "data_wait_share", None)
                row(f"{name} training, plain loop, pre-made tensors images/s", t["plain_tensors"], "images_per_s",
                    None)
                row("  on-the-fly data over pre-made tensors %", t, "pretensor_over_pipeline_percent", None)
        lev = section.get("levers")
        if lev and "rows" in lev:
            lines.append(f"-- levers on {lev['bundle']} ({lev['weights']}); x ref = gain over {lev['baseline']}")
            for r in lev["rows"]:
                row(f"{r['lever']} ({r['batch']} x {r['tile']}^2)", r, "mp_per_s", "gain")
            pp = lev["postprocess"]
            row(f"post-processing s/MP, network probs ({pp['tile']}^2)", pp["on_network_probs"], "s_per_mp", None)
            row(f"post-processing s/MP, ideal probs ({pp['tile']}^2)", pp["on_ideal_probs"], "s_per_mp", None)
    lines.append(f"peak RSS {results['memory']['peak_rss_mb']:.0f} MB; total {results['total_seconds']:.0f} s")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--quick", action="store_true", help="tiny sizes and one repeat: a smoke test, not a benchmark")
    add("--bundles", nargs="+", default=list(DEFAULT_BUNDLES), help="bundle names (default: %(default)s)")
    add("--bundles-dir", type=Path, default=REPO / "bundles", help="where the bundles are (default: %(default)s)")
    add("--lever-bundle", default="nuclei_unet_small", help="bundle for the lever table (default: %(default)s)")
    add("--size", type=int, default=4096, help="side of the synthetic end-to-end image (default: %(default)s)")
    add("--tile", type=int, default=512, help="tile side of network-only figures (default: %(default)s)")
    add("--batch", type=int, default=4, help="tiles per forward of network-only figures (default: %(default)s)")
    add("--repeats", type=int, default=5, help="timed calls per inference figure (default: %(default)s)")
    add("--warmup", type=int, default=2, help="untimed calls before them (default: %(default)s)")
    add("--e2e-repeats", type=int, default=2, help="timed end-to-end runs per bundle (default: %(default)s)")
    add("--threads", type=int, default=None, help=f"torch threads (default: all {cpus} cores; 1 with --quick)")
    add("--train-steps", type=int, default=10, help="timed training steps (default: %(default)s)")
    add("--train-warmup", type=int, default=3, help="untimed training steps first, >= 1 (default: %(default)s)")
    add("--train-rounds", type=int, default=2,
        help="alternating rounds of plain loop and pipeline; each keeps its fastest (default: %(default)s)")
    add("--train-patch", type=int, default=None, help="training patch side (default: the bundle's patch_size)")
    add("--train-batch", type=int, default=None, help="training batch size (default: the bundle's batch_size)")
    add("--train-tiles", type=int, default=10, help="synthetic tiles for the trainer (default: %(default)s)")
    add("--train-tile", type=int, default=512, help="their side, as CryoNuSeg's (default: %(default)s)")
    add("--skip-train", action="store_true", help="no training figures")
    add("--skip-e2e", action="store_true", help="no end-to-end figures")
    add("--skip-levers", action="store_true", help="no lever table")
    add("--no-compile", dest="compile", action="store_false", help="leave torch.compile out of the levers")
    add("--cpu-only", action="store_true", help="no CUDA section even where a GPU is present")
    add("--seed", type=int, default=0, help="synthetic data seed (default: %(default)s)")
    add("--output", type=Path, default=REPO / "benchmarks" / "results" / "speed.json",
        help="JSON results (default: benchmarks/results/speed.json)")
    args = p.parse_args(argv)
    args.predictor_overrides = {}
    if args.threads is None:  # one thread keeps the smoke test steady on a busy machine
        args.threads = 1 if args.quick else cpus
    if args.quick:
        # tiny everything; several regions so that stitching still runs
        args.size, args.tile, args.batch, args.repeats, args.warmup, args.e2e_repeats = 256, 64, 2, 1, 1, 1
        args.train_steps, args.train_warmup, args.train_patch, args.train_batch = 2, 1, 64, 2
        args.train_tiles, args.train_tile, args.compile, args.train_rounds = 6, 96, False, 1
        args.predictor_overrides = {"roi_size": 64, "region_size": 128, "region_margin": 32}
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
    bundles: list[Bundle] = []
    notes: list[str] = []
    for name in args.bundles:
        loaded = load_bundle(args.bundles_dir, name)
        if isinstance(loaded, str):
            notes.append(f"{name} skipped: {loaded}")
            log(f"{name} skipped: {loaded}")
        else:
            bundles.append(loaded)
    results: dict = {
        "environment": environment(args.threads),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": "inference: median of --repeats calls after --warmup calls (CUDA events on GPU); training: "
                  "images over the wall time of --train-steps steps after --train-warmup steps; ratios are "
                  "figure / reference figure on the same device in the same run",
        "notes": notes,
        "errors": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nucleiseg_speed_") as tmp:
        workdir = Path(tmp)
        with memory.phase("setup:synthetic_inputs"):
            slide_path, shape, dataset_dir, setup = make_inputs(args, workdir)
        results["setup"] = setup
        # z-scoring of the pre-made training tensors, and of bundles that have no channel_stats.json yet
        stats = bundles[0].stats if bundles and bundles[0].stats else ([180.0, 120.0, 170.0], [40.0, 45.0, 35.0])
        results["setup"]["channel_stats"] = {"mean": stats[0], "std": stats[1]}
        devices = [torch.device("cpu")]
        if torch.cuda.is_available() and not args.cpu_only:
            devices.append(torch.device("cuda"))
        for device in devices:
            results[device.type] = device_section(device, bundles, args, memory, workdir, slide_path, shape,
                                                  dataset_dir, stats, results["errors"])
    results["memory"] = memory.report()
    results["phase_seconds"] = memory.seconds
    results["total_seconds"] = sig(time.perf_counter() - started)
    from nucleiseg_monai.atomic import atomic_path

    with atomic_path(args.output) as tmp_out:
        tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(summary_lines(results)))
    print(f"results written to {args.output}")
    for error in results["errors"]:
        print(f"FAILED {error}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
