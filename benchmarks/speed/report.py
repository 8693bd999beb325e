"""The console table: each figure, and its ratio to the reference where it has one."""

from __future__ import annotations

from .training import OVERHEAD_TARGET_PERCENT

END_TO_END = {"end_to_end": "synthetic tile", "end_to_end_cryonuseg": "CryoNuSeg tissue"}


def summary_lines(results: dict) -> list[str]:
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
            for key, what in END_TO_END.items():
                if key in b:
                    row(f"{name} end to end, {what}, MP/s", b[key], "mp_per_s")
                    if b[key]:
                        row("  same, no prefetch (serial phases) MP/s", b[key]["serial"], "mp_per_s", None)
        for name, b in section["bundles"].items():
            for r in b.get("end_to_end_levers") or []:
                row(f"{name} end to end {r['lever']} MP/s (shipped gain {r['shipped_gain']:.2f}x)", r, "mp_per_s")
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
