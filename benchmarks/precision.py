"""bf16 autocast against float32 on this machine's CPU: what ``amp_dtype: "auto"`` decides, and why.

Times one training iteration (forward, backward and AdamW step on a batch of ``--batch`` patches of ``--patch`` px)
and one forward pass in eval mode (4 x 512^2) of the small bundle's network, in float32 and under bf16 autocast
(``networks.MixedPrecision``, channels-last as training runs), and in float32 in the default memory layout,
alternating for ``--rounds`` rounds after a warm-up; prints the medians and their ratios, the CPU's vector
capability, whether oneDNN has a bf16 path (``networks.native_bf16``) and so which precision "auto" picks, and
writes them to ``benchmarks/results/precision_<capability>.json``.

    python benchmarks/precision.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from nucleiseg_monai.atomic import write_json_atomic
from nucleiseg_monai.networks import MixedPrecision, native_bf16, resolve_dtype

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "nuclei_unet_small"


def network() -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    return parser.get_parsed_content("network_def")


def train_step(model, optimiser, x) -> None:
    optimiser.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    capability = torch.backends.cpu.get_cpu_capability()
    base = network()
    variants = {"float32": ("float32", True), "bf16 autocast": ("bfloat16", True),
                "float32 contiguous": ("float32", False)}
    # each variant its own copy: channels-last converts a network's weights in place
    models = {name: MixedPrecision(copy.deepcopy(base), dtype, channels_last)
              for name, (dtype, channels_last) in variants.items()}
    optimisers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    batch = torch.randn(args.batch, 3, args.patch, args.patch)
    tiles = torch.randn(4, 3, 512, 512)
    seconds: dict[str, dict[str, list[float]]] = {n: {"train_iteration": [], "forward_4x512": []} for n in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            train_step(model, optimisers[name], batch)
            train_s = time.perf_counter() - start
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model(tiles)
                forward_s = time.perf_counter() - start
            if round_:
                seconds[name]["train_iteration"].append(train_s)
                seconds[name]["forward_4x512"].append(forward_s)
            print(f"round {round_} {name:14s} train {train_s:7.2f} s  forward {forward_s:6.2f} s", flush=True)
    medians = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in seconds.items()}
    ratio = {k: medians["bf16 autocast"][k] / medians["float32"][k] for k in medians["float32"]}
    contiguous = {k: medians["float32 contiguous"][k] / medians["float32"][k] for k in medians["float32"]}
    auto = resolve_dtype("auto", "cpu")
    report = {
        "cpu": platform.processor() or platform.machine(), "capability": capability,
        "native_bf16": native_bf16("cpu"), "auto_picks": "bfloat16" if auto else "float32",
        "threads": args.threads, "batch": args.batch, "patch": args.patch, "rounds": args.rounds,
        "torch": torch.__version__, "seconds": seconds, "medians_s": medians, "bf16_over_float32": ratio,
        "contiguous_over_channels_last_float32": contiguous,
    }
    for key in ratio:
        print(f"{key}: float32 {medians['float32'][key]:.2f} s, bf16 autocast {medians['bf16 autocast'][key]:.2f} s "
              f"({ratio[key]:.2f}x float32's time); float32 contiguous {medians['float32 contiguous'][key]:.2f} s "
              f"({contiguous[key]:.2f}x)")
    print(f"CPU capability {capability}; native bf16: {report['native_bf16']}; amp_dtype 'auto' picks "
          f"{report['auto_picks']}")
    output = args.output or REPO / "benchmarks" / "results" / f"precision_{capability.lower()}.json"
    write_json_atomic(report, output)
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
