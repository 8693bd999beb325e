"""A predictor's set-up in a new process, with an empty OpenVINO model cache and with the model a first run kept.

What a user waits for before the first region of ``nucleiseg predict`` is read, and what every new cohort worker
waits for: the bundle's predictor built in a fresh Python process (``SlidePredictor.from_bundle``, the network made
ready on the CPU as shipped: OpenVINO, int8 for the small bundle). Rounds alternate, a cold process (an empty cache
folder of its own) then a warm one (the cache a cold run filled), so that both meet the same neighbours on a shared
machine. The seconds exclude starting Python and importing the package, which both pay alike.

    python benchmarks/openvino_setup.py --rounds 3 --output benchmarks/results/openvino_setup.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from nucleiseg_monai.inference import SlidePredictor
t0 = time.perf_counter()
predictor = SlidePredictor.from_bundle(sys.argv[1], progress=False)
print(time.perf_counter() - t0)
"""


def set_up_seconds(bundle: str, cache: Path, threads: int) -> float:
    env = {**os.environ, "NUCLEISEG_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, bundle, str(threads)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"building the predictor failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--rounds", type=int, default=3, help="cold and warm processes each (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="JSON file for the figures")
    args = parser.parse_args(argv)
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="nucleiseg_ov_setup_") as tmp:
        for i in range(args.rounds):
            cache = Path(tmp) / f"round{i}"
            cold.append(set_up_seconds(args.bundle, cache, args.threads))
            warm.append(set_up_seconds(args.bundle, cache, args.threads))
            print(f"round {i + 1}: empty cache {cold[-1]:.2f} s, kept model {warm[-1]:.2f} s", flush=True)
    figures = {
        "bundle": Path(args.bundle).name, "threads": args.threads, "rounds": args.rounds,
        "seconds_empty_cache": [round(s, 3) for s in cold], "seconds_kept_model": [round(s, 3) for s in warm],
        "median_empty_cache_s": round(statistics.median(cold), 3),
        "median_kept_model_s": round(statistics.median(warm), 3),
        "ratio": round(statistics.median(cold) / statistics.median(warm), 1),
        "method": "SlidePredictor.from_bundle timed inside a fresh process; rounds alternate empty and kept",
    }
    print(f"median: empty cache {figures['median_empty_cache_s']} s, kept model {figures['median_kept_model_s']} s "
          f"({figures['ratio']}x)")
    if args.output:
        sys.path.insert(0, str(REPO))
        from nucleiseg_monai.atomic import write_json_atomic

        write_json_atomic(figures, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
