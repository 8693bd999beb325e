"""Cohort throughput on a local Dask cluster: slides per hour with 1 and 2 workers, peak memory per worker.

Writes ``--slides`` synthetic slides of ``--size`` px (a tissue blob on glass, ``synthetic.write_slide``), then runs
the same cohort through ``cohort.run_cohort`` with the bundle's own inference settings and weights, once per
worker count, each into a fresh output folder. The clock runs from the first task sent to the last row written, so
it includes each worker building its predictor once (weights, frozen graph) but not the cluster's start, which is
reported apart. Peak memory is each worker process's peak resident set (``getrusage``), as the tasks report it.

What K machines would do is the best measured slides per hour times K: tasks are independent and the scheduler
spends milliseconds per slide, so the limits at scale are the shared file system and the scheduler's own machine,
not measured here. Workers share the cores of one machine, so 2 workers on 2 cores mostly trade intra-op threads
for process parallelism; the JSON records the cores and the load average other jobs put on them.

    python benchmarks/cohort.py --slides 8 --size 1024 --output benchmarks/results/cohort.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nucleiseg_monai.atomic import atomic_path  # noqa: E402
from nucleiseg_monai.cohort import BundlePredictor, cpu_count, dask_client, read_cohort, run_cohort  # noqa: E402
from nucleiseg_monai.synthetic import make_slide, write_slide  # noqa: E402


def measure(workers: int, slides, out: Path, factory) -> dict:
    start = time.perf_counter()
    with dask_client(workers=workers, dashboard_address=None) as (client, threads):
        started = time.perf_counter()
        summary = run_cohort(client, slides, out, factory, torch_threads=threads, progress=False)
        wall = time.perf_counter() - started
    if not summary.ok:
        raise RuntimeError(f"{len(summary.failed)} slides failed: {summary.failed}")
    seconds = sorted(float(row["seconds"]) for row in summary.rows)
    return {
        "workers": workers, "torch_threads_per_worker": threads, "slides": len(slides),
        "wall_s": round(wall, 2), "slides_per_hour": round(len(slides) * 3600 / wall, 1),
        "cluster_start_s": round(started - start, 2),
        "slide_seconds_median": seconds[len(seconds) // 2], "slide_seconds_max": seconds[-1],
        "nuclei": sum(int(row["nuclei"]) for row in summary.rows),
        "peak_rss_mb_per_worker": sorted(round(mb, 1) for mb in summary.peak_rss_mb.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="side of each synthetic slide in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="cluster sizes to extrapolate to")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "cohort.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cohort_bench_") as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        for i in range(args.slides):
            write_slide(make_slide(args.size, seed=100 + i, tissue=True), folder / f"slide{i:03d}.tif")
        slides = read_cohort(folder)
        factory = BundlePredictor(str(Path(args.bundle).resolve()))
        runs = [measure(n, slides, Path(tmp) / f"out_{n}", factory) for n in args.workers]

    best = max(runs, key=lambda r: r["slides_per_hour"])
    result = {
        "bundle": Path(args.bundle).name,
        "cohort": {"slides": args.slides, "size_px": [args.size, args.size], "mpp": 0.25,
                   "megapixels_per_slide": args.size**2 / 1e6},
        "runs": runs,
        "scaling_2_over_1": round(runs[-1]["slides_per_hour"] / runs[0]["slides_per_hour"], 3)
        if len(runs) > 1 else None,
        "extrapolation": {
            "per_machine_slides_per_hour": best["slides_per_hour"], "workers_per_machine": best["workers"],
            "slides_per_hour_on_k_machines": {str(k): round(best["slides_per_hour"] * k) for k in args.machines},
        },
        "environment": {
            "cores": cpu_count(), "load_average_1min_before_after": [round(load_before[0], 2),
                                                                     round(os.getloadavg()[0], 2)],
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        },
        "command": "python benchmarks/cohort.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    for run in runs:
        print(f"{run['workers']} worker(s) x {run['torch_threads_per_worker']} threads: "
              f"{run['slides_per_hour']:.0f} slides/h ({run['wall_s']} s for {run['slides']}), cluster start "
              f"{run['cluster_start_s']} s, peak MB per worker {run['peak_rss_mb_per_worker']}")
    print(f"K machines at {best['slides_per_hour']:.0f} slides/h each: "
          f"{result['extrapolation']['slides_per_hour_on_k_machines']}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
