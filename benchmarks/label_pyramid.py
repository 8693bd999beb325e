"""Peak memory and wall time of writing a slide-sized label BigTIFF, without reduced levels and with them.

A synthetic SIZE x SIZE px uint32 label map (nuclei of 7-13 px across in 55% of 24 x 24 px cells, tissue
everywhere: the most ids a slide of that size would have) is generated tile by tile and streamed into the writer as
``SlidePredictor`` streams its tiles, so the whole map is never in memory. Each variant runs in its own process,
which reports its peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss`` after the write: the imports' peak or
the write's, whichever is higher), its resident memory just before the write, and the write's wall time and CPU
time (user + system: on a shared machine the steadier of the two); the variants alternate ``--repeats`` times, and
the summary keeps each one's fastest run and highest peak:

* ``tiles_only``: the tiles generated and dropped, nothing written (what the generator itself costs);
* ``before``: ``write_label_tiff`` of ``outputs.py`` at ``BEFORE`` (read from git), level 0 only;
* ``after``: today's ``write_label_tiff``, the reduced levels built while the tiles pass, its factor-4 level buffered
  in a temporary file beside the output (``outputs.LEVEL_BUFFER_IN_MEMORY``; at 20,000 px that level is 100 MB);
* ``after_in_memory``: the same with the buffer held in memory, what the file saves.

Afterwards every level of today's file is checked against the generated tiles, and level 0 of both files.

    python benchmarks/label_pyramid.py --repeats 3            # 20,000 px, ~5 min on 2 cores
    python benchmarks/label_pyramid.py --size 4096 --repeats 1 --output /tmp/label_pyramid.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE = "149a91019fceafbf71855fa00974837f4c011408"  # the last commit that wrote level 0 only
VARIANTS = ("tiles_only", "before", "after", "after_in_memory")
MPP = 0.25
CELL = 24


def _tile_pattern(tile: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Local ids (0 background, 1..K) of one tile: a disc of radius 3.5-6.5 px in 55% of the 24 px cells."""
    rng = np.random.default_rng(seed)
    local = np.zeros((tile, tile), np.uint32)
    yy, xx = np.mgrid[:tile, :tile]
    count = 0
    for cy in range(0, tile, CELL):
        for cx in range(0, tile, CELL):
            if rng.random() >= 0.55:
                continue
            y = cy + CELL * (0.25 + 0.5 * rng.random())
            x = cx + CELL * (0.25 + 0.5 * rng.random())
            r = 3.5 + 3.0 * rng.random()
            count += 1
            local[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = count
    return local, count


def label_tiles(size: int, tile: int):
    """Row-major (tile, tile) blocks of the synthetic map, zero beyond its edges; ids are unique across tiles. The
    pattern is drawn here, before the first tile is asked for, so a timed write pays for the tiles alone."""
    local, count = _tile_pattern(tile)
    return _tiles(size, tile, local, count)


def _tiles(size: int, tile: int, local: np.ndarray, count: int):
    inside = local > 0
    per_side = -(-size // tile)
    for ty in range(per_side):
        for tx in range(per_side):
            block = np.where(inside, local + np.uint32((ty * per_side + tx) * count), np.uint32(0))
            block[max(0, size - ty * tile):] = 0
            block[:, max(0, size - tx * tile):] = 0
            yield block


def child(variant: str, size: int, tile: int, path: Path) -> dict:
    """Runs in the subprocess: write (or only generate) the map, report seconds and peak memory."""
    from nucleiseg_monai import outputs

    if variant == "before":
        from benchmarks.past_code import module_at

        write = module_at(BEFORE, "outputs").write_label_tiff
    else:
        if variant == "after_in_memory":
            outputs.LEVEL_BUFFER_IN_MEMORY = 1 << 40
        write = outputs.write_label_tiff
    tiles = label_tiles(size, tile)
    with open("/proc/self/statm") as statm:  # resident pages now, not the peak the imports reached
        start_rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    used = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if variant == "tiles_only":
        for _ in tiles:
            pass
    else:
        write(path, tiles, shape=(size, size), tile=tile, mpp=MPP)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    # ru_maxrss: Linux reports KiB
    return {"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            "rss_before_write_mb": round(start_rss, 1)}


def check(size: int, tile: int, before: Path, after: Path) -> dict:
    """Level 0 of both files and every reduced level of today's against the generated tiles."""
    from nucleiseg_monai.outputs import label_levels

    level1 = np.zeros((-(-size // 4),) * 2, np.uint32)
    columns, side = -(-size // tile), tile // 4
    level0_equal = {"before": True, "after": True}
    with tifffile.TiffFile(before) as old, tifffile.TiffFile(after) as new:
        pages = {"before": old.pages[0].segments(), "after": new.pages[0].segments()}
        for index, block in enumerate(label_tiles(size, tile)):
            ty, tx = divmod(index, columns)
            part = block[::4, ::4][:level1.shape[0] - ty * side, :level1.shape[1] - tx * side]
            level1[ty * side:ty * side + part.shape[0], tx * side:tx * side + part.shape[1]] = part
            for name, segments in pages.items():
                decoded = next(segments)[0].reshape(tile, tile)
                level0_equal[name] &= bool(np.array_equal(decoded, block))
        levels = new.series[0].levels
        reduced_equal = [bool(np.array_equal(level.asarray(), level1[::4 ** (k - 1), ::4 ** (k - 1)]))
                         for k, level in enumerate(levels[1:], 1)]
        return {"level0_equal": level0_equal, "reduced_levels_equal": reduced_equal,
                "factors": label_levels((size, size), tile), "shapes": [list(level.shape) for level in levels],
                "resolution_px_per_cm": [round(level.keyframe.resolution[0], 3) for level in levels],
                "imread_is_level0": tuple(new.series[0].shape) == (size, size) and len(new.pages) == 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000, help="label map side in px (default 20000)")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side (default 512, the predictor's)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the label files (default: temp, removed)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "label_pyramid.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.size, args.tile, args.path)), flush=True)
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="label_pyramid_"))
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name in VARIANTS:
            path = out / f"{name}.labels.tif"
            command = [sys.executable, __file__, "--child", name, "--size", str(args.size), "--tile", str(args.tile),
                       "--path", str(path)]
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            run = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
            if path.is_file():
                run["file_mb"] = round(path.stat().st_size / 2**20, 2)
            runs[name].append(run)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {run}", flush=True)
    checked = check(args.size, args.tile, out / "before.labels.tif", out / "after.labels.tif")
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    if args.out is None:
        for path in out.iterdir():
            path.unlink()
        out.rmdir()
    summary = {name: {"wall_s_min": min(r["wall_s"] for r in rs), "cpu_s_min": min(r["cpu_s"] for r in rs),
                      "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
                      **({"file_mb": rs[-1]["file_mb"]} if "file_mb" in rs[-1] else {})} for name, rs in runs.items()}
    figures = {
        "command": "python benchmarks/label_pyramid.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "before_commit": BEFORE, "size_px": args.size, "tile": args.tile, "mpp": MPP, "repeats": args.repeats,
        "level1_buffer_mb": round((-(-args.size // 4)) ** 2 * 4 / 2**20, 1),
        "environment": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                        "tifffile": tifffile.__version__, "load_average_at_start": [round(v, 2) for v in load]},
        "summary": summary, "runs": runs, "check": checked, "temporary_files_left": leftovers,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({"summary": summary, "check": checked, "temporary_files_left": leftovers}, indent=2))
    print(f"figures in {args.output}")


if __name__ == "__main__":
    main()
