#!/usr/bin/env python
"""Inference runtimes for the U-Net on CPUs, side by side in one run: speed, set-up cost, warnings, output change.

For each network (default: the small bundle's new 16-256 network and its former 16-128 one) on 256 x 256 windows,
batch 1, ``--threads`` threads:

* eager float32 (the reference every output difference is taken against);
* eager bf16 autocast + channels-last (``MixedPrecision``, as in training);
* ``torch.jit`` trace + freeze under bf16 (the predictor's ``jit=True`` path until now);
* torch without TorchScript: batch norm folded, bf16 weights, channels-last (``prepare_for_inference`` runtime
  ``torch``), the same as a ``torch.export`` graph run through ``ExportedProgram.module()``, and ``torch.compile``
  with Inductor's freezing;
* ONNX Runtime (``torch.onnx.export``, dynamo exporter): float32, float16, int8 static quantisation (QDQ);
* OpenVINO (``prepare_for_inference`` runtime ``openvino``): float32, bf16, int8 (NNCF post-training quantisation
  calibrated on ``--calibration`` synthetic tiles).

Speed: every variant is timed in each of ``--rounds`` alternating rounds (``--calls`` calls per round) and keeps
its best round, because on a shared machine noise only ever slows a run down. Output differences are taken on
``--tiles`` synthetic H&E tiles (``synthetic.make_tile``, other seeds than the calibration tiles) normalised with
the small bundle's channel statistics: the largest absolute difference of softmax probabilities and the share of
pixels whose argmax class differs from eager float32. Trained weights are used where the bundle has them for that
width (``weights`` in the JSON says which); random weights otherwise, which is fine for speed but makes the
output differences larger than a trained network's (flatter logits). Run from the repository root::

    nice -n 19 python benchmarks/runtimes.py          # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from speed import environment, sig  # noqa: E402  (benchmarks/speed.py, next to this file)

from nucleiseg_monai.data import load_stats  # noqa: E402
from nucleiseg_monai.networks import MixedPrecision, UNet, count_parameters, load_weights  # noqa: E402
from nucleiseg_monai.runtimes import CastNetwork, prepare_for_inference, synthetic_inputs  # noqa: E402

BUNDLE = REPO / "bundles" / "nuclei_unet_small"
DEFAULT_FEATURES = ((16, 32, 64, 128, 256), (16, 32, 64, 128))
TRAINED_FEATURES = (16, 32, 64, 128)  # the width of bundles/nuclei_unet_small/models/model.pt (release 0.2.0)
BASELINE = "eager float32"
TODAY = "torch.jit trace+freeze, bf16 autocast, channels-last"


def normalised_tiles(seeds, size: int, stats: dict) -> list[torch.Tensor]:
    return synthetic_inputs(torch.tensor(stats["mean"]).view(1, 3, 1, 1), torch.tensor(stats["std"]).view(1, 3, 1, 1),
                            seeds, size)


def onnx_file(network: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(copy.deepcopy(network).eval(), (example,), str(path), dynamo=True, verbose=False,
                      input_names=["x"], output_names=["logits"])
    return path


def ort_runner(path: Path, threads: int) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def ort_float16(path: Path, out: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(out))
    return out


def ort_int8(path: Path, out: Path, calibration: list[torch.Tensor]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calibration)

        def get_next(self):
            sample = next(self.samples, None)
            return None if sample is None else {"x": sample.numpy()}

    prepared = out.with_name(out.stem + "_prepared.onnx")
    quant_pre_process(str(path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def jit_frozen(network: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """What the predictor's former ``jit=True`` ran: a TorchScript trace of MixedPrecision, frozen."""
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(MixedPrecision(copy.deepcopy(network)).eval(), example,
                                                check_trace=False))


def compiled(network: torch.nn.Module) -> torch.nn.Module:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # constants folded into the graph: the torch.compile analogue of jit.freeze
    return torch.compile(MixedPrecision(copy.deepcopy(network)).eval())


def variants(network, example, calibration, threads, workdir: Path, with_compile: bool) -> dict[str, Callable]:
    """Name -> builder; each builder returns a callable from a float32 (1, 3, H, W) tensor to logits."""
    exported: list[Path] = []

    def onnx32() -> Path:  # exported once, for all three ONNX Runtime variants
        if not exported:
            exported.append(onnx_file(network, example, workdir / f"net_{id(network)}.onnx"))
        return exported[0]

    table: dict[str, Callable] = {
        BASELINE: lambda: network,
        "eager bf16 autocast, channels-last (MixedPrecision)": lambda: MixedPrecision(copy.deepcopy(network)).eval(),
        TODAY: lambda: jit_frozen(network, example),
        "torch: batch norm folded, bf16 weights, channels-last (prepare_for_inference runtime 'torch')":
            lambda: prepare_for_inference(network, "torch", torch.bfloat16),
        "torch.export of the same, run by ExportedProgram.module()":
            lambda: torch.export.export(CastNetwork(network), (example,)).module(),
    }
    if with_compile:
        table["torch.compile (Inductor, freezing), bf16 autocast, channels-last"] = lambda: compiled(network)
    table.update({
        "ONNX Runtime float32": lambda: ort_runner(onnx32(), threads),
        "ONNX Runtime float16": lambda: ort_runner(
            ort_float16(onnx32(), workdir / "net16.onnx"), threads),
        "ONNX Runtime int8 static (QDQ, per channel)": lambda: ort_runner(
            ort_int8(onnx32(), workdir / "net8.onnx", calibration), threads),
        "OpenVINO float32": lambda: prepare_for_inference(network, "openvino", torch.float32, threads=threads),
        "OpenVINO bf16 (prepare_for_inference runtime 'openvino')":
            lambda: prepare_for_inference(network, "openvino", torch.bfloat16, threads=threads),
        "OpenVINO int8 (NNCF post-training quantisation)":
            lambda: prepare_for_inference(network, "openvino", "int8", calibration=calibration, threads=threads),
    })
    return table


def differences(outputs: list, references: list[torch.Tensor]) -> dict:
    max_prob, differ, pixels = 0.0, 0, 0
    for out, ref in zip(outputs, references):
        p = torch.softmax(torch.as_tensor(np.asarray(out)).float(), dim=1)
        q = torch.softmax(ref, dim=1)
        max_prob = max(max_prob, float((p - q).abs().max()))
        differ += int((p.argmax(1) != q.argmax(1)).sum())
        pixels += q[:, 0].numel()
    return {"max_abs_prob_diff": sig(max_prob), "argmax_differ_fraction": sig(differ / pixels)}


def measure_network(features, args, stats, workdir: Path, with_compile: bool) -> dict:
    torch.manual_seed(0)
    network = UNet(3, 3, features=features).eval()
    weights = "random init (seed 0)"
    if tuple(features) == TRAINED_FEATURES and (BUNDLE / "models" / "model.pt").is_file():
        load_weights(network, BUNDLE / "models" / "model.pt")
        weights = str((BUNDLE / "models" / "model.pt").relative_to(REPO))
    tiles = normalised_tiles(range(1000, 1000 + args.tiles), args.window, stats)
    calibration = normalised_tiles(range(2000, 2000 + args.calibration), args.window, stats)
    with torch.inference_mode():
        references = [network(t) for t in tiles]
    example = tiles[0]
    runners, rows = {}, {}
    for name, build in variants(network, example, calibration, args.threads, workdir, with_compile).items():
        log(f"{features}: preparing {name}")
        row: dict = {}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                start = time.perf_counter()
                runner = build()
                with torch.inference_mode():
                    runner(example)  # first call: lazy compilation happens here for torch.compile
                row["setup_s"] = sig(time.perf_counter() - start)
            row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught})
            with torch.inference_mode():
                row.update(differences([runner(t) for t in tiles], references))
            runners[name] = runner
        except Exception as err:  # one runtime failing must not lose the others' figures
            row["error"] = f"{type(err).__name__}: {err}"
            log(traceback.format_exc())
        rows[name] = row
    pixels = example.shape[0] * example.shape[2] * example.shape[3] / 1e6
    best = {name: float("inf") for name in runners}
    rounds: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, runner in runners.items():
            with torch.inference_mode():
                runner(example)  # back in cache after the other variants ran
                start = time.perf_counter()
                for _ in range(args.calls):
                    runner(example)
                seconds = (time.perf_counter() - start) / args.calls
            rounds[name].append(sig(pixels / seconds))
            best[name] = min(best[name], seconds)
        log(f"{features}: round {r + 1}/{args.rounds} done")
    for name in runners:
        rows[name].update({"mp_per_s": sig(pixels / best[name]), "best_s_per_call": sig(best[name]),
                           "mp_per_s_each_round": rounds[name]})
    add_ratios(rows)
    return {"features": list(features), "parameters": count_parameters(network), "weights": weights,
            "variants": rows}


def add_ratios(rows: dict) -> None:
    """Each variant's speed over eager float32's and over today's jit path: from the best rounds (``x_...``), and
    the median over rounds of the ratio within a round (``x_..._round_median``), which the load of the moment
    cancels out of when it changes between rounds but not within one."""
    for row in rows.values():
        for key, ref in (("x_eager_float32", BASELINE), ("x_jit_today", TODAY)):
            if "mp_per_s" in row and "mp_per_s" in rows.get(ref, {}):
                row[key] = sig(row["mp_per_s"] / rows[ref]["mp_per_s"])
                per_round = [a / b for a, b in zip(row["mp_per_s_each_round"], rows[ref]["mp_per_s_each_round"])]
                row[f"{key}_round_median"] = sig(statistics.median(per_round))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def package_versions() -> dict:
    versions = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=lambda s: tuple(int(v) for v in s.split(",")), action="append",
                        help="network widths, comma-separated; repeat for several (default: 16..256 and 16..128)")
    parser.add_argument("--window", type=int, default=256, help="window side in pixels (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (default 5)")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per variant per round (default 5)")
    parser.add_argument("--tiles", type=int, default=4, help="synthetic tiles for output differences (default 4)")
    parser.add_argument("--calibration", type=int, default=8, help="synthetic calibration tiles for int8 (default 8)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (measured on the first network only)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "runtimes.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stats = load_stats(BUNDLE / "models" / "channel_stats.json")
    started = time.perf_counter()
    results = {
        # the machine's load when the run started and ended: shared cores slow torch's OpenMP threads more than
        # OpenVINO's, so ratios measured under load favour OpenVINO more than an idle machine would
        "environment": {**environment(args.threads), "nice": os.nice(0), "load_average_1_5_15_min": os.getloadavg(),
                        "packages": package_versions()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": "batch 1; each variant keeps its best of --rounds alternating rounds of --calls calls "
                  "(mp_per_s_each_round has them all); differences against eager float32 on --tiles synthetic "
                  "tiles; setup_s is preparation plus the first call; warnings are those emitted meanwhile",
        "networks": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, features in enumerate(args.features or DEFAULT_FEATURES):
            # torch.compile on the first network only: it compiles for about a minute per network on 2 cores
            results["networks"].append(measure_network(features, args, stats, Path(tmp), not args.no_compile and i == 0))
    results["total_seconds"] = sig(time.perf_counter() - started)
    results["load_average_at_end"] = os.getloadavg()
    from nucleiseg_monai.atomic import atomic_path

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output) as tmp_out:
        tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    for net in results["networks"]:
        print(f"\nfeatures {net['features']} ({net['parameters']} parameters, weights: {net['weights']})")
        for name, row in net["variants"].items():
            figures = (f"{row['mp_per_s']:7.3f} MP/s  x{row.get('x_jit_today', float('nan')):5.2f} jit  "
                       f"setup {row['setup_s']:6.1f} s  argmax differ {row['argmax_differ_fraction']:.2e}  "
                       f"warnings {len(row['warnings'])}") if "mp_per_s" in row else f"FAILED {row.get('error')}"
            print(f"  {name[:70]:70s} {figures}")
    print(f"results written to {args.output} in {results['total_seconds']} s")
    return 1 if any("error" in row for net in results["networks"] for row in net["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
