"""End to end through the real CLI, as users type it: ``python -m monai.bundle run training|evaluating|run``, resume,
and two-process DDP (gloo on CPU), on a copy of the small bundle's configs with a tiny network and a synthetic
dataset. Each run is a subprocess limited to one thread: the machine has two cores."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.io import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import bundle_outputs
from nucleiseg_monai.networks import UNet
from nucleiseg_monai.synthetic import write_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "nuclei_unet_small" / "configs"
FEATURES = [8, 16, 32, 64]
BATCH, EPOCH_LENGTH = 2, 5
TILE = 128


def data_args(dataset: Path) -> list[str]:
    return ["--data_root", str(dataset.parent), "--sources_file", str(dataset.parent / "sources.json")]


def tiny_args(dataset: Path) -> list[str]:
    # 128 px tiles: the validation/evaluation window shrinks from 256 so a tile is not padded to 4 times its area
    return data_args(dataset) + [
        "--patch_size", "[64,64]", "--batch_size", str(BATCH), "--epoch_length", str(EPOCH_LENGTH),
        "--num_workers", "0", "--val_interval", "1", "--network_def#features", json.dumps(FEATURES),
        "--window", str(TILE)]


def eval_args(dataset: Path, root: Path) -> list[str]:
    # the synthetic tiles share CryoNuSeg's names: real observer annotations must not be scored against them
    return data_args(dataset) + ["--network_def#features", json.dumps(FEATURES),
                                 "--window", str(TILE),
                                 "--observers_dir", str(root / "no_observers")]


def trained_network(bundle: Path) -> UNet:
    """The bundle's own network with the tests' tiny features, holding the run's weights (a plain state dict, strict)."""
    net = UNet(out_channels=bundle_outputs(bundle), features=FEATURES)
    net.load_state_dict(load(bundle / "models" / "model.pt"))
    return net


def overlay(bundle: Path, name: str) -> str:
    return f"['{bundle}/configs/train.json','{bundle}/configs/{name}']"


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(command: list[str], cwd: Path, timeout: int = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def bundle_run(runner: str | None, config: Path | str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run"] + ([runner] if runner else [])
    return run(command + ["--config_file", str(config)] + args, cwd)


def ok(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-6000:]}"
    return output


def copy_bundle(root: Path, name: str = "nuclei_unet_small") -> Path:
    """The bundle's configs alone in a new folder: a user's copy, whose models/ and runs/ start empty."""
    shutil.copytree(CONFIGS, root / name / "configs")
    return root / name


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def iterations_per_epoch(bundle: Path, ranks: int = 1) -> int:
    return math.ceil(EPOCH_LENGTH * BATCH // ranks / BATCH)


def scalars(bundle: Path, tag: str = "train_loss") -> dict[int, float]:
    """Step -> logged value of one TensorBoard scalar over all event files of the bundle's runs/."""
    values: dict[int, float] = {}
    for path in sorted((bundle / "runs").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            for e in events.Scalars(tag):
                assert e.step not in values, f"{tag} at step {e.step} logged twice"
                values[e.step] = e.value
    return values


def train_loss(bundle: Path) -> dict[int, float]:
    return scalars(bundle, "train_loss")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 2 organs x 8 tiles: 4 test, 2 validation (one per DDP rank), 10 training tiles; one source of the registry
    root = tmp_path_factory.mktemp("data")
    (root / "sources.json").write_text(json.dumps({"synthetic": {
        "root": "synthetic", "layout": "kaggle", "mpp": 0.25, "organs": "name",
        "split": {"kind": "organ_stratified", "val_fraction": 0.15, "test_fraction": 0.3, "seed": 0}}}))
    return write_dataset(root / "synthetic", n_tiles=16, size=TILE, organs=("Skin", "Thymus"), seed=1)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, dataset) -> tuple[Path, str]:
    """A bundle trained one epoch with ``monai.bundle run`` and no runner id; tests copy it, never change it."""
    root = tmp_path_factory.mktemp("one_epoch")
    bundle = copy_bundle(root)
    output = ok(bundle_run(None, bundle / "configs" / "train.json", tiny_args(dataset) + ["--epochs", "1"], root))
    return bundle, output


def copy_of(one_epoch: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the one-epoch bundle that a test may change."""
    trained, _ = one_epoch
    bundle = tmp_path / trained.name
    shutil.copytree(trained, bundle)
    return bundle


def test_training_smoke(tmp_path, dataset):
    bundle = copy_bundle(tmp_path)
    ok(bundle_run("training", bundle / "configs" / "train.json", tiny_args(dataset) + ["--epochs", "3"], tmp_path))

    assert (bundle / "models" / "checkpoint_last.pt").is_file()
    assert list((bundle / "runs").glob("events.out.tfevents.*"))
    n = iterations_per_epoch(bundle)
    losses = train_loss(bundle)
    assert sorted(losses) == list(range(1, 3 * n + 1))
    assert all(math.isfinite(v) for v in losses.values())
    first = np.mean([losses[i] for i in range(1, n + 1)])
    last = np.mean([losses[i] for i in range(2 * n + 1, 3 * n + 1)])
    assert last < first, f"train loss did not fall: epoch 1 mean {first:.4f}, epoch 3 mean {last:.4f}"
    lr = scalars(bundle, "learning_rate")  # cosine decay from 1e-3 over the 3 epochs, one value per epoch
    assert sorted(lr) == [1, 2, 3] and lr[1] > lr[2] > lr[3]
    images = set()
    for path in (bundle / "runs").glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"images": 0})
        events.Reload()
        images |= set(events.Tags()["images"])
    assert {"validation/H&E input", "validation/true classes (green: nucleus, white: rim)",
            "validation/predicted classes (yellow: nucleus, white: rim)"} <= images

    trained_network(bundle)
    assert load(bundle / "models" / "checkpoint_last.pt")["trainer"]["iteration"] == 3 * n


def test_run_without_runner_id_trains(one_epoch):
    bundle, output = one_epoch
    assert "SupervisedTrainer - INFO - Engine run resuming" not in output  # ignite's, though nothing was resumed
    trainer = load(bundle / "models" / "checkpoint_last.pt")["trainer"]
    assert trainer["max_epochs"] == 1
    assert trainer["iteration"] == trainer["epoch_length"] == iterations_per_epoch(bundle)
    trained_network(bundle)


def test_evaluate_writes_the_report(one_epoch, dataset, tmp_path):
    bundle = copy_of(one_epoch, tmp_path)  # the evaluation writes its own eval/test
    models_before = {p.name: p.read_bytes() for p in (bundle / "models").iterdir()}
    ok(bundle_run("evaluating", overlay(bundle, "evaluate.json"),
                  eval_args(dataset, tmp_path) + ["--rescans", "{'synthetic': 0.5}"], tmp_path))

    out = bundle / "eval" / "test"
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "test"
    assert set(report["sources"]) == {"synthetic", "synthetic@0.5um"}
    assert report["parts"] == {"synthetic": "test", "synthetic@0.5um": "test"}  # each record's own part
    methods = report["sources"]["synthetic"]
    assert 0.0 <= methods["model"]["mean"]["aji"] <= 1.0
    assert not any(m.startswith("human") for m in methods)
    assert report["pooled"]["model"]["n_images"] == 4  # the rescanned copy is a row of its own, not pooled
    assert (out / "metrics.csv").read_text().startswith("section,method,part,scope,name,organ,n_images,")
    names = [r["name"] for r in json.loads((bundle / "models" / "datalist.json").read_text())["test"]]
    assert len(names) == 4
    for source, size in (("synthetic", TILE), ("synthetic@0.5um", TILE // 2)):
        for name in names:
            labels = tifffile.imread(out / source / f"{name}.tif")
            assert labels.dtype == np.uint32 and labels.shape == (size, size)  # on the scored file's own grid
            drawn = imread(out / source / f"{name}_overlay.png")
            assert drawn.dtype == np.uint8 and drawn.shape[1:] == (size, 3) and drawn.shape[0] > size  # + legend
    # evaluation reads models/, never writes it
    assert {p.name: p.read_bytes() for p in (bundle / "models").iterdir()} == models_before


def test_the_evaluation_overlay_is_what_monai_runs_without_a_runner_id():
    """``python -m monai.bundle run`` without a runner id runs the id "run": train.json's trains (the one-epoch run
    above is such a run), and over it evaluate.json's is ``run evaluating``, whose report the test above checks.
    Shown on MONAI's own workflow instead of a second evaluation run, which repeated that test's seconds."""
    from monai.bundle import ConfigWorkflow

    def run(*names):
        # the CLI's defaults but the logging set-up, which would reconfigure this process's loggers
        workflow = ConfigWorkflow(config_file=[str(CONFIGS / name) for name in names], logging_file=False)
        return workflow.parser[workflow.run_id]

    assert run("train.json") == "@training" and run("train.json", "evaluate.json") == "@evaluating"


def test_resume_continues_the_run(one_epoch, dataset, tmp_path):
    bundle = copy_of(one_epoch, tmp_path)
    checkpoint = bundle / "models" / "checkpoint_last.pt"
    before = load(checkpoint)
    model_before = (bundle / "models" / "model.pt").read_bytes()

    output = ok(bundle_run("training", bundle / "configs" / "train.json",
                           tiny_args(dataset) + ["--epochs", "3", "--resume", "true"], tmp_path))
    assert f"resumed from {checkpoint} at epoch 1" in output  # so the run started at epoch 2
    assert "SupervisedTrainer - INFO - Engine run resuming" not in output  # ignite's "from iteration 0, epoch 0"

    after = load(checkpoint)
    n = iterations_per_epoch(bundle)
    assert after["trainer"]["epoch_length"] == n
    assert after["trainer"]["iteration"] == 3 * n and after["trainer"]["iteration"] // n == 3
    assert after["trainer"]["max_epochs"] == 3
    # TensorBoard steps go on from the first run's: 1..n from it, n+1..3n from the resumed one
    assert sorted(train_loss(bundle)) == list(range(1, 3 * n + 1))
    # Adam counted the first run's steps too
    assert {int(s["step"]) for s in before["optimizer"]["state"].values()} == {n}
    assert {int(s["step"]) for s in after["optimizer"]["state"].values()} == {3 * n}
    # the cosine schedule continued and now spans the 3 epochs asked for (not the first run's 1)
    assert before["lr_scheduler"]["last_epoch"] == 1
    assert after["lr_scheduler"]["last_epoch"] == 3 and after["lr_scheduler"]["T_max"] == 3
    assert after["optimizer"]["param_groups"][0]["lr"] == pytest.approx(after["lr_scheduler"]["eta_min"])
    # model.pt stays the first run's best unless the resumed run beat it
    best_before, best_after = before["best_model"], after["best_model"]
    assert best_before["best_metric_epoch"] == 1
    if best_after["best_metric_epoch"] == 1:
        assert best_after == best_before
        assert (bundle / "models" / "model.pt").read_bytes() == model_before
    else:
        assert best_after["best_metric"] > best_before["best_metric"]


# nucleiseg train, recording the batch size of the trainer's loader in the file named first
SPIED_TRAIN = textwrap.dedent("""
    import json, sys
    from monai.engines import SupervisedTrainer

    _run = SupervisedTrainer.run

    def run(self, *args, **kwargs):
        with open(sys.argv[1], "w") as f:
            json.dump({"batch_size": self.data_loader.batch_size}, f)
        return _run(self, *args, **kwargs)

    SupervisedTrainer.run = run
    from nucleiseg_monai.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def nucleiseg_train(bundle: Path, args: list[str], cwd: Path) -> tuple[str, int]:
    """``nucleiseg train --bundle BUNDLE ARGS``: its output and the batch size its trainer drew."""
    spied = cwd / "batch.json"
    output = ok(run([sys.executable, "-c", SPIED_TRAIN, str(spied), "train", "--bundle", str(bundle), *args], cwd))
    return output, json.loads(spied.read_text())["batch_size"]


# nucleiseg train, Ctrl-C pressed in the trainer iteration numbered first
INTERRUPTED_TRAIN = textwrap.dedent("""
    import sys
    from monai.engines import SupervisedTrainer

    _iteration = SupervisedTrainer._iteration

    def iteration(self, engine, batch):
        if engine.state.iteration == int(sys.argv[1]):
            raise KeyboardInterrupt
        return _iteration(self, engine, batch)

    SupervisedTrainer._iteration = iteration
    from nucleiseg_monai.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_ctrl_c_in_training_ends_in_one_line_naming_the_epoch_to_go_on_from(one_epoch, dataset, tmp_path):
    bundle = copy_of(one_epoch, tmp_path)
    checkpoint = bundle / "models" / "checkpoint_last.pt"
    n = iterations_per_epoch(bundle)
    proc = run([sys.executable, "-c", INTERRUPTED_TRAIN, str(n + 2), "train", "--bundle", str(bundle),
                *tiny_args(dataset), "--epochs", "3", "--resume", "true"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 130, output[-6000:]
    assert f"interrupted (Ctrl-C) in epoch 2: {checkpoint} holds the run after epoch 1; run the same command with " \
           "--resume true to go on from there" in output
    assert "ERROR" not in output  # nor ignite's and StatsHandler's lines with nothing after "exception: "
    assert output.count("interrupted") == 1  # nor the command's own
    assert load(checkpoint)["trainer"]["iteration"] == n


def validated_epochs(bundle: Path) -> list[int]:
    return sorted(scalars(bundle, "val_aji"))


def test_nucleiseg_train_resumes_a_run_with_its_own_settings(dataset, tmp_path):
    # started with batch 2 and validation every epoch, resumed with the README's short line: both kept
    bundle = copy_bundle(tmp_path)
    output, batch = nucleiseg_train(bundle, tiny_args(dataset) + ["--epochs", "1"], tmp_path)
    assert batch == BATCH != 8 and validated_epochs(bundle) == [1]
    best = load(bundle / "models" / "checkpoint_last.pt")["best_model"]["best_metric"]
    assert (f"training finished at epoch 1: best validation val_aji {best:.4f} at epoch 1, its weights in "
            f"{bundle / 'models' / 'model.pt'}") in output

    output, batch = nucleiseg_train(bundle, ["--resume", "true", "--epochs", "3"], tmp_path)
    assert (f"resuming {bundle} with its own settings: --data_root {dataset.parent} --sources_file "
            f"{dataset.parent / 'sources.json'} --patch_size '[64, 64]' --batch_size 2 --val_interval 1 "
            f"--network_def#features '[8, 16, 32, 64]' --window 128") in output
    assert batch == BATCH and validated_epochs(bundle) == [1, 2, 3]
    assert "other settings" not in output

    # one typed now wins, with a warning naming both values; the run records it as its own from then on
    output, batch = nucleiseg_train(bundle, ["--resume", "true", "--epochs", "4", "--batch_size", "3"], tmp_path)
    assert f"resuming {bundle} with other settings than its own, as typed: --batch_size 3 (the run had 2)" in output
    assert batch == 3 and validated_epochs(bundle) == [1, 2, 3, 4]
    assert load(bundle / "models" / "checkpoint_last.pt")["settings"]["given"]["batch_size"] == 3


def test_a_resume_on_monais_command_line_without_the_runs_settings_is_refused_naming_them(one_epoch, dataset,
                                                                                          tmp_path):
    bundle = copy_of(one_epoch, tmp_path)
    checkpoint = bundle / "models" / "checkpoint_last.pt"
    before = checkpoint.read_bytes()
    proc = bundle_run("training", bundle / "configs" / "train.json",
                      data_args(dataset) + ["--epochs", "3", "--resume", "true", "--val_interval", "2"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    flags = "--patch_size '[64, 64]' --batch_size 2 --network_def#features '[8, 16, 32, 64]' --window 128"
    assert (f"is the state of a run started with other settings than this command's: {flags} not given now (the "
            "config's defaults would replace them); --val_interval 2 given for the run's 1; give --patch_size "
            "'[64, 64]' --batch_size 2 --val_interval 1 --network_def#features '[8, 16, 32, 64]' --window 128 to go "
            "on as it started") in output
    assert "ResumeSettingsError" in output
    assert checkpoint.read_bytes() == before  # refused before anything was trained or written


def test_a_checkpoint_without_recorded_settings_resumes_as_before(one_epoch, dataset, tmp_path):
    bundle = copy_of(one_epoch, tmp_path)
    checkpoint = bundle / "models" / "checkpoint_last.pt"
    state = load(checkpoint)
    del state["settings"]  # as written before the settings were recorded
    torch.save(state, checkpoint)
    output = ok(bundle_run("training", bundle / "configs" / "train.json",
                           tiny_args(dataset) + ["--epochs", "2", "--resume", "true"], tmp_path))
    assert f"{checkpoint} does not record the settings its run was started with" in output
    assert f"resumed from {checkpoint} at epoch 1" in output
    after = load(checkpoint)
    assert after["trainer"]["iteration"] == 2 * iterations_per_epoch(bundle)
    assert after["settings"]["given"]["batch_size"] == BATCH  # recorded from now on


OTHER_STATS = {"mean": [201.0, 151.0, 191.0], "std": [31.0, 41.0, 36.0]}


def test_a_run_from_scratch_writes_the_training_tiles_statistics(one_epoch):
    bundle, output = one_epoch
    datalist = json.loads((bundle / "models" / "datalist.json").read_text())
    assert json.loads((bundle / "models" / "channel_stats.json").read_text()) == datalist["channel_stats"]
    assert "Epoch[0] Metrics" not in output and "validating the pretrained weights" not in output


def test_a_pretrained_run_keeps_the_statistics_beside_the_weights(one_epoch, dataset, tmp_path):
    trained, _ = one_epoch
    pretrained = tmp_path / "pre" / "model.pt"
    pretrained.parent.mkdir()
    shutil.copy(trained / "models" / "model.pt", pretrained)
    (pretrained.parent / "channel_stats.json").write_text(json.dumps(OTHER_STATS))
    bundle = copy_bundle(tmp_path)
    output = ok(bundle_run("training", bundle / "configs" / "train.json",
                           tiny_args(dataset) + ["--epochs", "1", "--pretrained", str(pretrained)], tmp_path))
    assert f"channel statistics {pretrained.parent / 'channel_stats.json'}, beside the pretrained weights" in output
    assert json.loads((bundle / "models" / "channel_stats.json").read_text()) == OTHER_STATS


def test_pretrained_weights_better_than_every_epoch_stay_model_pt(one_epoch, dataset, tmp_path):
    """A learning rate of 10 wrecks the network at once: the start, validated as epoch 0, stays the best."""
    trained, _ = one_epoch
    pretrained = trained / "models" / "model.pt"
    bundle = copy_bundle(tmp_path)
    output = ok(bundle_run("training", bundle / "configs" / "train.json",
                           tiny_args(dataset) + ["--epochs", "2", "--learning_rate", "10",
                                                 "--pretrained", str(pretrained)], tmp_path))
    assert output.count("Epoch[0] Metrics -- val_aji") == 1
    assert sorted(scalars(bundle, "val_aji")) == [0, 1, 2]
    start, best = load(pretrained), load(bundle / "models" / "model.pt")
    assert start.keys() == best.keys() and all(torch.equal(start[k], best[k]) for k in start)
    last = load(bundle / "models" / "checkpoint_last.pt")
    assert last["best_model"]["best_metric_epoch"] == 0
    assert last["trainer"]["iteration"] == 2 * iterations_per_epoch(bundle)
    assert not all(torch.equal(start[k], last["network"][k]) for k in start)  # it did train


def test_a_resumed_run_keeps_its_own_statistics(one_epoch, dataset, tmp_path):
    bundle = copy_of(one_epoch, tmp_path)
    mine = {"mean": [150.0, 120.0, 160.0], "std": [20.0, 25.0, 30.0]}  # as if the run had started from other weights
    (bundle / "models" / "channel_stats.json").write_text(json.dumps(mine))
    pretrained = tmp_path / "pre" / "model.pt"
    pretrained.parent.mkdir()
    shutil.copy(one_epoch[0] / "models" / "model.pt", pretrained)
    (pretrained.parent / "channel_stats.json").write_text(json.dumps(OTHER_STATS))
    output = ok(bundle_run("training", bundle / "configs" / "train.json",
                           tiny_args(dataset) + ["--epochs", "2", "--resume", "true", "--pretrained", str(pretrained)],
                           tmp_path))
    assert "resumed run: channel statistics" in output
    assert json.loads((bundle / "models" / "channel_stats.json").read_text()) == mine
    assert "Epoch[0] Metrics" not in output  # a resumed run's start is its own last epoch, validated already


def test_overwrite_keeps_the_earlier_run_until_its_own_data_and_weights_have_loaded(one_epoch, dataset, tmp_path):
    bundle = copy_of(one_epoch, tmp_path)
    files = ("model.pt", "checkpoint_last.pt", "channel_stats.json", "datalist.json")
    before = {name: (bundle / "models" / name).read_bytes() for name in files}
    mistyped = tiny_args(dataset) + ["--epochs", "1", "--overwrite", "true"]
    mistyped[mistyped.index("--sources_file") + 1] = str(tmp_path / "nosuch.json")
    proc = bundle_run("training", bundle / "configs" / "train.json", mistyped, tmp_path)
    assert proc.returncode != 0 and "nosuch.json" in proc.stdout + proc.stderr
    assert {name: (bundle / "models" / name).read_bytes() for name in files} == before
    # a start read after the data: the earlier run's statistics and datalist stay too
    other = tmp_path / "other"
    other.mkdir()
    (other / "channel_stats.json").write_text(json.dumps(OTHER_STATS))
    proc = bundle_run("training", bundle / "configs" / "train.json", tiny_args(dataset) + [
        "--epochs", "1", "--overwrite", "true", "--pretrained", str(other / "typo.pt")], tmp_path)
    assert proc.returncode != 0 and f"no weights at {other / 'typo.pt'}" in proc.stdout + proc.stderr
    assert {name: (bundle / "models" / name).read_bytes() for name in files} == before
    # fine-tuned from the folder's own weights, which are read before they go
    output = ok(bundle_run("training", bundle / "configs" / "train.json",
                           tiny_args(dataset) + ["--epochs", "1", "--overwrite", "true",
                                                 "--pretrained", str(bundle / "models" / "model.pt")], tmp_path))
    assert f"removed {bundle / 'models' / 'checkpoint_last.pt'}, left by the run that --overwrite replaces" in output
    assert f"started from {bundle / 'models' / 'model.pt'}" in output and "Epoch[0] Metrics" in output
    assert load(bundle / "models" / "checkpoint_last.pt")["trainer"]["iteration"] == iterations_per_epoch(bundle)
    started = json.loads((bundle / "models" / "datalist.json").read_text())["started_from"]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert started["weights"] == f"{meta['name']} {meta['version']}"  # the bundle's, never the folder's path
    assert started["sha256"] == hashlib.sha256(before["model.pt"]).hexdigest()  # the weights it started from
    assert started["provenance"]["synthetic"]["tiles"]["training"] > 0  # the data the start learnt from


def test_resume_without_a_checkpoint_fails_naming_it(dataset, tmp_path):
    bundle = copy_bundle(tmp_path)
    proc = bundle_run("training", bundle / "configs" / "train.json",
                      tiny_args(dataset) + ["--epochs", "1", "--resume", "true"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"no checkpoint at {bundle / 'models' / 'checkpoint_last.pt'}" in output
    assert not (bundle / "models" / "checkpoint_last.pt").exists()


# Records, in every process, which rank renamed a file into place: save_atomic's final os.replace.
RENAME_AUDIT = textwrap.dedent("""
    import os, sys

    _log = os.environ.get("NUCLEISEG_TEST_RENAME_LOG")

    def _audit(event, args):
        if event == "os.rename" and str(args[1]).endswith(".pt"):
            with open(_log, "a") as f:
                f.write(f"{os.environ.get('RANK', '?')} {os.path.basename(str(args[1]))}\\n")

    if _log:
        sys.addaudithook(_audit)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_on_cpu(dataset, tmp_path):
    bundle = copy_bundle(tmp_path)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RENAME_AUDIT)
    renames = tmp_path / "renames.txt"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    configs = overlay(bundle, "multi_gpu_train.json")
    command = launcher + ["--nproc_per_node=2", f"--master_port={free_port()}", "--tee=3",
                          "-m", "monai.bundle", "run", "training", "--config_file", configs,
                          *tiny_args(dataset), "--epochs", "2"]
    pythonpath = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    output = ok(run(command, tmp_path, extra_env={"PYTHONPATH": pythonpath,
                                                  "NUCLEISEG_TEST_RENAME_LOG": str(renames)}))

    for rank in (0, 1):
        assert any(line.startswith(f"[default{rank}]:") and "SupervisedTrainer - INFO - Engine run finished" in line
                   for line in output.splitlines()), f"rank {rank} did not finish training"
    writes = [line.split() for line in renames.read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}, f"checkpoints written by ranks other than 0: {writes}"
    assert "will be overwritten" not in output  # rank 1 seeing the checkpoint rank 0 has just written
    assert ["0", "checkpoint_last.pt"] in writes and ["0", "model.pt"] in writes
    # each rank trained on its half of the patches
    trainer = load(bundle / "models" / "checkpoint_last.pt")["trainer"]
    assert trainer["epoch_length"] == iterations_per_epoch(bundle, ranks=2) < iterations_per_epoch(bundle)
    assert trainer["iteration"] == 2 * trainer["epoch_length"]
    trained_network(bundle)


@pytest.mark.parametrize("files, run_id, kind", [(["train.json"], "training", "train"),
                                                 (["train.json", "evaluate.json"], "evaluating", "infer")])
def test_workflows_have_the_properties_monai_requires(files, run_id, kind, one_epoch, dataset, tmp_path):
    from monai.bundle import ConfigWorkflow

    from nucleiseg_monai.overrides import parse_value

    bundle = copy_of(one_epoch, tmp_path)
    workflow = ConfigWorkflow(config_file=[str(bundle / "configs" / f) for f in files],
                              meta_file=str(bundle / "configs" / "metadata.json"), run_id=run_id, workflow_type=kind)
    args = tiny_args(dataset) if run_id == "training" else eval_args(dataset, tmp_path)
    workflow.parser.update({"bundle_root": str(bundle), "resume": True,
                            **{k.lstrip("-"): parse_value(v) for k, v in zip(args[::2], args[1::2])}})
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
