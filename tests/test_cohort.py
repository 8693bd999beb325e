import contextlib
import csv
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from distributed import LocalCluster
from monai.bundle import ConfigParser

from nucleiseg_monai import cohort as cohort_module
from nucleiseg_monai.cli import main
from nucleiseg_monai.inference import SlidePredictor
from nucleiseg_monai.cohort import (REGION_SIZE, BundlePredictor, CohortSummary, Slide, cpu_count, dask_client,
                                    failure, host_share, merge_slide, predict_cohort, process_slide, quiet_dask,
                                    raise_on_failure, read_cohort, read_slide_list, run_bundle_cohort, run_cohort,
                                    slide_task)
from nucleiseg_monai.outputs import remove_temporaries
from nucleiseg_monai.region_journal import unpack
from nucleiseg_monai.region_tasks import band_labels, bands, claim_journal
from nucleiseg_monai.run_table import COLUMNS, RunTable, _cell
from nucleiseg_monai.synthetic import make_slide, make_tile, write_slide
from nucleiseg_monai.wsi import ImageError
from conftest import same_up_to_ids

torch.set_num_threads(1)  # as each of the 2 workers on these 2 cores, so the serial run computes the same sums

MEAN, STD = [200.0, 150.0, 180.0], [40.0, 50.0, 45.0]
OUTPUTS = (".labels.tif", ".geojson", ".nuclei.csv", ".overlay.png", ".done.json")


def _colour_classifier() -> dict:
    """Weights of a 1x1 convolution that is the nearest-class-mean rule on colour: background vs nucleus means of
    a synthetic tile; the boundary class is never predicted. logit_k = (2 x.mu_k - |mu_k|^2) / T on raw RGB x,
    rewritten for the z-scored input the predictor feeds."""
    rgb, labels = make_tile(256, seed=0)
    means = np.stack([rgb[labels == 0].mean(0), rgb[labels > 0].mean(0)])
    mean, std, temperature = np.asarray(MEAN), np.asarray(STD), 400.0
    weight = np.zeros((3, 3, 1, 1), np.float32)
    bias = np.full(3, -1e3, np.float32)
    for k, mu in enumerate(means):
        weight[k, :, 0, 0] = 2 * mu * std / temperature
        bias[k] = (2 * mu @ mean - mu @ mu) / temperature
    return {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}


def _bundle(root: Path) -> Path:
    """A bundle folder whose network is the colour classifier: no trained weights needed."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save(_colour_classifier(), root / "models" / "model.pt")
    (root / "models" / "channel_stats.json").write_text(json.dumps({"mean": MEAN, "std": STD}))
    config = {
        "imports": ["$import nucleiseg_monai", "$import nucleiseg_monai.networks"],
        "bundle_root": ".",
        "network_def": {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 3, "kernel_size": 1},
        "predictor": {
            "_target_": "nucleiseg_monai.inference.SlidePredictor",
            "network": {
                "_target_": "nucleiseg_monai.inference.InferenceNetwork",
                "network": "$nucleiseg_monai.networks.load_weights(@network_def, @bundle_root + '/models/model.pt')",
                "channel_stats": "$@bundle_root + '/models/channel_stats.json'",
                "device": "cpu", "roi_size": 128, "sw_batch_size": 2,
            },
            "planner": {"_target_": "nucleiseg_monai.inference.RegionPlanner", "region_size": 256,
                        "region_margin": 32, "mpp": 0.25},
            "outputs": {"_target_": "nucleiseg_monai.outputs.OutputOptions", "label_tile": 128,
                        "overlay_max_side": 256},
            "prefetch": False,
        },
        "input": None, "output_dir": None,
        "inferring": ["$nucleiseg_monai.inference.raise_on_failure(@predictor.run(@input, @output_dir))"],
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=1))
    return root


def test_a_bundle_without_weights_is_refused_before_any_worker_starts(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path / "bundle")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["checkpoint"] = "$@bundle_root + '/models/model.pt'"
    config["predictor"]["network"]["network"] = "$nucleiseg_monai.networks.load_weights(@network_def, @checkpoint)"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    weights = tmp_path / "elsewhere.pt"
    (bundle / "models" / "model.pt").rename(weights)
    write_slide(make_slide((128, 128), seed=1), tmp_path / "slide.tif", tile=128)
    monkeypatch.setattr(cohort_module, "dask_client", lambda *a, **k: pytest.fail("a cluster was started"))
    with pytest.raises(FileNotFoundError, match=f"no trained weights at {bundle / 'models' / 'model.pt'}; "
                                                 f"train the bundle first"):
        predict_cohort(tmp_path / "slide.tif", tmp_path / "out", BundlePredictor(str(bundle)))
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="no trained weights"):  # a cluster of the user's own, as on SLURM
        run_cohort(None, read_cohort(tmp_path / "slide.tif"), tmp_path / "out", BundlePredictor(str(bundle)))
    assert not (tmp_path / "out").exists()
    # --checkpoint reaches the check as it reaches the workers
    BundlePredictor(str(bundle), (("checkpoint", str(weights)),)).check()


def test_every_worker_cuts_a_slide_into_the_regions_chosen_where_the_cohort_starts(tmp_path, monkeypatch):
    """The default region size follows the CPU; a split slide's region tasks and its merge run on several workers,
    perhaps on other CPUs, so a cohort fixes the size once and sends it with the factory."""
    small = str(Path(__file__).resolve().parents[1] / "bundles" / "nuclei_unet_small")

    def size_on(factory):
        return SlidePredictor.config_value(small, REGION_SIZE, **dict(factory.overrides))

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    pinned = BundlePredictor(small).pinned()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert size_on(BundlePredictor(small)) == 1024 and size_on(pinned) == 1536  # a worker on another CPU
    assert size_on(BundlePredictor(small, (("region_size", 512),)).pinned()) == 512  # one set stays

    class Submitted(Exception):
        pass

    class Client(_Client):
        def submit(self, function, factory, *args, **kwargs):
            raise Submitted(factory)

    write_slide(make_slide((128, 128), seed=1), tmp_path / "slide.tif", tile=128)
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    with pytest.raises(Submitted) as sent:
        run_cohort(Client(), read_cohort(tmp_path / "slide.tif"), tmp_path / "out", BundlePredictor(small))
    assert dict(sent.value.args[0].overrides)[REGION_SIZE] == 1024


def test_a_failure_in_building_the_predictor_is_recorded_by_its_cause():
    def load_weights():
        raise FileNotFoundError("no trained weights at /b/models/model.pt; train the bundle first")

    parser = ConfigParser({"predictor": {"network": "$load_weights()"}}, globals={"load_weights": load_weights})
    with pytest.raises(RuntimeError, match="Failed to evaluate") as wrapped:
        parser.get_parsed_content("predictor")
    assert failure(wrapped.value) == ("FileNotFoundError: no trained weights at /b/models/model.pt; train the "
                                      "bundle first")
    assert failure(ValueError("bad tile")) == "ValueError: bad tile"
    assert failure("the task was cancelled") == "the task was cancelled"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three 384 x 640 px slides (tissue blob on glass, separate nuclei), their serial outputs, a slide list that
    also names a broken file."""
    root = tmp_path_factory.mktemp("cohort")
    bundle = _bundle(root / "bundle")
    slides = root / "slides"
    slides.mkdir()
    for i in range(3):
        write_slide(make_slide((384, 640), seed=10 + i, tissue=True, touching=0.0), slides / f"slide{i}.tif",
                    tile=128)
    serial = BundlePredictor(str(bundle))().run(slides, root / "serial")
    assert serial.ok and len(serial.done) == 3 and min(r.nuclei for r in serial.done) > 20
    (root / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    with open(root / "cohort.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "slide"])
        writer.writerows([[f"slides/slide{i}.tif", ""] for i in range(3)] + [["broken.tif", "broken"]])
    return root, bundle, {r.name: r for r in serial.done}


def _assert_same_outputs(out: Path, serial: Path, names) -> None:
    for name in names:
        for suffix in OUTPUTS:
            assert (out / f"{name}{suffix}").read_bytes() == (serial / f"{name}{suffix}").read_bytes(), name + suffix
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporaries left behind


def _assert_same_nuclei(out: Path, serial: Path, name: str) -> None:
    """The same nuclei whatever their ids: label maps equal up to a one-to-one renaming of ids, GeoJSON features
    and CSV rows equal, ids left out, once sorted by position."""
    a, b = (tifffile.imread(folder / f"{name}.labels.tif") for folder in (out, serial))
    assert same_up_to_ids(a, b) and len(np.unique(b[b > 0])) == b.max()

    def features(folder):
        items = json.loads((folder / f"{name}.geojson").read_text())["features"]
        for item in items:
            del item["id"], item["properties"]["measurements"]["nucleus_id"]
        return sorted(items, key=lambda item: json.dumps(item["geometry"]))

    def rows(folder):
        with open(folder / f"{name}.nuclei.csv", newline="") as handle:
            table = [{k: v for k, v in row.items() if k != "id"} for row in csv.DictReader(handle)]
        return sorted(table, key=lambda row: (float(row["centroid_y_px"]), float(row["centroid_x_px"])))

    assert features(out) == features(serial) and rows(out) == rows(serial)


def _table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == COLUMNS
    return {row["slide"]: row for row in rows}


@pytest.mark.slow
def test_cli_cohort_matches_serial_records_the_broken_slide_and_resumes(cohort):
    root, bundle, serial = cohort
    out = root / "cli_out"
    args = ["predict", "--bundle", str(bundle), "--input", str(root / "cohort.csv"), "--output_dir", str(out),
            "--workers", "2", "--retries", "1"]
    assert main(args) == 1  # the broken slide fails the run, after the others finished
    _assert_same_outputs(out, root / "serial", serial)

    table = _table(out / "run_table.csv")
    assert list(table) == ["slide0", "slide1", "slide2", "broken"]
    assert table["broken"]["status"] == "failed" and "broken.tif" in table["broken"]["error"]
    assert table["broken"]["nuclei"] == ""
    workers = {row["worker"] for row in table.values()}  # the local cluster's two
    assert len(workers) <= 2 and all(re.fullmatch(r"tcp://127\.0\.0\.1:\d+", w) for w in workers)
    for name, result in serial.items():
        row = table[name]
        assert row["status"] == "done" and row["error"] == "" and float(row["seconds"]) > 0
        assert int(row["nuclei"]) == result.nuclei and float(row["mpp"]) == pytest.approx(0.25)
        labels = tifffile.imread(out / f"{name}.labels.tif")
        areas = np.bincount(labels.ravel())[1:] * 0.25**2  # um^2 per nucleus
        assert float(row["median_nucleus_um2"]) == pytest.approx(np.median(areas), rel=1e-4)
        # the tissue blob covers part of the glass, and holds every nucleus found
        tissue = float(row["tissue_mm2"])
        assert 0.1 * 384 * 640 * 0.25**2 / 1e6 < tissue < 384 * 640 * 0.25**2 / 1e6
        # the share the predictor's own tissue mask found, taken from its completion record (6 digits in the table)
        assert tissue == pytest.approx(result.tissue_fraction * 384 * 640 * 0.25**2 / 1e6, rel=1e-5)
        assert float(row["nuclei_per_mm2"]) == pytest.approx(result.nuclei / tissue, rel=1e-4)

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 1  # a re-run sends only the failed slide out again
    again = _table(out / "run_table.csv")
    assert [again[n]["status"] for n in serial] == ["skipped"] * 3 and again["broken"]["status"] == "failed"
    assert [again[n]["worker"] for n in serial] == [""] * 3  # skipped by the client: no worker took them
    assert all(again[n]["nuclei"] == table[n]["nuclei"] for n in serial)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in out.iterdir() if p.name != "run_table.csv")


@dataclass(frozen=True)
class CrashOnce:
    """The bundle's predictor, except that the first slide to reach its second region, in the whole cluster,
    kills its worker process there (its temporary outputs half written) and names itself in ``marker``."""

    factory: BundlePredictor
    marker: str

    def __call__(self):
        predictor = self.factory()
        predict_slide, instances = predictor.predict_slide, predictor.instances
        current = {}

        def predict_slide_named(path, output_dir, name=None, **kwargs):
            current.update(name=name or Path(path).stem, regions=0)
            return predict_slide(path, output_dir, name, **kwargs)

        def crash_on_second_region(probs):
            current["regions"] += 1
            if current["regions"] == 2:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return instances(probs)
                os.write(fd, current["name"].encode())
                os.close(fd)
                os._exit(1)
            return instances(probs)

        predictor.predict_slide, predictor.instances = predict_slide_named, crash_on_second_region
        return predictor


class TestOnOneLocalCluster:
    """Cohorts on one local cluster of 2 workers, shared because each start and close costs 10-15 s on 2 cores (the
    workers import torch and MONAI). Class-scoped, so it is closed before any other test runs: its quiet_dask would
    otherwise hide Dask's messages from the tests that check they stay out."""

    @pytest.fixture(scope="class")
    @classmethod
    def shared_cluster(cls):
        with dask_client(workers=2, retries=1, dashboard_address=None) as (client, threads):
            yield client, threads

    @pytest.fixture
    def cluster(self, shared_cluster):
        """Both workers up: one killed by the test before may still be restarting, and a split slide's region tasks
        are counted from the workers present."""
        client, threads = shared_cluster
        client.wait_for_workers(2, timeout=120)
        return client, threads

    @pytest.mark.slow
    def test_a_slide_whose_worker_dies_is_retried_and_a_rerun_without_the_table_resumes(self, cohort, cluster):
        root, bundle, serial = cohort
        client, threads = cluster  # retries 1: one worker death forgiven
        marker = root / "crashed"
        factory = CrashOnce(BundlePredictor(str(bundle)), str(marker))
        slides = read_cohort(root / "slides")
        summary = run_cohort(client, slides, root / "retried", factory, retries=1, torch_threads=threads,
                             progress=False)
        # without the run table, the workers find complete outputs and recompute their figures from them
        first = {row["slide"]: row for row in summary.rows}
        (root / "retried" / "run_table.csv").unlink()
        (root / "retried" / "slide1.geojson").unlink()  # an incomplete slide is redone
        resumed = run_cohort(client, slides, root / "retried", factory, torch_threads=threads, progress=False)
        # finished outputs of other settings are neither kept as if they were these nor replaced unasked
        other = BundlePredictor(str(bundle), (("predictor#postprocess_params", {"min_size": 30}),))
        with pytest.raises(FileExistsError, match="slide0, slide1, slide2 made with other weights or settings"):
            run_cohort(client, slides, root / "retried", other, retries=0, progress=False)
        # workers of a cluster joined by address take their share of the host's cores (2 slots here)
        share = client.submit(host_share, pure=False).result()
        crashed = marker.read_text()
        assert crashed in serial
        assert summary.ok and [row["status"] for row in summary.rows] == ["done"] * 3
        _assert_same_outputs(root / "retried", root / "serial", serial)
        assert [row["status"] for row in resumed.rows] == ["skipped", "done", "skipped"]
        assert all(row[c] == pytest.approx(first[row["slide"]][c]) for row in resumed.rows
                   for c in ("nuclei", "mpp", "tissue_mm2", "nuclei_per_mm2", "median_nucleus_um2"))
        assert share == threads == max(1, cpu_count() // 2)
        assert all(100 < mb < 4000 for mb in summary.peak_rss_mb.values())  # per worker process, as in benchmarks

    @pytest.mark.slow
    def test_slides_split_into_region_tasks_give_the_nuclei_of_the_whole_slide_run(self, cohort, cluster):
        root, bundle, serial = cohort
        client, threads = cluster
        # 384 x 640 px slides are 0.25 megapixels: above 0.2 each goes out as region tasks (256 px cores)
        summary = run_cohort(client, read_cohort(root / "slides"), root / "split", BundlePredictor(str(bundle)),
                             torch_threads=threads, progress=False, split_above_mpx=0.2)
        assert summary.ok and [row["status"] for row in summary.rows] == ["done"] * 3
        # two region tasks per worker, fewer where a slide has fewer tissue regions
        assert summary.region_tasks == {name: min(4, result.regions_processed) for name, result in serial.items()}
        assert all(result.regions_processed > 1 for result in serial.values())
        for name in serial:
            _assert_same_nuclei(root / "split", root / "serial", name)
        # the merge feeds the regions to one stitcher in the whole-slide run's order, so even the ids are the same
        _assert_same_outputs(root / "split", root / "serial", serial)


@dataclass(frozen=True)
class CountAttempts:
    """The bundle's predictor, each of whose attempts at a slide appends the slide's name to ``attempts``; its first
    attempt at ``flaky``, in the whole cluster, raises a RuntimeError (an error another attempt may not meet)."""

    factory: BundlePredictor
    attempts: str
    flaky: str

    def __call__(self):
        predictor = self.factory()
        predict_slide = predictor.predict_slide

        def predict_slide_counted(path, output_dir, name=None, **kwargs):
            with open(self.attempts, "a") as handle:
                handle.write(f"{name}\n")
            if name == self.flaky:
                try:
                    os.close(os.open(f"{self.attempts}.{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return predict_slide(path, output_dir, name, **kwargs)
                raise RuntimeError(f"{name}: a first attempt that fails")
            return predict_slide(path, output_dir, name, **kwargs)

        predictor.predict_slide = predict_slide_counted
        return predictor


@pytest.mark.slow
def test_a_missing_slide_fails_once_others_are_retried_and_the_log_holds_the_slides_not_dask(cohort, tmp_path, caplog,
                                                                                            capfd, monkeypatch):
    root, bundle, serial = cohort
    # as under the CLI, whose logging is set up before distributed is imported: Dask's records reach the root
    monkeypatch.setattr(logging.getLogger("distributed"), "propagate", True)
    dask_level = logging.getLogger("distributed").level
    caplog.set_level(logging.INFO)
    slides = read_cohort(root / "slides")
    missing = Slide(str(root / "slides" / "missing.tif"), "missing")
    attempts = tmp_path / "attempts.txt"
    factory = CountAttempts(BundlePredictor(str(bundle)), str(attempts), flaky="slide1")
    with dask_client(workers=2, retries=2, dashboard_address=None) as (client, threads):
        summary = run_cohort(client, [slides[0], missing, *slides[1:]], tmp_path / "out", factory, retries=2,
                             torch_threads=threads, progress=False)

    assert sorted(attempts.read_text().split()) == ["missing", "slide0", "slide1", "slide1", "slide2"]
    rows = {row["slide"]: row for row in summary.rows}
    assert rows["missing"]["status"] == "failed"
    assert rows["missing"]["error"] == f"FileNotFoundError: {missing.path} does not exist or is not a file"
    assert [row["slide"] for row in summary.failed] == ["missing"]
    assert all(rows[name]["status"] == "done" and rows[name]["nuclei"] == result.nuclei
               for name, result in serial.items())
    assert _table(tmp_path / "out" / "run_table.csv")["missing"]["error"] == rows["missing"]["error"]

    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert [r for r in records if missing.path in r[2]] == \
        [("nucleiseg_monai.cohort", logging.ERROR, f"failed on {missing.path}: {rows['missing']['error']}")]
    # Dask's start, connection and close messages stay out; its level is back once the client has closed
    assert not [r for r in records if r[0].startswith("distributed") and r[1] < logging.WARNING]
    assert logging.getLogger("distributed").level == dask_level
    assert [m.split(";")[0] for n, _, m in records if n == "nucleiseg_monai.cohort" and " workers; " in m] == \
        ["4 slides on 2 workers"]
    # each slide's pixel size line, as the single-image run logs it, before the slide's result
    for name, result in serial.items():
        path = str(root / "slides" / f"{name}.tif")
        scale = (f"{path}: 384x640 px at level 0, 0.25 um/px (stated in the resolution tags, 40000 pixels per "
                 f"centimeter), analysed as read (model: 0.25 um/px); {result.regions_processed} of {result.regions} "
                 "regions to process")
        lines = [m for _, _, m in records if m.startswith(f"{path}: ")]
        assert lines == [scale, f"{path}: {result.nuclei} nuclei in {rows[name]['seconds']:.1f} s"]
        assert records[[m for _, _, m in records].index(scale)][:2] == ("nucleiseg_monai.inference", logging.INFO)
    # the workers' stderr: the retried error's traceback, none for the missing slide
    err = capfd.readouterr().err
    assert "slide1: a first attempt that fails" in err and "missing.tif" not in err


def test_only_errors_that_would_recur_fail_a_slide_without_a_retry(monkeypatch):
    monkeypatch.setattr(cohort_module, "get_worker", lambda: type("Worker", (), {"address": "tcp://w:1"}))
    slide = Slide("/d/a.tif", "a")

    def raising(err):
        @slide_task
        def task(factory, slide):
            raise err
        return task

    parser = ConfigParser({"p": "$open_image()"}, globals={"open_image": lambda: open("/nonexistent/a.tif")})
    with pytest.raises(RuntimeError, match="Failed to evaluate") as wrapped:
        parser.get_parsed_content("p")
    for err, error in [(FileNotFoundError("/d/a.tif does not exist or is not a file"),
                        "FileNotFoundError: /d/a.tif does not exist or is not a file"),
                       (ImageError("/d/a.tif is a greyscale image"), "ImageError: /d/a.tif is a greyscale image"),
                       (PermissionError(13, "Permission denied"), "PermissionError: [Errno 13] Permission denied"),
                       (wrapped.value, "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/a.tif'")]:
        row = raising(err)(None, slide)
        assert (row["slide"], row["path"], row["status"], row["error"]) == ("a", "/d/a.tif", "failed", error)
        assert row["worker"] == "tcp://w:1" and row["peak_rss_mb"] > 0 and row["log"] == []
    for err in (RuntimeError("CUDA out of memory"), MemoryError(), OSError(5, "Input/output error")):
        with pytest.raises(type(err)):  # Dask retries these
            raising(err)(None, slide)


def test_the_dashboard_line_asks_for_bokeh_where_the_scheduler_would_need_it(monkeypatch):
    link = "http://node1:8787/status"
    apart = type("Client", (), {"dashboard_link": link, "cluster": None})()  # Client(address)
    own = type("Client", (), {"dashboard_link": link, "cluster": object()})()  # LocalCluster, SLURMCluster
    real_find_spec = cohort_module.importlib.util.find_spec
    for bokeh in (True, False):
        monkeypatch.setattr(cohort_module.importlib.util, "find_spec",
                            lambda name, *a: (real_find_spec(name, *a) if name != "bokeh" else object() if bokeh
                                              else None))
        if bokeh:
            assert cohort_module._dashboard(apart) == cohort_module._dashboard(own) == link
        else:
            assert cohort_module._dashboard(own) == f"{link} once bokeh is installed (pip install " \
                                                   "nucleiseg-monai[cluster])"
            # the scheduler started apart has an environment of its own, which may well have bokeh
            assert cohort_module._dashboard(apart) == f"{link} (where the scheduler's environment has bokeh: " \
                                                     "pip install bokeh there)"


def test_dask_info_stays_out_of_the_log_unless_debug_is_asked_for(caplog):
    dask_logger = logging.getLogger("distributed")
    level = dask_logger.level
    caplog.set_level(logging.INFO)
    with quiet_dask():
        assert not dask_logger.isEnabledFor(logging.INFO) and dask_logger.isEnabledFor(logging.WARNING)
    assert dask_logger.level == level
    caplog.set_level(logging.DEBUG)
    with quiet_dask():
        assert dask_logger.level == level


def test_slide_list_columns_relative_paths_and_errors(tmp_path):
    (tmp_path / "list.tsv").write_text("path\tslide\tinput_mpp\tnotes\nimgs/a.tif\t\t\tx\n/abs/b.svs\tcase 7\t0.5\t\n")
    a, b = read_slide_list(tmp_path / "list.tsv")
    assert a == Slide(str(tmp_path / "imgs" / "a.tif"), "a", None)
    assert b == Slide("/abs/b.svs", "case 7", 0.5)
    assert read_cohort(tmp_path / "list.tsv") == [a, b]
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "scan_0815.svs").write_bytes(b"")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "case7.svs").symlink_to(tmp_path / "store" / "scan_0815.svs")
    # a link is named as the list and the folder name it, not by the file it points at
    assert read_cohort(tmp_path / "imgs") == [Slide(str(tmp_path / "imgs" / "case7.svs"), "case7", None)]
    (tmp_path / "links.csv").write_text("path\nimgs/case7.svs\n")
    assert read_cohort(tmp_path / "links.csv") == [Slide(str(tmp_path / "imgs" / "case7.svs"), "case7", None)]
    # a list in a linked folder naming ../raw/a.svs: the file system's parent of the link's target, not of the link
    (tmp_path / "projects" / "cohortA").mkdir(parents=True)
    (tmp_path / "projects" / "raw").mkdir()
    (tmp_path / "projects" / "raw" / "a.svs").write_bytes(b"")
    (tmp_path / "cohort").symlink_to(tmp_path / "projects" / "cohortA")
    (tmp_path / "cohort" / "slides.csv").write_text("path\n../raw/a.svs\n")
    [slide] = read_cohort(tmp_path / "cohort" / "slides.csv")
    assert Path(slide.path).is_file() and Path(slide.path).resolve() == tmp_path / "projects" / "raw" / "a.svs"

    (tmp_path / "bad.csv").write_text("file,slide\nx.tif,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*'path' column"):
        read_slide_list(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("path,input_mpp\nx.tif,0.25um\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: input_mpp '0.25um'"):
        read_slide_list(tmp_path / "bad.csv")
    for name in ("../escaped", "case/B", ".hidden", "..", "a\\b"):  # outputs would land outside the folder, or hidden
        (tmp_path / "bad.csv").write_text(f"path,slide\nx.tif,{name}\n")
        with pytest.raises(ValueError, match=r"bad\.csv, line 2: slide name .* would put outputs outside"):
            read_slide_list(tmp_path / "bad.csv")
    # names Windows cannot write: ':' would even hide the outputs in a stream of a file named 'Patient 3'
    for name, why in (("Patient 3: block A", "holds ':', which Windows does not allow"),
                      ('a<b>"c"', "holds '\"' '<' '>', which Windows does not allow"),
                      ("con", "is a device name on Windows"), ("LPT1.case", "is a device name on Windows"),
                      ("case 7.", "ends in a dot or space")):
        (tmp_path / "bad.csv").write_text(f"path,slide\nx.tif,{name}\n")
        with pytest.raises(ValueError, match=re.escape(f"bad.csv, line 2: slide name {name!r} {why}")):
            read_slide_list(tmp_path / "bad.csv")
    (tmp_path / "ok.csv").write_text("path,slide\nx.tif,case 7 (block A)\nconsole.svs,\n")
    assert [s.name for s in read_slide_list(tmp_path / "ok.csv")] == ["case 7 (block A)", "console"]


def test_a_slide_list_pixel_size_far_from_any_scans_is_warned_about_when_read(tmp_path, caplog):
    (tmp_path / "list.csv").write_text("path,input_mpp\na.tif,5\nb.tif,0.5\n")
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.cohort"):
        assert [s.input_mpp for s in read_slide_list(tmp_path / "list.csv")] == [5.0, 0.5]
    [warning] = caplog.records
    assert warning.getMessage().startswith(f"{tmp_path / 'list.csv'}, line 2: input_mpp 5 is outside the 0.1-2 um/px")


def test_run_table_is_a_slide_list_and_stale_temporaries_go(tmp_path):
    table = RunTable(tmp_path / "run.csv", [{"slide": "s1", "path": str(tmp_path / "s1.tif"), "status": "pending"}])
    table.update(0, {"slide": "s1", "path": str(tmp_path / "s1.tif"), "status": "done", "seconds": 1.5,
                     "mpp": 0.25, "nuclei": 3, "nuclei_per_mm2": None, "peak_rss_mb": 9})
    row = RunTable.read(tmp_path / "run.csv")["s1"]
    assert row["status"] == "done" and row["nuclei"] == "3" and row["nuclei_per_mm2"] == "" and "peak_rss_mb" not in row
    assert read_slide_list(tmp_path / "run.csv") == [Slide(str(tmp_path / "s1.tif"), "s1")]
    given = RunTable(tmp_path / "given.csv", [{"slide": "s2", "path": str(tmp_path / "s2.tif"), "input_mpp": 0.5}])
    given.flush()  # a slide list's pixel size is kept, so the table re-runs the slide as the list did
    assert read_slide_list(tmp_path / "given.csv") == [Slide(str(tmp_path / "s2.tif"), "s2", 0.5)]

    stale = [".s1.labels.tif.ab12.tmp.tif", ".s1.done.json.cd34.tmp.json", ".s1.geojson.x.tmp.geojson"]
    kept = [".s1.x.labels.tif.ab12.tmp.tif", "s1.labels.tif", ".s10.geojson.y.tmp.geojson"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"")
    remove_temporaries(tmp_path, "s1")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".csv") == sorted(kept)


def test_region_tasks_keep_their_regions_in_the_journal_the_slide_task_claimed(cohort, tmp_path, monkeypatch):
    """A split slide's band tasks add each region to the journal its slide task claimed and take the ones in it,
    so a cohort run again after a kill computes only what it had not finished; unclaimed, nothing is kept."""
    root, bundle, _ = cohort
    predictor = BundlePredictor(str(bundle))()
    path, out = str(root / "slides" / "slide0.tif"), tmp_path / "out"
    with predictor.planned(path) as (plan, _):
        regions = [ij for ij in np.ndindex(*plan.todo.shape) if plan.todo[ij]]
    assert len(regions) > 1
    band_labels(predictor, path, regions[:1], out, "slide0")
    assert not (out / ".slide0.regions").exists()  # only the slide task claims a journal

    with predictor.planned(path) as (plan, _):
        claim_journal(predictor, plan, out, "slide0")
    first = band_labels(predictor, path, regions, out, "slide0")
    assert len(list((out / ".slide0.regions").rglob("r*.npy.z"))) == len(regions)
    monkeypatch.setattr(predictor, "region_labels", lambda *_: pytest.fail("a kept region was computed again"))
    monkeypatch.setattr("nucleiseg_monai.region_tasks.pack", lambda *_: pytest.fail("a kept region was packed again"))
    again = band_labels(predictor, path, regions, out, "slide0")
    assert [ij for ij, _ in again] == regions
    assert again == first  # the kept bytes themselves, sent on
    assert all(np.array_equal(unpack(a), unpack(b)) for (_, a), (_, b) in zip(first, again))


def test_region_bands_are_contiguous():
    regions = [(i, j) for i in range(3) for j in range(3)]
    parts = bands(regions, 4)
    assert [len(part) for part in parts] == [2, 2, 3, 2] and sum(parts, []) == regions
    assert bands(regions[:2], 4) == [[(0, 0)], [(0, 1)]]


@pytest.mark.slow
def test_a_client_killed_mid_cohort_resumes_where_it_stopped(cohort, tmp_path):
    """kill -9 of the client and its workers once the run table shows a finished slide; the same command again
    skips the finished slides, completes the others, leaves no temporaries, matches a serial run byte for byte."""
    _, bundle, _ = cohort
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(5):
        write_slide(make_slide((384, 640), seed=20 + i, tissue=True, touching=0.0), slides / f"slide{i}.tif",
                    tile=128)
    names = [f"slide{i}" for i in range(5)]
    serial = BundlePredictor(str(bundle))().run(slides, tmp_path / "serial")
    assert serial.ok and len(serial.done) == 5
    out = tmp_path / "out"
    command = [sys.executable, "-m", "nucleiseg_monai.cli", "predict", "--bundle", str(bundle), "--input",
               str(slides), "--output_dir", str(out), "--workers", "2"]
    # two cores as here, so each worker takes one torch thread like the serial runs above
    cores = sorted(os.sched_getaffinity(0))[:2]
    client = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: os.sched_setaffinity(0, cores))
    try:
        deadline = time.monotonic() + 600
        while not any(row["status"] == "done" for row in _rows(out / "run_table.csv")):
            assert client.poll() is None and time.monotonic() < deadline, "the cohort ended before it was killed"
            time.sleep(0.05)
        os.kill(client.pid, signal.SIGKILL)
    finally:
        _kill_group(client)
    killed = {row["slide"]: row["status"] for row in _rows(out / "run_table.csv")}
    finished = {p.name.split(".")[0] for p in out.glob("*.done.json")}
    assert finished and len(finished) < 5, "the kill must come while slides are left"

    again = subprocess.run(command, preexec_fn=lambda: os.sched_setaffinity(0, cores), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    table = _table(out / "run_table.csv")
    assert {name for name, row in table.items() if row["status"] == "skipped"} == finished
    assert {name for name, row in table.items() if row["status"] == "done"} == set(names) - finished
    assert {name for name, status in killed.items() if status == "done"} <= finished
    _assert_same_outputs(out, tmp_path / "serial", names)  # also: no temporaries left


def _rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group of ``process`` (its Dask nannies and workers) and wait until none is left."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 30
    while True:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, "worker processes of the killed cohort survived"
        time.sleep(0.1)


def test_run_bundle_cohort_is_the_cohort_for_a_bundle_runner(tmp_path, monkeypatch):
    import nucleiseg_monai.cohort as cohort_module

    calls = []

    def predict_cohort(source, output_dir, factory, **options):
        calls.append((source, output_dir, factory, options))
        return CohortSummary(tmp_path / "run_table.csv", [{"slide": "a", "path": "/a.tif", "status": "failed",
                                                          "error": "ImageError: not an image"},
                                                         {"slide": "b", "path": "/b.tif", "status": "done"}])

    monkeypatch.setattr(cohort_module, "predict_cohort", predict_cohort)
    # the runner a bundle's inference.json holds, with the ids it reads
    config = {
        "imports": ["$import nucleiseg_monai"], "bundle_root": "bundle", "input": "cohort.csv", "output_dir": "out",
        "workers": 2, "scheduler": None, "split_above_mpx": 500, "cohort_overrides": {"predictor#overwrite": True},
        "cohort": [
            "$import nucleiseg_monai.cohort",
            "$nucleiseg_monai.cohort.raise_on_failure(nucleiseg_monai.cohort.run_bundle_cohort(@bundle_root, @input, "
            "@output_dir, workers=@workers, scheduler=@scheduler, split_above_mpx=@split_above_mpx, "
            "overrides=@cohort_overrides))",
        ],
    }
    with pytest.raises(RuntimeError, match="Failed to evaluate") as failed:  # MONAI's, raised from ours
        ConfigParser(config).get_parsed_content("cohort")
    assert re.match(r"1 slide\(s\) failed \(1 done.*\n  /a.tif: ImageError: not an image$",
                    str(failed.value.__cause__), re.S)
    (source, output_dir, factory, options), = calls
    assert (source, output_dir) == ("cohort.csv", "out")
    assert factory == BundlePredictor(str(Path("bundle").resolve()), (("predictor#overwrite", True),))
    assert options == {"workers": 2, "scheduler": None, "retries": 2, "table": None, "overwrite": True,
                       "split_above_mpx": 500}
    summary = run_bundle_cohort("bundle", "cohort.csv", "out")
    summary.rows.pop(0)
    assert raise_on_failure(summary) is summary


def test_a_pixel_size_only_assumed_gives_the_run_table_no_figure_in_microns():
    """As the outputs leave um^2 out where the model's pixel size was only assumed, so does the run table."""
    manifest = {"mpp": 0.25, "mpp_source": "assumed", "tissue_fraction": 0.5, "shape": [2000, 1000]}
    assert cohort_module._stated_mpp(manifest) is None and cohort_module._tissue_mm2(manifest) is None
    manifest["mpp_source"] = "file"
    assert cohort_module._stated_mpp(manifest) == 0.25
    assert cohort_module._tissue_mm2(manifest) == pytest.approx(0.5 * 2000 * 1000 * 0.25**2 / 1e6)


class _FinishedTask:
    """A slide task as the loop of ``run_cohort`` sees it once done: finished, with its row."""

    status = "finished"

    def __init__(self, slide: Slide):
        self.row = {"slide": slide.name, "path": slide.path, "status": "done", "nuclei": 3, "seconds": 0.5,
                    "log": [], "worker": "w1", "peak_rss_mb": 1.0}

    def result(self):
        return dict(self.row)

    def release(self):
        pass


class _Client:
    """What ``run_cohort`` asks of a Dask client, its tasks finished at once."""

    dashboard_link = "http://dashboard"

    def submit(self, fn, factory, slide, *args, **kwargs):
        return _FinishedTask(slide)

    def scheduler_info(self):
        return {"workers": {"w1": {}, "w2": {}}}

    def nthreads(self):
        return {"w1": 1, "w2": 1}


class _AsCompleted(list):
    """Dask's as_completed for tasks finished at once: futures in the order given, more added as it goes."""

    def __init__(self, futures=(), loop=None):
        super().__init__(futures)

    def update(self, futures):
        self.extend(futures)

    def add(self, future):
        self.append(future)


def test_a_worker_holds_only_the_slides_it_runs_the_rest_are_sent_as_threads_free(tmp_path, monkeypatch):
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    held, most = [], []

    class Counting(_Client):
        def submit(self, fn, factory, slide, *args, **kwargs):
            held.append(slide.name)
            most.append(len(held))
            return _Done(slide, held)

    class _Done(_FinishedTask):
        def __init__(self, slide, held):
            super().__init__(slide)
            self.slide, self.held = slide, held

        def result(self):
            self.held.remove(self.slide.name)  # finished: its thread is free again
            return super().result()

    slides = [Slide(str(tmp_path / f"s{i}.tif"), f"s{i}") for i in range(5)]
    summary = run_cohort(Counting(), slides, tmp_path / "out", lambda: None, progress=False)
    assert [row["status"] for row in summary.rows] == ["done"] * 5
    assert max(most) == 2  # the two threads of the cluster, never the five slides at once


def test_two_slides_of_one_output_name_count_both_and_the_refused_one_logs_an_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    slides = [Slide(str(tmp_path / "caseA" / "tile_001.tif"), "tile_001"),
              Slide(str(tmp_path / "caseB" / "tile_001.tif"), "tile_001")]
    caplog.set_level(logging.INFO, logger="nucleiseg_monai.cohort")
    summary = run_cohort(_Client(), slides, tmp_path / "out", lambda: None, progress=False)
    assert [row["status"] for row in summary.rows] == ["done", "failed"]
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.ERROR, f"failed on {slides[1].path}: same output name 'tile_001' as {slides[0].path}; give one "
                           "of them another name (the 'slide' column of a slide list)") in said
    assert [m.split(";")[0] for _, m in said if " workers" in m] == [
        "2 slides on 2 workers (1 refused before starting)"]


def test_output_names_that_differ_only_in_case_are_one_name():
    # one set of files on macOS's and Windows' file systems: the second slide would overwrite or fight the first
    slides = [Slide("/a/S01.svs", "S01"), Slide("/b/s01.svs", "s01"), Slide("/c/S02.svs", "S02")]
    kept, clashes = cohort_module._runnable(slides, Path("/out"))
    assert kept == [0, 2] and clashes == {1: "same output name 's01' as /a/S01.svs; give one of them another name "
                                             "(the 'slide' column of a slide list)"}


def test_the_package_imports_and_runs_where_there_is_no_resource_module(monkeypatch):
    # Windows has none: every nucleiseg predict imported it through this module. A copy of the module is run with
    # it hidden (the libraries it imports are loaded already: psutil's Linux part needs it; Windows' has its own)
    monkeypatch.setitem(sys.modules, "resource", None)
    spec = importlib.util.spec_from_file_location("nucleiseg_monai._cohort_without_resource", cohort_module.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, copy)  # where its dataclasses look their module up
    spec.loader.exec_module(copy)
    assert copy._peak_rss_mb() is None  # Linux's psutil has no peak working set: no figure, not a wrong one
    monkeypatch.undo()
    assert 50 < cohort_module._peak_rss_mb() < 1e5  # here, in MB


def test_a_run_table_another_program_holds_open_is_written_when_it_lets_go(tmp_path, monkeypatch, caplog):
    """Windows cannot replace a file open in Excel: the cohort goes on, and says so once."""
    table = RunTable(tmp_path / "run_table.csv", [{"slide": "a", "status": "pending"}, {"slide": "b"}], share=1e-9)
    real_replace = os.replace

    def held(src, dst):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process")

    monkeypatch.setattr(cohort_module.os, "replace", held)
    for status in ("done", "failed"):
        table.update(0, {"slide": "a", "status": status})
    assert not table.path.exists() and [p.name for p in tmp_path.iterdir()] == []  # no temporary left
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"{table.path} could not be replaced"]
    monkeypatch.setattr(cohort_module.os, "replace", real_replace)
    table.update(1, {"slide": "b", "status": "done"})
    table.flush()  # as the cohort's loop ends
    assert [(r["slide"], r["status"]) for r in RunTable.read(table.path).values()] == [("a", "failed"), ("b", "done")]


def test_a_slide_another_run_finished_after_the_task_looked_is_not_done_again(cohort, tmp_path, monkeypatch):
    root, bundle, serial = cohort
    worker = type("Worker", (), {"address": "tcp://w:1", "get_current_task": lambda self: "slide-slide0-1"})()
    monkeypatch.setattr(cohort_module, "get_worker", lambda: worker)
    out = tmp_path / "out"
    shutil.copytree(root / "serial", out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    real, looks = SlidePredictor.finished, []

    def looked_too_early(self, output_dir, name, path=None):  # the task's first look came before the other's commit
        looks.append(name)
        return len(looks) > 1 and real(self, output_dir, name, path)

    monkeypatch.setattr(SlidePredictor, "finished", looked_too_early)
    slide = Slide(str(root / "slides" / "slide0.tif"), "slide0")
    row = process_slide(BundlePredictor(str(bundle)), slide, str(out), torch_threads=1)
    assert (row["status"], row["seconds"], row["nuclei"], looks) == ("skipped", None, serial["slide0"].nuclei,
                                                                     ["slide0", "slide0"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # the merge of a split slide likewise, before its region tasks' labels are fetched
    row = merge_slide(BundlePredictor(str(bundle)), slide, str(out), 1, labels=None)
    assert (row["status"], row["seconds"], row["nuclei"]) == ("skipped", None, serial["slide0"].nuclei)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_workers_share_counts_only_the_workers_that_may_run_on_its_cores(monkeypatch):
    """Two jobs given a node's two halves (SLURM cpusets) each keep their half; workers of one job share it."""
    workers = {f"tcp://10.0.0.5:{port}": {"host": "10.0.0.5", "nthreads": 1} for port in (1, 2, 3)}
    workers["tcp://10.0.0.6:1"] = {"host": "10.0.0.6", "nthreads": 4}  # another node
    job, other_job = list(range(8)), list(range(8, 16))
    answers = {"tcp://10.0.0.5:1": job, "tcp://10.0.0.5:2": job, "tcp://10.0.0.5:3": other_job}

    class Client:
        def scheduler_info(self):
            return {"workers": workers}

        def run(self, function, workers, on_error):
            assert sorted(workers) == sorted(answers) and on_error == "return"
            return dict(answers)

    monkeypatch.setattr(cohort_module, "get_worker", lambda: type("Worker", (), {"ip": "10.0.0.5"}))
    monkeypatch.setattr(cohort_module, "get_client", Client)
    monkeypatch.setattr(cohort_module, "cpus", lambda: job)
    assert host_share() == 4  # 8 cores, 2 workers on them; the other job's worker and the other node left out
    answers["tcp://10.0.0.5:3"] = OSError("worker gone")  # cannot be asked: counted
    assert host_share() == 2


def _stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


class _NothingSent(_Client):
    def submit(self, *args, **kwargs):
        pytest.fail("a slide was sent out")


def test_a_cohort_meeting_outputs_of_other_settings_stops_before_any_slide_as_a_single_run_does(
        cohort, tmp_path, monkeypatch, capsys):
    root, bundle, _ = cohort
    out = tmp_path / "out"
    shutil.copytree(root / "serial", out)
    (out / "slide2.done.json").unlink()  # the one slide a re-run with other settings would do
    RunTable(out / "run_table.csv", [{"slide": f"slide{i}", "path": "x", "status": "done", "nuclei": 7}
                                     for i in range(3)]).flush()
    before = _stamps(out)
    # refused before a cluster is started: on a batch system its jobs would first wait in the queue
    monkeypatch.setattr(cohort_module, "dask_client", lambda *a, **k: pytest.fail("a cluster was started"))
    args = ["predict", "--bundle", str(bundle), "--input", str(root / "slides"), "--output_dir", str(out),
            "--set", "predictor#planner#region_margin=16"]
    assert main([*args, "--workers", "2"]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"nucleiseg predict: error: {out} holds finished outputs of slide0, slide1 made with other "
                           "weights or settings (differing: region_margin); pass --overwrite")
    assert _stamps(out) == before  # the run table and the outputs as they were
    assert main(args) == 2 and capsys.readouterr().err == said  # the single-process run's own words

    # a cluster of the user's own (dask-jobqueue) passed to run_cohort is refused alike, with nothing sent out
    with pytest.raises(FileExistsError, match=r"slide0, slide1 made with other weights or settings"):
        run_cohort(_NothingSent(), read_cohort(root / "slides"), out,
                   BundlePredictor(str(bundle), (("predictor#planner#region_margin", 16),)), progress=False)
    assert _stamps(out) == before


def test_each_slide_of_a_list_is_compared_with_the_pixel_size_its_row_gives(cohort, tmp_path):
    root, bundle, _ = cohort
    factory = BundlePredictor(str(bundle))
    predictor = factory()
    out = tmp_path / "out"
    for name, mpp in (("a", 0.25), ("b", 0.5)):  # files that state no pixel size: the row's applies
        tifffile.imwrite(tmp_path / f"{name}.tif", tifffile.imread(root / "slides" / "slide0.tif"))
        predictor.input_mpp = mpp
        predictor.predict_slide(tmp_path / f"{name}.tif", out, name)
    a, b = Slide(str(tmp_path / "a.tif"), "a", 0.25), Slide(str(tmp_path / "b.tif"), "b", 0.5)
    assert cohort_module.finished_slides(factory, [a, b], out) == {"a", "b"}
    with pytest.raises(FileExistsError, match=r"holds finished outputs of b made with other weights or settings "
                                              r"\(differing: input_mpp\)"):
        cohort_module.finished_slides(factory, [a, replace(b, input_mpp=0.25)], out)
    assert cohort_module.finished_slides(factory, [a, replace(b, input_mpp=0.25)], out, overwrite=True) == set()


def test_a_client_apart_from_its_workers_leaves_int8_to_them(cohort, tmp_path):
    """int8 follows the machine (OpenVINO and NNCF installed, a CPU): a client that is not the workers' machine
    cannot tell what they resolve, so outputs differing in it alone are sent out for a worker to decide; on a local
    cluster, whose workers are this machine's, they are refused as the single-process run refuses them."""
    root, bundle, _ = cohort
    out, slide = tmp_path / "out", Slide(str(root / "slides" / "slide0.tif"), "slide0")
    BundlePredictor(str(bundle), (("predictor#network#int8", False),))().predict_slide(slide.path, out, slide.name)
    factory = BundlePredictor(str(bundle), (("predictor#network#int8", True),))
    if not factory.settings_predictor().network.int8:
        pytest.skip("int8 does not run here (OpenVINO and NNCF on a CPU)")
    with pytest.raises(FileExistsError, match=r"\(differing: int8\)"):
        cohort_module.finished_slides(factory, [slide], out)
    assert cohort_module.finished_slides(factory, [slide], out, local=False) == set()
    assert cohort_module.finished_slides(BundlePredictor(str(bundle), (("predictor#network#int8", False),)),
                                         [slide], out, local=False) == {"slide0"}


def test_a_rerun_of_finished_slides_sends_none_out_and_builds_no_network(cohort, tmp_path, monkeypatch):
    root, bundle, serial = cohort
    out = tmp_path / "out"
    shutil.copytree(root / "serial", out)
    built = []
    monkeypatch.setattr("nucleiseg_monai.inference.prepare_network", lambda *args: built.append(args))
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    slides = read_cohort(root / "slides")
    first = run_cohort(_NothingSent(), slides, out, BundlePredictor(str(bundle)), progress=False)
    again = run_cohort(_NothingSent(), slides, out, BundlePredictor(str(bundle)), progress=False)
    assert built == []
    for summary in (first, again):  # figures from the outputs, then from the run table
        assert [row["status"] for row in summary.rows] == ["skipped"] * 3
        assert [row["nuclei"] for row in summary.rows] in ([r.nuclei for r in serial.values()],
                                                           [str(r.nuclei) for r in serial.values()])
    assert _table(out / "run_table.csv") == {row["slide"]: {k: _cell(v) for k, v in row.items()} for row in first.rows}


def test_the_run_table_holds_the_slides_finished_when_the_cohort_is_interrupted(cohort, tmp_path, monkeypatch):
    root, bundle, serial = cohort
    out = tmp_path / "out"
    slides = read_cohort(root / "slides")

    class Interrupted(_AsCompleted):
        def __iter__(self):  # the first slide's result comes back, then Ctrl-C
            yield self[0]
            raise KeyboardInterrupt

    class Working(_Client):
        def submit(self, fn, factory, slide, *args, **kwargs):
            if slide.name == "slide1":  # its worker writes its outputs; its result never comes back
                for suffix in OUTPUTS:
                    shutil.copy(root / "serial" / f"slide1{suffix}", out / f"slide1{suffix}")
            return _FinishedTask(slide)

    monkeypatch.setattr(cohort_module, "as_completed", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cohort(Working(), slides, out, lambda: None, progress=False)
    table = _table(out / "run_table.csv")
    assert [table[n]["status"] for n in ("slide0", "slide1", "slide2")] == ["done", "done", "pending"]
    assert table["slide1"]["nuclei"] == str(serial["slide1"].nuclei) and table["slide1"]["seconds"] == ""


def test_a_slide_failing_for_outputs_of_other_settings_keeps_their_figures(cohort, tmp_path, monkeypatch):
    """Outputs of other settings a worker meets after the client's check (another run wrote them meanwhile) fail
    the slide, but the table does not blank the figures of what the folder holds."""
    root, _, serial = cohort
    out = tmp_path / "out"
    shutil.copytree(root / "serial", out)
    error = "FileExistsError: the finished outputs of slide0 were made with other weights or settings"

    class Refusing(_Client):
        def submit(self, fn, factory, slide, *args, **kwargs):
            task = _FinishedTask(slide)
            task.row.update(status="failed", error=error, nuclei=None, seconds=None)
            return task

    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    [row] = run_cohort(Refusing(), read_cohort(root / "slides" / "slide0.tif"), out, lambda: None,
                       progress=False).rows
    assert (row["status"], row["nuclei"]) == ("failed", serial["slide0"].nuclei)
    assert row["error"] == f"{error}; its finished outputs on disk are kept, and the figures are theirs"


def test_the_two_harmless_warnings_of_a_local_clusters_end_stay_out_of_the_log(caplog):
    nanny, state = logging.getLogger("distributed.nanny"), logging.getLogger("distributed.worker.state_machine")
    caplog.set_level(logging.WARNING)
    with cohort_module.without_harmless_noise():
        nanny.warning("Worker process still alive after %.1f seconds, killing", 4.0)
        state.warning("Async instruction for <Task 'execute(slide-a)' coro=<execute()>> ended with CancelledError")
        nanny.warning("Worker process still alive after a restart")  # not the one known to be harmless
    nanny.warning("Worker process still alive after %.1f seconds, killing", 4.0)  # filtered only for the duration
    assert [r.getMessage() for r in caplog.records] == ["Worker process still alive after a restart",
                                                        "Worker process still alive after 4.0 seconds, killing"]


def test_the_check_before_a_cluster_leaves_machine_settings_to_a_remote_schedulers_workers(tmp_path, monkeypatch):
    write_slide(make_slide((128, 128), seed=1), tmp_path / "a.tif", tile=128)
    (tmp_path / "b").mkdir()
    write_slide(make_slide((128, 128), seed=2), tmp_path / "b" / "a.tif", tile=128)
    seen = []

    def finished_slides(factory, slides, output_dir, overwrite, local):
        seen.append(([s.path for s in slides], local))
        raise FileExistsError("refused")

    monkeypatch.setattr(cohort_module, "finished_slides", finished_slides)
    monkeypatch.setattr(cohort_module, "dask_client", lambda *a, **k: pytest.fail("a cluster was started"))
    slides = tmp_path / "slides.csv"
    slides.write_text(f"path,slide\n{tmp_path / 'a.tif'},a\n{tmp_path / 'b' / 'a.tif'},a\n")
    for scheduler, local in ((None, True), ("tcp://10.0.0.1:8786", False)):
        with pytest.raises(FileExistsError, match="refused"):
            predict_cohort(slides, tmp_path / "out", lambda: None, scheduler=scheduler)
        # the first slide of a name only: run_cohort fails the second for its name
        assert seen.pop() == ([str(tmp_path / "a.tif")], local)


def test_the_check_before_the_cluster_is_the_one_run_cohort_uses(tmp_path, monkeypatch, caplog):
    """A cohort of thousands would otherwise read every manifest twice, before the cluster and in run_cohort."""
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    for name in ("a", "b"):
        write_slide(make_slide((128, 128), seed=1), tmp_path / f"{name}.tif", tile=128)
    asked = []

    def finished_slides(factory, slides, output_dir, overwrite, local):
        asked.append([s.name for s in slides])
        return {"a"}

    @contextlib.contextmanager
    def dask_client(*args):
        yield _Client(), 1

    monkeypatch.setattr(cohort_module, "finished_slides", finished_slides)
    monkeypatch.setattr(cohort_module, "dask_client", dask_client)
    (tmp_path / "out").mkdir()  # the run that finished a: its row gives the skipped slide's figures
    (tmp_path / "out" / "run_table.csv").write_text(f"slide,path,status,nuclei\na,{tmp_path / 'a.tif'},done,7\n")
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.cohort"):
        summary = predict_cohort(tmp_path / "*.tif", tmp_path / "out", lambda: None, progress=False)
    assert asked == [["a", "b"]]
    assert [(row["slide"], row["status"], row["nuclei"]) for row in summary.rows] == [("a", "skipped", "7"),
                                                                                     ("b", "done", 3)]
    assert "2 slides on 2 workers (1 already complete)" in caplog.text


def test_a_slide_whose_paths_windows_would_refuse_fails_before_anything_is_sent_out(tmp_path, monkeypatch, caplog,
                                                                                     windows):
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    asked, sent = [], []

    def finished_slides(factory, slides, output_dir, overwrite, local):
        asked.append([s.name for s in slides])
        return set()

    class Sending(_Client):
        def submit(self, fn, factory, slide, *args, **kwargs):
            sent.append(slide.name)
            return super().submit(fn, factory, slide, *args, **kwargs)

    @contextlib.contextmanager
    def dask_client(*args):
        yield Sending(), 1

    monkeypatch.setattr(cohort_module, "finished_slides", finished_slides)
    monkeypatch.setattr(cohort_module, "dask_client", dask_client)
    long = "S" * 200  # as a laboratory system's slide names may be
    (tmp_path / "slides.csv").write_text(f"path,slide\na.tif,short\nb.tif,{long}\n")
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.cohort"):
        summary = predict_cohort(tmp_path / "slides.csv", tmp_path / "out", lambda: None, progress=False)
    assert asked == [["short"]] and sent == ["short"]
    assert [row["status"] for row in summary.rows] == ["done", "failed"]
    error = summary.rows[1]["error"]
    assert error.startswith(f"output name {long!r} needs paths of up to ") and "LongPathsEnabled" in error
    assert f"failed on {tmp_path / 'b.tif'}: {error}" in caplog.messages
    assert "2 slides on 2 workers (1 refused before starting)" in caplog.text


class _Remembering(_Client):
    """A client of workers with two task slots each, remembering each task's arguments and whether the client's
    mark was in the output folder as the task was sent."""

    def __init__(self):
        self.sent = []

    def nthreads(self):
        return {"tcp://w1:1": 2, "tcp://w2:1": 1}

    def submit(self, fn, factory, slide, output_dir, *args, **kwargs):
        mark = args[-1]
        self.sent.append((mark, (Path(output_dir) / mark).exists()))
        return _FinishedTask(slide)


def test_workers_of_a_cluster_apart_are_asked_to_see_the_clients_output_folder(tmp_path, monkeypatch, caplog):
    """A batch system's worker may be given a node-local folder of the same name: its outputs would be reported
    done and vanish with the job. The client keeps a mark in the folder while the cohort runs, each task looks."""
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    client, out = _Remembering(), tmp_path / "out"
    slides = [Slide(str(tmp_path / f"s{i}.tif"), f"s{i}") for i in range(2)]
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.cohort"):
        summary = run_cohort(client, slides, out, lambda: None, progress=False)
    assert summary.ok and len(client.sent) == 2
    assert all(mark.startswith(".nucleiseg-cohort-") and seen for mark, seen in client.sent)
    assert not list(out.glob(".nucleiseg-cohort-*"))  # gone when the run ends
    assert "workers tcp://w1:1 run several tasks each" in caplog.text
    assert "start workers with --nthreads 1" in caplog.text
    assert "2 slides on 2 workers" in caplog.text

    worker = type("Worker", (), {"address": "tcp://node7:40000"})()
    monkeypatch.setattr(cohort_module, "get_worker", lambda: worker)
    (out / "mark").write_bytes(b"")
    cohort_module.check_shared(out, "mark")
    cohort_module.check_shared(tmp_path / "elsewhere", None)  # a local cluster's tasks: no mark to look for
    with pytest.raises(cohort_module.OutputsNotShared, match=re.escape(
            f"the output folder {tmp_path / 'node'} as worker tcp://node7:40000 sees it is not the one the cohort's "
            "client writes to (it lacks the client's mark): --output_dir must be a folder that the client and every "
            "worker share, not a node-local /tmp, $TMPDIR or /scratch")):
        cohort_module.check_shared(tmp_path / "node", "mark")


def test_a_bundle_refusing_a_workers_package_fails_its_task_with_the_reason_not_the_worker(monkeypatch):
    """require_package's SystemExit would end the worker process, which Dask restarts and counts as a death, and
    its reason would stay in that worker's stderr."""
    worker = type("Worker", (), {"address": "tcp://node7:40000"})()
    monkeypatch.setattr(cohort_module, "get_worker", lambda: worker)
    monkeypatch.setattr(cohort_module, "_cache", None)

    def old_package():
        raise SystemExit("the bundle needs nucleiseg-monai 0.3.6 or newer; this is 0.2.0: "
                         "pip install -U nucleiseg-monai")

    with pytest.raises(RuntimeError, match=r"^on worker tcp://node7:40000: the bundle needs nucleiseg-monai 0\.3\.6 "
                                           r"or newer; this is 0\.2\.0: pip install -U nucleiseg-monai$"):
        cohort_module.worker_predictor(old_package, 1)


def test_a_bundle_named_by_a_relative_path_is_found_by_workers_running_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert BundlePredictor("bundles/mine").bundle == str(tmp_path / "bundles" / "mine")
    assert BundlePredictor("bundles/mine") == BundlePredictor(str(tmp_path / "bundles" / "mine"))


def test_a_split_slides_region_results_are_released_when_the_loop_ends_early():
    deleted = []
    variable = type("Variable", (), {"delete": lambda self: deleted.append(self)})
    held = {3: (0.0, [variable(), variable()])}
    with pytest.raises(KeyboardInterrupt), cohort_module._released_at_exit(held):
        raise KeyboardInterrupt
    assert len(deleted) == 2


@pytest.mark.slow
def test_a_cluster_joined_by_address_checks_the_clients_mark_on_its_workers(cohort, tmp_path):
    root, bundle, serial = cohort
    slides = read_cohort(root / "slides")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            dask_client(scheduler=cluster.scheduler_address) as (client, _):
        summary = run_cohort(client, slides, tmp_path / "out", BundlePredictor(str(bundle)), progress=False)
        # a worker that does not see the client's folder (here: one the client never wrote its mark into)
        blind = client.submit(process_slide, BundlePredictor(str(bundle)), slides[0], str(tmp_path / "node"), 1,
                              False, None, None, ".nucleiseg-cohort-0", pure=False)
        with pytest.raises(cohort_module.OutputsNotShared, match="as worker tcp://.* sees it is not the one"):
            blind.result()
    assert summary.ok and [row["status"] for row in summary.rows] == ["done"] * 3
    _assert_same_outputs(tmp_path / "out", root / "serial", serial)
    assert not list((tmp_path / "out").glob(".nucleiseg-cohort-*"))


def test_a_slide_its_worker_cannot_find_but_this_machine_can_says_the_file_systems_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(cohort_module, "as_completed", _AsCompleted)
    (tmp_path / "here.tif").write_bytes(b"")
    slides = [Slide(str(tmp_path / "here.tif"), "here"), Slide(str(tmp_path / "gone.tif"), "gone")]

    class Blind(_Client):
        def submit(self, fn, factory, slide, *args, **kwargs):
            task = _FinishedTask(slide)
            task.row.update(status="failed", error=f"FileNotFoundError: {slide.path} does not exist or is not a file")
            return task

    rows = run_cohort(Blind(), slides, tmp_path / "out", lambda: None, progress=False).rows
    assert rows[0]["error"].endswith("is not a file; it exists where this command runs, so the workers see another "
                                     "file system: put the slides where every worker sees them, under the same path")
    assert rows[1]["error"] == f"FileNotFoundError: {slides[1].path} does not exist or is not a file"


def test_workers_joining_after_the_start_get_slides_without_waiting_for_one_to_finish(tmp_path, monkeypatch, caplog):
    """As with ``cluster.scale(jobs=20)`` while the jobs wait in the queue: no worker at the start, then two."""
    monkeypatch.setattr(cohort_module, "JOIN_POLL_S", 0.02)
    monkeypatch.setattr(cohort_module, "NO_WORKERS_WARNING_S", 0.1)
    slides = [Slide(str(tmp_path / f"s{i}.tif"), f"s{i}") for i in range(3)]
    joined, running = threading.Event(), []

    class Task(_FinishedTask):
        status = "pending"

    class Queued(_Client):
        def nthreads(self):
            return {"w1": 1, "w2": 1} if joined.is_set() else {}

        def submit(self, fn, factory, slide, *args, **kwargs):
            running.append(slide.name)
            return Task(slide)

    class Waiting(_AsCompleted):
        def __iter__(self):  # no task ends before the workers have joined and taken two slides
            deadline = time.monotonic() + 10
            while len(running) < 2:
                assert time.monotonic() < deadline, "the workers that joined got no slide"
                time.sleep(0.01)
            for future in list.__iter__(self):
                future.status = "finished"
                yield future

    class JoinOnWarning(logging.Handler):  # the workers join once the client has said it has none
        def emit(self, record):
            if "has had no worker" in record.getMessage():
                joined.set()

    monkeypatch.setattr(cohort_module, "as_completed", Waiting)
    cohort_module.logger.addHandler(handler := JoinOnWarning())
    try:
        with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.cohort"):
            summary = run_cohort(Queued(), slides, tmp_path / "out", lambda: None, progress=False)
    finally:
        cohort_module.logger.removeHandler(handler)
    assert running[:2] == ["s0", "s1"] and sorted(running) == ["s0", "s1", "s2"]
    assert [row["status"] for row in summary.rows] == ["done"] * 3
    assert caplog.text.count("the cluster has had no worker for 0 s while slides wait: check that its workers") == 1
