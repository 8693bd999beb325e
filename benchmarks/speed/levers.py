"""The lever table: what each inference setting is worth on one bundle's network (precision, layout, runtime,
graph compilation, threads, tile, batch, width), and the cost of post-processing per megapixel."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from .bundles import Bundle
from .common import DEFAULT_STATS, forward_rate, log, rate, ratio, sig, tiles, time_calls

# network widths compared with the bundle's own (which is skipped): 0.2.0's small bundle (16-128), 0.1.0's
# (24-192), double and half of 0.2.0's, and a 2-pooling variant
VARIANT_FEATURES = ((16, 32, 64, 128), (24, 48, 96, 192), (32, 64, 128, 256), (8, 16, 32, 64), (16, 32, 64),
                    (16, 32, 64, 128, 256))


def levers(bundle: Bundle, device: torch.device, args) -> dict:
    """Each inference lever's megapixels per second and gain over the plain float32 forward."""
    from nucleiseg_monai.networks import MixedPrecision
    from nucleiseg_monai.runtimes import prepare_for_inference

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

    def bf16_autocast() -> torch.nn.Module:
        return MixedPrecision(copy.deepcopy(base_net), torch.bfloat16, channels_last=True)

    cl = copy.deepcopy(base_net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    add("float32 plain (no_grad)", base_net, grad_mode="no_grad")
    add("+ inference_mode", base_net)
    add("+ channels_last", cl, x_cl)
    add("+ bf16 autocast (as in training)", bf16_autocast())
    add("bf16 autocast without channels_last", MixedPrecision(copy.deepcopy(base_net), torch.bfloat16, False))

    for runtime in ("torch", "openvino"):  # the fast inference copies a predictor's runtime option makes
        try:
            fast = prepare_for_inference(copy.deepcopy(base_net), runtime, torch.bfloat16, tuple(x.shape))
            add(f"runtime {runtime}, bf16", fast)
        except (ImportError, ValueError) as err:  # OpenVINO not installed, or not on this device
            add(f"runtime {runtime}, bf16", None, skipped=f"{type(err).__name__}: {str(err)[:200]}")

    try:  # the shipped precision: int8 ranges from the predictor's own synthetic calibration tiles
        from nucleiseg_monai.runtimes import synthetic_inputs

        mean, std = bundle.stats or DEFAULT_STATS
        calibration = synthetic_inputs(torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
        add("runtime openvino, int8 (bundle setting)", prepare_for_inference(
            copy.deepcopy(base_net), "openvino", "int8", tuple(x.shape), calibration=calibration))
    except (ImportError, ValueError) as err:
        add("runtime openvino, int8 (bundle setting)", None, skipped=f"{type(err).__name__}: {str(err)[:200]}")

    if args.compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(bf16_autocast())
            with torch.inference_mode():
                compiled(x)  # compilation happens here, not in the timed calls
            add("torch.compile (bf16 autocast, channels_last)", compiled, compile_s=sig(time.perf_counter() - t0))
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
                add(f"bf16 autocast, {threads} thread(s)", bf16_autocast(), threads=threads)
            finally:
                torch.set_num_threads(args.threads)

    net = bf16_autocast()
    for size in (args.tile // 2, args.tile, args.tile * 2):
        add(f"bf16 autocast, tile {size}", net, tiles(args.batch, size, device))
    for batch in sorted({1, 4, args.batch}):
        add(f"bf16 autocast, batch {batch}", net, tiles(batch, args.tile, device))

    # narrower, wider and shallower variants of the bundle's network (untrained: speed does not depend on the
    # weights; their accuracy comes from training them, see the model cards)
    for features in VARIANT_FEATURES:
        if list(features) == bundle.features:
            continue
        variant = bundle.parser({"network_def#features": list(features)}).get_parsed_content(
            "network_def", lazy=False).to(device).eval()
        add(f"bf16 autocast, features {'-'.join(map(str, features))}",
            MixedPrecision(variant, torch.bfloat16, channels_last=True),
            parameters=sum(p.numel() for p in variant.parameters()))

    baseline = rows[0]["mp_per_s"]
    for row in rows:
        row["gain"] = ratio(row["mp_per_s"], baseline) if row["mp_per_s"] else None
    return {"bundle": bundle.name, "weights": bundle.weights_note, "baseline": rows[0]["lever"], "rows": rows,
            "postprocess": postprocess_cost(bundle, device, args)}


def postprocess_cost(bundle: Bundle, device: torch.device, args) -> dict:
    """Seconds per megapixel of ``instances_from_probs`` on the network's softmax and on ideal probabilities."""
    from nucleiseg_monai.postprocess import instances_from_probs
    from nucleiseg_monai.synthetic import make_tile
    from nucleiseg_monai.transforms import distance_map, encode_three_class

    size = args.tile * 2  # one larger tile, so per-image constant costs do not dominate at small tiles
    rgb, truth = make_tile(size, seed=args.seed + 1)
    predictor = bundle.predictor(device, roi_size=args.tile)
    params = predictor.postprocess_params
    cpu = torch.device("cpu")  # network.probs returns numpy and post-processing is numpy: host clock for both
    network_times = time_calls(lambda: predictor.network.probs(rgb), cpu, args.warmup, args.repeats)
    probs_net = predictor.network.probs(rgb)
    ideal = np.eye(3, dtype=np.float32)[encode_three_class(truth)].transpose(2, 0, 1)
    if probs_net.shape[0] > 3:  # a distance-map network: the ideal map is the target it learnt
        ideal = np.concatenate([ideal, distance_map(truth)[None]])
    ideal = np.ascontiguousarray(ideal)
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
