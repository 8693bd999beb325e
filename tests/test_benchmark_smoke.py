"""Smoke test of the speed benchmark (python -m benchmarks.speed): the quick run finishes and its JSON holds every
figure, consistently.

No timing is asserted (speed depends on the machine); only that each figure is a positive number and that every
ratio is the quotient of the figures it relates.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REL = 2e-3  # figures are rounded to 4 significant digits before ratios are taken


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def _figures_positive(node, path="") -> list[str]:
    """Paths of rate / memory figures that are not positive numbers (skipped levers carry a reason instead)."""
    bad = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}"
            if key.endswith(("_per_s", "_mb")) and not isinstance(value, dict) and not _positive(value):
                if not (value is None and node.get("skipped")):
                    bad.append(f"{here}={value!r}")
            bad += _figures_positive(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            bad += _figures_positive(value, f"{path}[{i}]")
    return bad


@pytest.mark.slow
def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        # overrides reach every predictor and win over --quick's own (128 px regions there: 4; here 16). The small
        # bundle alone: the full one differs from it only in width, so it repeated every figure at about twice the
        # cost (about 60 s of a 150 s run); the one branch of its own, random weights where a bundle has none, is
        # the test below
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--output", str(out),
         "--predictor-overrides", '{"region_size": 64}', "--bundles", "nuclei_unet_small"],
        # a guard against a hang, not a speed limit: 6 min alone on an AVX2-only 2-core CPU (its bf16 levers are
        # emulated; OpenVINO compiles for each predictor)
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference forward" in proc.stdout
    r = json.loads(out.read_text())

    env = r["environment"]
    for key in ("cpu_model", "torch", "threads", "cpu_capability", "bf16_native"):
        assert key in env
    assert _figures_positive(r) == []

    # a tile of real tissue beside the synthetic one wherever CryoNuSeg is present
    end_to_end = ["end_to_end"] + ([] if "skipped" in r["setup"]["cryonuseg_tile"] else ["end_to_end_cryonuseg"])

    cpu = r["cpu"]
    ref = cpu["reference"]["forward"]["mp_per_s"]
    ref_train = cpu["reference"]["train"]["images_per_s"]
    assert _positive(ref) and _positive(ref_train)
    assert "nuclei_unet_small" in cpu["bundles"]
    for name, b in cpu["bundles"].items():
        assert b["weights"].startswith(("trained", "random init")), name
        for kind in ("network_only", *end_to_end):
            assert _positive(b[kind]["mp_per_s"]), (name, kind)
            assert b[kind]["ratio_to_reference"] == pytest.approx(b[kind]["mp_per_s"] / ref, rel=REL)
        for kind in end_to_end:
            e2e = b[kind]
            assert e2e["regions_processed"] == 16  # 256 px image in 64 px regions, stitching runs
            assert e2e["nuclei"] > 0, kind
            serial = e2e["serial"]
            # the phases the predictor records, and what none holds
            assert set(serial["breakdown_share"]) == {"read", "tissue_mask", "network", "watershed", "stitching",
                                                      "measurements", "writing", "other"}
            assert sum(serial["breakdown_share"].values()) == pytest.approx(1.0, abs=0.01)
            assert e2e["prefetch_gain"] == pytest.approx(e2e["mp_per_s"] / serial["mp_per_s"], rel=REL)
    small = cpu["bundles"]["nuclei_unet_small"]
    shipped = small[end_to_end[-1]]["mp_per_s"]
    assert len(small["end_to_end_levers"]) == 4
    for row in small["end_to_end_levers"]:  # each lever changed, against the shipped figure of the same image
        assert _positive(row["mp_per_s"]) and row["overrides"], row
        assert row["shipped_gain"] == pytest.approx(shipped / row["mp_per_s"], rel=REL)
    for name, b in cpu["bundles"].items():
        t = b["train"]
        # --quick: at most 6 training tiles of each source the registry (or the synthetic one) names
        assert t["tiles"] and all(1 <= n <= 6 for n in t["tiles"].values()), t["tiles"]
        plain, pipe = t["plain"]["images_per_s"], t["pipeline"]["images_per_s"]
        assert _positive(plain) and _positive(pipe)
        assert t["overhead_percent"] == pytest.approx((plain / pipe - 1) * 100, rel=REL, abs=0.05)
        assert t["ratio_to_reference"] == pytest.approx(pipe / ref_train, rel=REL)
        # the kept figures are the fastest of their alternating rounds
        assert plain == max(t["rounds_images_per_s"]["plain"]) and pipe == max(t["rounds_images_per_s"]["pipeline"])
        assert 0 <= t["engine_and_handlers_share"] <= 1
        assert 0 <= t["pipeline"]["data_wait_share"] <= 1
        assert 0 <= t["plain"]["data_wait_share"] <= 1
        tensors = t["plain_tensors"]["images_per_s"]
        assert _positive(tensors)
        assert t["pretensor_over_pipeline_percent"] == pytest.approx((tensors / pipe - 1) * 100, rel=REL, abs=0.05)
        assert isinstance(t["pipeline"]["loader_starves_network"], bool)

    lev = cpu["levers"]
    rows = {row["lever"]: row for row in lev["rows"]}
    base = rows[lev["baseline"]]["mp_per_s"]
    assert _positive(base)
    for name in ("float32 plain (no_grad)", "+ inference_mode", "+ channels_last", "+ bf16 autocast (as in training)",
                 "bf16 autocast, 1 thread(s)", "bf16 autocast, batch 1", "bf16 autocast, batch 4"):
        assert _positive(rows[name]["mp_per_s"]), name
    assert sum(name.startswith("bf16 autocast, tile") for name in rows) == 3
    for row in lev["rows"]:
        if row["mp_per_s"] is None:
            assert row["skipped"]
        else:
            assert row["gain"] == pytest.approx(row["mp_per_s"] / base, rel=REL), row["lever"]
    for kind in ("on_network_probs", "on_ideal_probs"):
        assert _positive(lev["postprocess"][kind]["s_per_mp"])
        assert lev["postprocess"][kind]["s_per_mp"] == pytest.approx(1 / lev["postprocess"][kind]["mp_per_s"], rel=REL)

    mem = r["memory"]
    assert _positive(mem["peak_rss_mb"])
    assert mem["peak_rss_mb"] >= max(mem["phase_peak_rss_mb"].values()) * 0.99


def test_a_bundle_without_trained_weights_is_benchmarked_with_random_ones(tmp_path, monkeypatch):
    """The full bundle's configs, without the models/ folder it would have, through the benchmark's loader: random
    weights of its network_def, saved in the run's folder, and a note saying so."""
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a folder of the checkout, not of the installed package
    from benchmarks.speed.bundles import load_bundle

    shutil.copytree(REPO / "bundles" / "nuclei_unet_full" / "configs", tmp_path / "full" / "configs")
    bundle = load_bundle(tmp_path, "full", tmp_path)
    assert bundle.weights_note == f"random init (no {tmp_path / 'full' / 'models' / 'model.pt'})"
    assert bundle.checkpoint == tmp_path / "full_random.pt" and bundle.stats is None
    bundle.network()  # the saved weights load, strictly, into the bundle's network_def
