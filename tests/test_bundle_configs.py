"""The bundles' configs (the two bundles agree apart from the network; every runner id users type exists; every
reference resolves), bundle_root's reading of --config_file, the U-Net variants, and the checkpoint handlers
(atomic save, resume of optimizer/scheduler/best metric, weights-only loading). Nothing here trains a bundle."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import DEPRECATED_ID_MAPPING

from nucleiseg_monai import handlers, networks
from nucleiseg_monai.bundle import bundle_root, typed
from nucleiseg_monai.networks import REFERENCE_FULL, REFERENCE_SMALL, MixedPrecision, UNet, load_weights

torch.set_num_threads(1)

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SMALL, FULL = BUNDLES / "nuclei_unet_small" / "configs", BUNDLES / "nuclei_unet_full" / "configs"
RUNNERS = {"train.json": "training", "evaluate.json": "evaluating", "inference.json": "inferring"}
# where the two bundles' metadata may differ: what describes the network, and each bundle's own version history
METADATA_DIFFERENCES = {"name", "description", "changelog", "version", "spatial_shape", "label_classes", "pred_classes",
                        "num_channels", "3"}
TINY = (8, 16, 32, 64)


def _load(path: Path):
    return json.loads(path.read_text())


def _differences(a, b, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys) at which two parsed JSON documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [path + (k,) for k in a.keys() ^ b.keys()]
        for k in a.keys() & b.keys():
            out += _differences(a[k], b[k], path + (k,))
        return out
    return [] if a == b else [path]


def recorded_settings(path: Path) -> dict | None:
    """The settings a training state's run was started with (``run_record``'s ``given``)."""
    record = handlers.run_record(path)
    return None if record is None else dict(record["given"])


def _parser(*files: Path) -> ConfigParser:
    """The configs as ``monai.bundle run`` reads them: merged in order, metadata.json beside them as ``_meta_``."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.read_meta(str(files[0].parent / "metadata.json"))
    return parser


# --- the two bundles ----------------------------------------------------------------------------------------------


def test_bundles_hold_the_same_config_files():
    shared = {p.name for p in SMALL.iterdir()} & {p.name for p in FULL.iterdir()}
    assert {"train.json", "evaluate.json", "multi_gpu_train.json", "metadata.json", "logging.conf"} <= shared


@pytest.mark.parametrize("name", sorted(
    {p.name for p in SMALL.glob("*.json")} & {p.name for p in FULL.glob("*.json")} - {"metadata.json"}))
def test_bundles_differ_only_in_network_def(name):
    # the watershed thresholds are tuned per network on the validation split, so they may differ too
    small, full = _load(SMALL / name), _load(FULL / name)
    small_net, full_net = small.pop("network_def", None), full.pop("network_def", None)
    small.pop("postprocess_params", None), full.pop("postprocess_params", None)
    assert _differences(small, full) == [], f"{name}: the bundles differ outside network_def and postprocess_params"
    if small_net is not None or full_net is not None:
        assert small_net["features"] != full_net["features"]
        assert sum(full_net["features"]) > sum(small_net["features"])  # the full bundle is wider
        # a network may add the distance map to the 3 classes (out_channels, and its description)
        network = {"features", "out_channels", "_desc_"}
        assert {k: v for k, v in small_net.items() if k not in network} == \
            {k: v for k, v in full_net.items() if k not in network}
        assert {small_net["out_channels"], full_net["out_channels"]} <= {3, 4}


def test_bundles_share_logging_conf():
    assert (SMALL / "logging.conf").read_text() == (FULL / "logging.conf").read_text()


def test_metadata_differs_only_in_what_describes_the_network():
    small, full = _load(SMALL / "metadata.json"), _load(FULL / "metadata.json")
    assert small.keys() == full.keys()
    differences = _differences(small, full)
    assert differences, "both bundles claim the same name and network"
    for path in differences:
        assert METADATA_DIFFERENCES & set(path), f"metadata differs at {'/'.join(map(str, path))}"
    # the spatial multiple states the network's depth: 2 ** poolings
    for meta, configs in ((small, SMALL), (full, FULL)):
        poolings = len(_load(configs / "train.json")["network_def"]["features"]) - 1
        shape = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
        assert shape == [f"{2 ** poolings}*n"] * 2


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_metadata_holds_no_key_monai_renames(configs):
    """MONAI renames a deprecated key as it reads the metadata: "optional_packages_version" replaced the bundle's
    required packages with the optional ones in every run (and warned each time)."""
    meta = _load(configs / "metadata.json")
    assert not set(meta) & set(DEPRECATED_ID_MAPPING)
    parser = ConfigParser()
    parser.read_meta(configs / "metadata.json")
    assert parser.get_parsed_content("_meta_#required_packages_version") == meta["required_packages_version"]


# each fact once: the overlays set only what their workflow changes
FACTS = ("network_def", "postprocess_params", "data_root", "sources", "working_mpp", "stats_file", "imports")


@pytest.mark.parametrize("name", ["evaluate.json", "inference.json", "multi_gpu_train.json"])
@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_overlays_restate_no_fact_of_train_json(configs, name):
    overlay = _load(configs / name)
    assert not set(FACTS) & set(overlay), f"{name} restates {set(FACTS) & set(overlay)}"


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_every_config_verifies_the_bundle_before_anything_else(configs):
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json"):
        assert _load(configs / name)["initialize"][0] == "$nucleiseg_monai.bundle.guard()", name


# --- every config parses, resolves and answers to its runner ids -----------------------------------------------


def _config_sets():
    for configs in (SMALL, FULL):
        for name, runner in RUNNERS.items():
            files = [configs / name] if name == "train.json" else [configs / "train.json", configs / name]
            yield pytest.param(files, runner, id=f"{configs.parent.name}-{name}")
        yield pytest.param([configs / "train.json", configs / "multi_gpu_train.json"], "training",
                           id=f"{configs.parent.name}-train+multi_gpu")


@pytest.mark.parametrize("files, runner", list(_config_sets()))
def test_config_parses_with_runner_ids(files, runner):
    if not all(f.is_file() for f in files):
        pytest.skip(f"{' + '.join(f.name for f in files)} is not in the bundle yet")
    parser = _parser(*files)
    parser.parse()
    for run_id in (runner, "run"):
        assert run_id in parser, f"{files[-1]} has no {run_id!r}: `monai.bundle run {run_id}` would fail"
    # `monai.bundle run` without a runner id runs "run": it must do what the named runner does
    assert parser.get("run") in (f"@{runner}", parser.get(runner))
    # every @reference names an item that exists (a typo fails only when that item is first used)
    missing = []
    for id_, item in parser.ref_resolver.items.items():
        value = item.get_config()
        if isinstance(value, str):
            missing += [(id_, ref) for ref in ReferenceResolver.match_refs_pattern(value) if ref not in parser]
    assert missing == []


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_resume_restores_everything_the_checkpoint_saves(configs):
    train = _load(configs / "train.json")
    by_target = {h["_target_"]: h for h in train["train"]["handlers"] + train["train"]["rank0_handlers"]
                 if isinstance(h, dict)}
    saved = by_target["nucleiseg_monai.handlers.LastCheckpoint"]["save_dict"]
    restored = by_target["nucleiseg_monai.handlers.Resume"]["load_dict"]
    assert saved == restored
    assert {"network", "optimizer", "lr_scheduler"} <= saved.keys()


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_multi_gpu_ranks_above_zero_keep_only_resume_schedule_and_validation(configs):
    # ranks > 0 get train#handlers only; every handler that writes a file is in train#rank0_handlers, and the one
    # that removes the replaced run's files, which must act before ValidateStart, does nothing on ranks > 0
    multi = _load(configs / "multi_gpu_train.json")
    assert multi["train#trainer#train_handlers"] == \
        "$@train#handlers + (@train#rank0_handlers if dist.get_rank() == 0 else [])"
    train = _load(configs / "train.json")["train"]
    assert [h["_target_"] for h in train["handlers"]] == ["nucleiseg_monai.handlers.InitialWeights",
                                                          "nucleiseg_monai.handlers.BeginRun",
                                                          "nucleiseg_monai.handlers.ValidateStart",
                                                          "nucleiseg_monai.handlers.Resume",
                                                          "nucleiseg_monai.handlers.FreezeBatchNorm",
                                                          "LrScheduleHandler",
                                                          "ValidationHandler", "nucleiseg_monai.handlers.ValidateAtEnd"]
    assert "nucleiseg_monai.handlers.LastCheckpoint" in [h["_target_"] for h in train["rank0_handlers"]]


# --- bundle_root --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["monai.bundle", "run", "training", "--config_file", "a/b/configs/train.json"],
    ["monai.bundle", "run", "training", "--config_file=a/b/configs/train.json", "--epochs", "3"],
    ["monai.bundle", "run", "--config_file", "['a/b/configs/train.json','a/b/configs/multi_gpu_train.json']"],
    ["monai.bundle", "run", "--config_file=['a/b/configs/train.json', 'a/b/configs/multi_gpu_train.json']"],
], ids=["space", "equals", "list", "list-equals"])
def test_bundle_root_is_the_folder_above_configs(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(bundle_root(argv)) == (tmp_path / "a" / "b").resolve()


def test_bundle_root_of_an_absolute_path_ignores_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(bundle_root(["--config_file", "/srv/bundles/x/configs/train.json"])) == Path("/srv/bundles/x")


def test_bundle_root_outside_a_configs_folder_is_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(bundle_root(["--config_file", "mine/train.json"])) == (tmp_path / "mine").resolve()


def test_bundle_root_without_config_file_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(bundle_root(["monai.bundle", "run", "training"])) == tmp_path.resolve()


def test_bundle_root_reads_sys_argv_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["monai.bundle", "run", "--config_file", "z/configs/evaluate.json"])
    assert Path(bundle_root()) == (tmp_path / "z").resolve()


# --- networks -----------------------------------------------------------------------------------------------------


# exact counts, computed once with networks.count_parameters(UNet(features=...)):
#   REFERENCE_SMALL (64, 128, 256, 512):        7_700_291
#   REFERENCE_FULL  (64, 128, 256, 512, 1024): 31_037_763
@pytest.mark.parametrize("features, expected", [(REFERENCE_SMALL, 7_700_291), (REFERENCE_FULL, 31_037_763)],
                         ids=["small", "full"])
def test_reference_variants_have_the_reference_sizes(features, expected):
    count = networks.count_parameters(UNet(features=features))
    assert abs(count - expected) <= 0.02 * expected


@pytest.mark.parametrize("features, size", [(TINY, 64), ((8, 16, 32, 64, 128), 96)], ids=["3-pool", "4-pool"])
def test_unet_output_has_the_input_size_and_three_channels(features, size):
    net = UNet(features=features).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size + 16))
    assert out.shape == (2, 3, size, size + 16)


def test_unet_refuses_a_size_not_divisible_by_its_poolings():
    with pytest.raises(ValueError, match="divisible by 8"):
        UNet(features=TINY)(torch.randn(1, 3, 100, 100))


def test_mixed_precision_returns_float32_close_to_the_plain_network():
    torch.manual_seed(0)
    net = UNet(features=TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = net(x)
        mixed = MixedPrecision(net, "bfloat16")(x)
    assert mixed.dtype == torch.float32 and mixed.shape == plain.shape
    error = (mixed - plain).abs().max().item()
    assert error <= 0.05 * plain.abs().max().item()  # bf16 keeps ~3 significant digits per layer
    assert error > 0  # autocast was in effect: bf16 rounding shows
    assert MixedPrecision(UNet(features=TINY)).state_dict().keys() == net.state_dict().keys()


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_interpolating_upsample_modes(mode):
    net = UNet(features=TINY, upsample=mode).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_unknown_upsample_mode_is_refused():
    with pytest.raises(ValueError, match="upsample"):
        UNet(features=TINY, upsample="bicubic")


# --- save_atomic --------------------------------------------------------------------------------------------------


def test_save_atomic_writes_the_file_and_no_temporary(tmp_path):
    path = handlers.save_atomic({"w": torch.arange(3)}, tmp_path / "models" / "model.pt")
    assert path == tmp_path / "models" / "model.pt"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = handlers.save_atomic({"w": torch.zeros(4)}, tmp_path / "checkpoint_last.pt")
    before = path.read_bytes()
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes are on disk when the writer dies
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(OSError, match="No space left"):
        handlers.save_atomic({"w": torch.ones(1000)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # nor a half file beside it


# --- resume: optimizer, schedule and best metric continue ------------------------------------------------------


def _toy_training(t_max: int):
    """One parameter, AdamW and a cosine schedule over ``t_max`` epochs, stepped per epoch like LrScheduleHandler."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=1e-5)

    def step(engine, batch):
        optimizer.zero_grad()
        (param * batch).sum().backward()
        optimizer.step()

    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: schedule.step())
    lrs: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: lrs.append(optimizer.param_groups[0]["lr"]))
    return trainer, optimizer, schedule, lrs


def _stopped_after_one_epoch(path: Path, data: list, epochs: int) -> None:
    """A toy run of ``epochs`` epochs, its state saved to ``path``, stopped after its first."""
    first, optimizer, schedule, _ = _toy_training(epochs)
    handlers.LastCheckpoint(path, {"optimizer": optimizer, "lr_scheduler": schedule}).attach(first)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())
    first.run(data, max_epochs=epochs)


def test_resume_with_more_epochs_continues_the_schedule_of_a_run_that_had_them(tmp_path):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    fresh, _, _, fresh_lrs = _toy_training(3)
    fresh.run(data, max_epochs=3)

    first, optimizer, schedule, _ = _toy_training(1)
    handlers.LastCheckpoint(path, {"optimizer": optimizer, "lr_scheduler": schedule}).attach(first)
    first.run(data, max_epochs=1)

    second, optimizer, schedule, lrs = _toy_training(3)
    objects = {"optimizer": optimizer, "lr_scheduler": schedule}
    handlers.Resume(path, objects).attach(second)
    handlers.LastCheckpoint(path, objects).attach(second)
    second.run(data, max_epochs=3)

    assert (second.state.epoch, second.state.iteration) == (3, 6)
    assert lrs == pytest.approx(fresh_lrs[1:])  # not back up to 1e-3, as a restored T_max=1 would cycle
    state = torch.load(path, weights_only=True)
    assert state["lr_scheduler"]["last_epoch"] == 3 and state["lr_scheduler"]["T_max"] == 3
    assert int(state["optimizer"]["state"][0]["step"]) == 6


def _two_epochs_stopped_after_one(tmp_path: Path) -> tuple[list[float], Path, list[float]]:
    """(data, checkpoint, learning rates of the whole run uninterrupted) of a 2-epoch toy run killed after epoch 1."""
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    fresh, _, _, fresh_lrs = _toy_training(2)
    fresh.run(data, max_epochs=2)
    _stopped_after_one_epoch(path, data, 2)
    return data, path, fresh_lrs


def test_resume_of_a_stopped_run_keeps_its_schedule_when_asked_for_fewer_epochs(tmp_path):
    # a 2-epoch run killed after epoch 1, resumed with the config's default (here 1) epochs: it goes on to 2
    data, path, fresh_lrs = _two_epochs_stopped_after_one(tmp_path)
    second, optimizer, schedule, lrs = _toy_training(1)
    handlers.Resume(path, {"optimizer": optimizer, "lr_scheduler": schedule}).attach(second)
    second.run(data, max_epochs=1)
    assert (second.state.epoch, second.state.iteration) == (2, 4)
    assert lrs == pytest.approx(fresh_lrs[1:]) and schedule.T_max == 2


def test_a_resume_lengthens_a_run_only_to_epochs_typed_never_to_the_configs_default(tmp_path, caplog):
    # a 2-epoch run killed after epoch 1, resumed where the config's default is 4: without --epochs typed it ends
    # at 2 as started; with --epochs 4 typed it goes on to 4, its schedule stretched, and says so
    data, path, fresh_lrs = _two_epochs_stopped_after_one(tmp_path)
    kept, optimizer, schedule, lrs = _toy_training(4)
    handlers.Resume(path, {"optimizer": optimizer, "lr_scheduler": schedule}, given=[]).attach(kept)
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.handlers"):
        kept.run(data, max_epochs=4)
    assert (kept.state.epoch, kept.state.iteration) == (2, 4)
    assert lrs == pytest.approx(fresh_lrs[1:]) and schedule.T_max == 2
    assert f"the resumed run in {path} keeps its 2 epochs; pass --epochs N to lengthen it" in caplog.text
    assert "lengthened" not in caplog.text
    caplog.clear()
    longer, optimizer, schedule, _ = _toy_training(4)
    handlers.Resume(path, {"optimizer": optimizer, "lr_scheduler": schedule}, given=["epochs"]).attach(longer)
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.handlers"):
        longer.run(data, max_epochs=4)
    assert longer.state.epoch == 4 and schedule.T_max == 4
    assert f"the resumed run in {path} is lengthened from 2 to 4 epochs (--epochs)" in caplog.text
    assert typed(["epochs", "epoch_length"], ["train", "--epochs=4", "--epoch-length", "9"]) == \
        ["epochs", "epoch_length"]
    assert typed(["epochs", "epoch_length"], ["train", "--resume", "true"]) == []


def _started_with(path: Path, data: list, given: dict, configs: list[str] | None = None) -> None:
    """A toy run of 2 epochs started with the settings ``given``, its state saved to ``path``, stopped after one."""
    first, optimizer, schedule, _ = _toy_training(2)
    objects = {"optimizer": optimizer, "lr_scheduler": schedule, "settings": handlers.RunSettings(given, (), configs)}
    handlers.LastCheckpoint(path, objects).attach(first)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())
    first.run(data, max_epochs=2)


def _resumed(path: Path, given: dict, changed=(), configs: list[str] | None = None
             ) -> tuple[Engine, handlers.RunSettings]:
    again, optimizer, schedule, _ = _toy_training(2)
    settings = handlers.RunSettings(given, changed, configs)
    objects = {"optimizer": optimizer, "lr_scheduler": schedule, "settings": settings}
    handlers.Resume(path, objects).attach(again)
    handlers.LastCheckpoint(path, objects).attach(again)
    return again, settings


def test_a_run_records_its_typed_settings_and_a_resume_that_gives_others_is_refused_naming_them(tmp_path):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    # what locates the run, starts it or has rules of its own is not recorded
    _started_with(path, data, {"batch_size": 2, "val_interval": 1, "network_def#features": [8, 16],
                               "bundle_root": "runs/mine", "resume": False, "pretrained": "m.pt", "epochs": 2})
    assert recorded_settings(path) == {"batch_size": 2, "val_interval": 1, "network_def#features": [8, 16]}
    with pytest.raises(handlers.ResumeSettingsError) as refused:
        _resumed(path, {"val_interval": 3, "network_def#features": (8, 16), "resume": "true"})
    assert str(refused.value) == (
        f"{path} is the state of a run started with other settings than this command's: --batch_size 2 not given now "
        "(the config's defaults would replace them); --val_interval 3 given for the run's 1; give --batch_size 2 "
        "--val_interval 1 to go on as it started (nucleiseg train --resume true gives a run its own settings), or "
        "start afresh without --resume, with --overwrite true")
    assert recorded_settings(path)["val_interval"] == 1  # refused before anything was written
    # its own settings, with one more typed: it goes on, and records them all
    again, _ = _resumed(path, {"batch_size": 2, "val_interval": 1, "network_def#features": [8, 16], "seed": 3})
    again.run(data, max_epochs=2)
    assert again.state.epoch == 2
    assert recorded_settings(path) == {"batch_size": 2, "val_interval": 1, "network_def#features": [8, 16],
                                                "seed": 3}


def test_settings_changed_knowingly_are_not_refused_and_become_the_runs(tmp_path):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    _started_with(path, data, {"batch_size": 2, "freeze_batch_norm": True})
    _resumed(path, {"batch_size": 4, "freeze_batch_norm": "true"}, changed=["batch_size"])[0].run(data, max_epochs=2)
    assert recorded_settings(path) == {"batch_size": 4, "freeze_batch_norm": "true"}


def test_a_state_written_before_settings_were_recorded_resumes_as_before_saying_so(tmp_path, caplog):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    _stopped_after_one_epoch(path, data, 2)  # no "settings" in its state
    assert recorded_settings(path) is None and recorded_settings(tmp_path / "none.pt") is None
    again, _ = _resumed(path, {"batch_size": 4})
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.handlers"):
        again.run(data, max_epochs=2)
    assert again.state.epoch == 2
    assert f"{path} does not record the settings its run was started with (it was written before they were kept): " \
           "it goes on with this command's, recorded from now on" in caplog.text
    assert recorded_settings(path) == {"batch_size": 4}


def test_a_workflow_built_in_python_resumes_unchecked_saying_so_and_keeps_the_runs_record(tmp_path, caplog,
                                                                                        monkeypatch):
    """Where the process's command line is no workflow's (a notebook, a test) the settings given are not known:
    a resume is neither refused nor compared, one line says so, and the run's record stays."""
    from nucleiseg_monai.bundle import typed_settings

    monkeypatch.setattr("sys.argv", ["python", "my_notebook.py", "--batch_size", "4"])
    assert typed_settings() is None
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    _started_with(path, data, {"batch_size": 2})
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.handlers"):
        again, _ = _resumed(path, None)  # compared, or not, as the resume attaches
        again.run(data, max_epochs=2)
    assert again.state.epoch == 2 and "its workflow was built in Python" in caplog.text
    assert recorded_settings(path) == {"batch_size": 2}


def test_a_run_records_paths_absolute_and_plain_so_it_resumes_from_another_folder(tmp_path, monkeypatch):
    """Relative paths are read against the folder a command runs in: recorded absolute, a resume from elsewhere
    gives them back right, and the same file typed absolute is no other setting. A ``Path`` is recorded as text:
    ``weights_only`` loads refuse other objects, and with them the whole state."""
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    monkeypatch.chdir(tmp_path)
    _started_with(path, data, {"data_root": "data", "sources_file": Path("my.json"), "datalist_file": "$@x"})
    assert recorded_settings(path) == {"data_root": str(tmp_path / "data"),
                                                "sources_file": str(tmp_path / "my.json"), "datalist_file": "$@x"}
    monkeypatch.chdir(tmp_path.parent)
    again, _ = _resumed(path, {"data_root": str(tmp_path / "data"), "sources_file": str(tmp_path / "my.json"),
                               "datalist_file": "$@x"})
    again.run(data, max_epochs=2)
    assert again.state.epoch == 2


def test_a_run_resumed_from_other_config_files_is_refused_naming_them(tmp_path):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    _started_with(path, data, {"teacher": "/t.pt"}, configs=["train.json", "distill.json"])
    with pytest.raises(handlers.ResumeSettingsError, match=r"a run built from train.json, distill.json, and this "
                                                           r"command builds train.json: resume it from the same"):
        _resumed(path, {"teacher": "/t.pt"}, configs=["train.json"])
    again, _ = _resumed(path, {"teacher": "/t.pt"}, configs=["train.json", "distill.json"])
    again.run(data, max_epochs=2)
    assert again.state.epoch == 2


@pytest.mark.parametrize("state", ["legacy", "empty", "list"])
def test_a_state_whose_record_cannot_be_read_records_nothing(tmp_path, state):
    """Read before training (nucleiseg train --resume true): an odd file must not crash there; Resume names what is
    wrong with it as it loads it."""
    path = tmp_path / "checkpoint_last.pt"
    if state == "legacy":  # torch's format before zip files, which cannot be memory-mapped
        torch.save({"settings": {"given": {"batch_size": 2}}}, path, _use_new_zipfile_serialization=False)
        assert recorded_settings(path) == {"batch_size": 2}
        return
    path.write_bytes(b"") if state == "empty" else torch.save([1, 2], path)
    assert handlers.run_record(path) is None and recorded_settings(path) is None


def test_config_names_are_the_workflows_files_in_order(tmp_path):
    from nucleiseg_monai.bundle import command, config_names

    argv = ["monai.bundle", "run", "training", "--config_file", "['b/configs/train.json','b/configs/distill.json']"]
    assert config_names(argv) == ["train.json", "distill.json"]
    assert config_names(["monai.bundle", "run", "--config_file", "b/configs/train.json"]) == ["train.json"]
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": ["x/train.json", "x/multi_gpu_train.json"]}))
    assert config_names(["monai.bundle", "run", "--args_file", str(args_file)]) == ["train.json",
                                                                                   "multi_gpu_train.json"]
    assert config_names(["python", "notebook.py"]) is None
    with command({}, (), [Path("b/configs/train.json")]):
        assert config_names() == ["train.json"]


@pytest.mark.parametrize("argv, expected", [
    (["train", "--epochs=4", "--epoch-length", "9"], ["epochs", "epoch_length"]),
    (["train", "--epochs", "--resume", "true"], ["epochs", "resume"]),  # a bare flag, before another or last
    (["train", "--resume", "true", "--epoch_length"], ["epoch_length", "resume"]),
    (["train", "--note", "--", "--epochs", "2", "epoch_length"], ["epochs"]),
    (["train", "--network_def::features", "[8]", "--epochs_x", "1"], []),  # a part, a longer name: not the setting
])
def test_typed_names_those_of_the_settings_typed_settings_reads(argv, expected):
    from nucleiseg_monai.bundle import typed_settings

    names = ["epochs", "epoch_length", "resume", "network_def"]
    assert typed(names, argv) == expected == [name for name in names if name in typed_settings(argv)]


def test_typed_settings_are_read_as_monais_runner_reads_them(tmp_path):
    from nucleiseg_monai.bundle import command, settings_changed, typed_settings

    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": "c/train.json", "batch_size": 4, "val_interval": 2}))
    argv = ["monai.bundle", "run", "training", "--config_file", "c/train.json", "--batch-size", "2",
            "--network_def::features", "[8,16]", "--resume", "true", "--learning_rate=1e-4", "--amp_dtype", "auto",
            "--args_file", str(args_file)]
    assert typed_settings(argv) == {"batch_size": 2, "network_def#features": [8, 16], "resume": "true",
                                    "learning_rate": 1e-4, "amp_dtype": "auto", "val_interval": 2}
    with command({"batch_size": 2, "epochs": 3}, ["batch_size"]):
        assert typed_settings() == {"batch_size": 2, "epochs": 3} and settings_changed() == {"batch_size"}
        assert typed(["epochs", "epoch_length"]) == ["epochs"]
    assert settings_changed() == frozenset()
    assert handlers.as_flags({"a": True, "b": None, "c": [8, 16], "d": "my file.json", "e": 1e-4}) == \
        "--a true --b null --c '[8, 16]' --d 'my file.json' --e 0.0001"


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(tmp_path, caplog):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    first, optimizer, schedule, _ = _toy_training(2)
    handlers.LastCheckpoint(path, {"optimizer": optimizer, "lr_scheduler": schedule}).attach(first)
    first.run(data, max_epochs=2)

    again, optimizer, schedule, lrs = _toy_training(2)
    handlers.Resume(path, {"optimizer": optimizer, "lr_scheduler": schedule}).attach(again)
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.handlers"):
        again.run(data, max_epochs=2)
    assert lrs == [] and again.state.epoch == 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{path} has finished its 2 epochs: nothing to train; pass --epochs N with N above 2 to go on"]


def test_a_finished_training_says_its_best_validation_and_where_its_weights_are(tmp_path, caplog):
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1.0, -1  # as MONAI's evaluators start
    best = handlers.BestCheckpoint(tmp_path / "model.pt", torch.nn.Linear(1, 1))
    best.attach(evaluator)

    def train(epochs: int) -> None:
        trainer, _, _, _ = _toy_training(epochs)
        handlers.TrainingSummary(best).attach(trainer)
        trainer.run([1.0], max_epochs=epochs)

    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.handlers"):
        train(1)  # never validated
        evaluator.state.key_metric_name, evaluator.state.best_metric, evaluator.state.best_metric_epoch = \
            "val_aji", 0.6125, 2
        train(3)
        evaluator.state.best_metric_epoch = 0
        train(1)
    assert [r.getMessage() for r in caplog.records] == [
        "training finished at epoch 1 without a validation: no model.pt was written",
        f"training finished at epoch 3: best validation val_aji 0.6125 at epoch 2, its weights in "
        f"{tmp_path / 'model.pt'}",
        "training finished at epoch 1: best validation val_aji 0.6125 at epoch 0 (the starting weights), its weights "
        f"in {tmp_path / 'model.pt'}"]


def _drawing_run(path: Path, epochs: int, resume: bool, fail_at: int | None = None,
                 num_workers: int = 0) -> list[list[float]]:
    """A run as the bundle's configs make one: seeded at its start, then a loader whose sampler (torch's generator)
    and random transform (its own, set by MONAI's loader) draw every batch; returns each epoch's draws."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandGaussianNoised
    from monai.utils import set_determinism

    set_determinism(seed=0)
    records = [{"x": torch.full((1, 2), float(i))} for i in range(8)]
    sampler = torch.utils.data.WeightedRandomSampler([1.0] * 8, 4)
    loader = DataLoader(Dataset(records, RandGaussianNoised("x", prob=1.0)), batch_size=2, sampler=sampler,
                        num_workers=num_workers, persistent_workers=num_workers > 0)  # as train.json's
    epochs_drawn: list[list[float]] = []

    def step(engine, batch):
        if engine.state.iteration == fail_at:
            raise KeyboardInterrupt  # as a killed run: no COMPLETED event, nothing saved after
        if engine.state.iteration % engine.state.epoch_length == 1:
            epochs_drawn.append([])
        epochs_drawn[-1] += batch["x"].flatten().tolist()

    trainer = Engine(step)
    if resume:
        handlers.Resume(path, {}, seed=0).attach(trainer)
    handlers.LastCheckpoint(path, {}).attach(trainer)
    try:
        trainer.run(loader, max_epochs=epochs)
    except KeyboardInterrupt:
        pass
    finally:  # a persistent worker left to the garbage collector stalls a later test by torch's 5 s join timeout
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
    return epochs_drawn


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_resumed_run_draws_new_patches_not_those_of_its_first_epochs(tmp_path, num_workers):
    path = tmp_path / "checkpoint_last.pt"
    first = _drawing_run(path, 2, resume=False, num_workers=num_workers)
    resumed = _drawing_run(path, 4, resume=True, num_workers=num_workers)
    assert len(first) == 2 and len(resumed) == 2
    assert resumed != first  # without seeding again, epochs 3-4 drew exactly epochs 1-2
    assert all(len(set(a) & set(b)) == 0 for a in resumed for b in first)
    torch.save(torch.load(path, weights_only=True), tmp_path / "kept.pt")
    path.write_bytes((tmp_path / "kept.pt").read_bytes())  # not the 4-epoch one the resumed run wrote
    assert _drawing_run(path, 2, resume=False, num_workers=num_workers) == first  # a new run: the same draws


def test_a_run_killed_in_its_first_epoch_can_be_resumed(tmp_path, caplog):
    path = tmp_path / "checkpoint_last.pt"
    _drawing_run(path, 2, resume=False, fail_at=1)
    state = torch.load(path, weights_only=True)  # saved when training started, before the first epoch
    assert state["trainer"]["iteration"] == 0
    with pytest.raises(FileExistsError, match="holds the state of a run stopped before its first epoch ended; "
                                              "continue it with --resume true"):
        handlers.check_new_run(tmp_path, False, False)  # the same command again, without --resume
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.handlers"):
        resumed = _drawing_run(path, 2, resume=True)
    assert len(resumed) == 2 and f"resumed from {path} at epoch 0, iteration 0" in caplog.text


def test_a_resume_says_which_asked_lengths_it_keeps_from_its_run(tmp_path, caplog):
    data = [1.0, -1.0]
    path = tmp_path / "checkpoint_last.pt"
    _stopped_after_one_epoch(path, data, 4)

    again, optimizer, schedule, _ = _toy_training(2)
    handlers.Resume(path, {"optimizer": optimizer, "lr_scheduler": schedule}).attach(again)
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.handlers"):
        again.run(data + data, max_epochs=2, epoch_length=4)
    assert (again.state.epoch, again.state.iteration) == (4, 8)  # the run's own 4 epochs of 2 iterations
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"--epochs 2 is fewer than the 4 of the run in {path}: it goes on to epoch 4, as its learning-rate schedule "
        "does; start a new run for a shorter one",
        f"--epoch_length 4 differs from the 2 of the run in {path}: a resumed run keeps its own; start a new run for "
        "another"]


def test_early_stopping_keeps_its_patience_through_a_resume(tmp_path):
    from monai.handlers import EarlyStopHandler

    path = tmp_path / "checkpoint_last.pt"

    def run(epochs: int, resume: bool) -> int:
        trainer = Engine(lambda engine, batch: None)
        stop = EarlyStopHandler(patience=3, score_function=lambda engine: 0.5, trainer=trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, stop)  # a validation every epoch that never improves
        objects = {"early_stop": handlers.EarlyStopState(stop)}
        if resume:
            handlers.Resume(path, objects).attach(trainer)
        handlers.LastCheckpoint(path, objects).attach(trainer)
        trainer.run([0], max_epochs=epochs)
        return trainer.state.epoch

    assert run(10, resume=False) == 4  # the best at epoch 1, then 3 validations without a better one
    assert run(2, resume=False) == 2
    assert torch.load(path, weights_only=True)["early_stop"]["counter"] == 1
    assert run(10, resume=True) == 4  # not 6, as with patience started again


def test_resume_without_a_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / "models" / "checkpoint_last.pt"
    with pytest.raises(FileNotFoundError, match="checkpoint_last.pt"):
        handlers.Resume(missing, {}).attach(Engine(lambda e, b: None))
    handlers.Resume(missing, {}, enabled=False).attach(Engine(lambda e, b: None))  # a new run needs none


def test_best_checkpoint_state_carries_the_best_metric_into_a_resumed_evaluator(tmp_path):
    net = UNet(features=TINY)
    before = Engine(lambda e, b: None)
    before.state.best_metric, before.state.best_metric_epoch = 0.61, 4
    saving = handlers.BestCheckpoint(tmp_path / "model.pt", net)
    saving.attach(before)
    state = saving.state_dict()
    assert state == {"best_metric": 0.61, "best_metric_epoch": 4}

    # Resume loads the state when the trainer starts, after the evaluator was built with its handlers
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1  # as MONAI's workflows start
    resumed = handlers.BestCheckpoint(tmp_path / "model.pt", net)
    resumed.attach(evaluator)
    resumed.load_state_dict(state)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.61, 4)
    # ranks > 0 load it without an evaluator
    detached = handlers.BestCheckpoint(tmp_path / "model.pt", net)
    detached.load_state_dict(state)
    assert detached.state_dict() == state


# --- load_weights -------------------------------------------------------------------------------------------------


def test_load_weights_without_a_file_says_how_to_train(tmp_path):
    missing = tmp_path / "bundle" / "models" / "model.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_weights(UNet(features=TINY), missing)
    assert str(missing) in str(err.value)
    assert f"nucleiseg train --bundle {tmp_path / 'bundle'}" in str(err.value)
    assert "nucleiseg unpack" in str(err.value) and "--checkpoint PATH" in str(err.value)


def test_load_weights_takes_the_network_of_a_training_checkpoint(tmp_path):
    trained = UNet(features=TINY)
    torch.save({"network": trained.state_dict(), "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "checkpoint_last.pt")
    loaded = load_weights(UNet(features=TINY), tmp_path / "checkpoint_last.pt")
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


class _Payload:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_load_weights_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"network": _Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_weights(UNet(features=TINY), tmp_path / "model.pt")
    assert not marker.exists()


@pytest.mark.parametrize("bundle", [SMALL, FULL], ids=lambda p: p.parent.name)
def test_tune_apply_writes_the_one_set_of_watershed_parameters(bundle, tmp_path):
    from nucleiseg_monai.tuning import apply

    train = tmp_path / "train.json"
    train.write_text((bundle / "train.json").read_text())
    chosen = {"fg_threshold": 0.45, "marker_threshold": 0.7, "min_marker_size": 6, "min_size": 20,
              "elevation": "interior"}
    apply(train, chosen)
    config = _load(train)
    assert config["postprocess_params"] == chosen
    del config["postprocess_params"]
    original = _load(bundle / "train.json")
    del original["postprocess_params"]
    assert config == original  # nothing else touched


def test_a_new_run_never_replaces_trained_weights(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="--bundle_root runs/NAME.*--resume true.*--overwrite true"):
        handlers.check_new_run(tmp_path, "false", "false")  # as strings, the way the command line gives them
    handlers.check_new_run(tmp_path, "true", False)
    assert (tmp_path / "model.pt").exists()  # a resume continues the run whose weights they are
    handlers.check_new_run(tmp_path / "empty", False, False)
    with pytest.raises(ValueError, match="--resume 'maybe' is not a boolean"):
        handlers.check_new_run(tmp_path, "maybe", False)


def test_a_new_run_in_a_bundles_own_folder_is_sent_to_a_folder_of_its_own_not_to_overwrite(tmp_path):
    # --overwrite there would delete the weights the bundle ships with: the refusal says so, --bundle_root first
    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError) as refused:
        handlers.check_new_run(models, False, False, tmp_path / "bundle")
    assert str(refused.value) == (
        f"{models / 'model.pt'} holds trained weights, those the bundle {tmp_path / 'bundle'} ships with; train into "
        f"a folder of your own with --bundle_root runs/NAME (--pretrained {models / 'model.pt'} starts from them); "
        "--overwrite true would replace the bundle's own weights")
    # a run trained in the bundle's folder (its state beside) is an earlier run: it may be resumed or replaced
    (models / "checkpoint_last.pt").write_bytes(b"state")
    with pytest.raises(FileExistsError, match="from an earlier run.*--resume true.*--overwrite true"):
        handlers.check_new_run(models, False, False, tmp_path / "bundle")


def test_overwrite_replaces_the_earlier_runs_files_when_training_starts_never_the_weights_it_starts_from(
        tmp_path, caplog, monkeypatch):
    model, state, stats = tmp_path / "model.pt", tmp_path / "checkpoint_last.pt", tmp_path / "channel_stats.json"
    earlier = {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}
    mine = {"mean": [7.0, 8.0, 9.0], "std": [1.0, 1.0, 1.0]}
    datalist = {"sources": {}, "training": [], "provenance": {}}

    def earlier_run():
        model.write_bytes(b"weights")
        state.write_bytes(b"state")
        stats.write_text(json.dumps(earlier))

    def begin(overwrite, resume=False, pretrained=None):
        engine = Engine(lambda e, b: None)
        handlers.BeginRun(tmp_path, stats, mine, datalist, overwrite, resume, pretrained).attach(engine)
        engine.run([0], max_epochs=0)

    earlier_run()
    handlers.check_new_run(tmp_path, False, "true")  # before the data is read: a mistake there must lose nothing
    assert model.exists() and state.exists() and json.loads(stats.read_text()) == earlier
    begin("true", resume="true")  # a resume continues the run whose files they are
    assert model.exists() and state.exists()
    begin("true", pretrained=str(model))
    assert model.read_bytes() == b"weights" and not state.exists()  # fine-tuned from them, in their folder
    assert json.loads(stats.read_text()) == mine
    started = json.loads((tmp_path / "datalist.json").read_text())["started_from"]
    assert started["weights"] == "model.pt"  # by its name alone: the datalist is published with the bundle
    assert started["sha256"] == "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"  # of b"weights"
    earlier_run()
    with monkeypatch.context() as m:  # rank 1 of a multi-GPU run: rank 0 removes them, then writes its own
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_rank", lambda: 1)
        begin(True)
    assert model.exists() and state.exists() and json.loads(stats.read_text()) == earlier
    with caplog.at_level(logging.INFO, logger="nucleiseg_monai.handlers"):
        begin(True, pretrained="null")
    assert not model.exists() and not state.exists() and json.loads(stats.read_text()) == mine
    assert "started_from" not in json.loads((tmp_path / "datalist.json").read_text())
    assert f"removed {model}, left by the run that --overwrite replaces" in caplog.text


@pytest.mark.parametrize("bundle", ["nuclei_unet_small", "nuclei_unet_full"])
def test_the_replaced_run_goes_after_the_starting_weights_load_and_before_they_are_validated(bundle):
    """A run killed before its first validation leaves none of another run's weights; a fine-tune from the folder's
    own model.pt has loaded it before it goes."""
    targets = [h["_target_"].rsplit(".", 1)[-1] for h in _load(BUNDLES / bundle / "configs" / "train.json")
               ["train"]["handlers"]]
    assert targets[:3] == ["InitialWeights", "BeginRun", "ValidateStart"]


@pytest.mark.parametrize("epochs, interval, validated", [(5, 2, [2, 4, 5]), (4, 2, [2, 4]), (3, 1, [1, 2, 3])])
def test_the_last_epoch_is_always_validated(epochs, interval, validated):
    runs = []

    class Validator:
        def run(self, epoch):
            runs.append(epoch)

    trainer = Engine(lambda engine, batch: None)
    # as MONAI's ValidationHandler does at interval; ValidateAtEnd adds the last epoch where the interval skipped it
    trainer.add_event_handler(Events.EPOCH_COMPLETED(every=interval), lambda e: runs.append(e.state.epoch))
    handlers.ValidateAtEnd(Validator(), interval).attach(trainer)
    trainer.run([0], max_epochs=epochs)
    assert runs == validated


@pytest.mark.parametrize("pretrained, resume, validated", [("a/model.pt", False, [0, 1, 2]), (None, False, [1, 2]),
                                                           ("null", "false", [1, 2]), ("a/model.pt", "true", [1, 2])])
def test_pretrained_weights_are_validated_before_the_first_epoch(pretrained, resume, validated):
    runs = []

    class Validator:
        def run(self, epoch):
            runs.append(epoch)
            torch.rand(3)  # validation draws nothing from training's random numbers

    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: runs.append(e.state.epoch))
    handlers.ValidateStart(Validator(), pretrained, resume).attach(trainer)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    trainer.run([0], max_epochs=2)
    assert runs == validated
    assert torch.equal(torch.rand(3), expected)  # training draws what it would have drawn unvalidated


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_training_statistics_are_the_starts(configs, tmp_path, caplog):
    """A new run from --pretrained weights keeps the channel_stats.json beside them, a resumed run its own
    stats_file; a run from scratch (the shipped bundles' training) the datalist's."""
    import logging

    from nucleiseg_monai.bundle import training_stats

    caplog.set_level(logging.INFO, logger="nucleiseg_monai.bundle")
    tiles = {"mean": [170.0, 110.0, 170.0], "std": [30.0, 40.0, 35.0]}
    theirs = {"mean": [201.0, 151.0, 191.0], "std": [31.0, 41.0, 36.0]}
    mine = {"mean": [150.0, 120.0, 160.0], "std": [20.0, 25.0, 30.0]}
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "channel_stats.json").write_text(json.dumps(theirs))
    (tmp_path / "loose").mkdir()
    (tmp_path / "run" / "models").mkdir(parents=True)
    own = tmp_path / "run" / "models" / "channel_stats.json"
    own.write_text(json.dumps(mine))
    pre, loose = str(tmp_path / "pre" / "model.pt"), str(tmp_path / "loose" / "model.pt")

    assert training_stats(tiles, own, None, False) == tiles and not caplog.records
    assert training_stats(tiles, own, "null", "false") == tiles and not caplog.records
    assert training_stats(tiles, own, pre, "false") == theirs
    assert "beside the pretrained weights" in caplog.records[-1].message and caplog.records[-1].levelname == "INFO"
    assert training_stats(tiles, own, loose, False) == tiles
    assert "unknown" in caplog.records[-1].message and caplog.records[-1].levelname == "WARNING"
    assert training_stats(tiles, own, pre, "true") == mine  # resumed: its own, whatever --pretrained says
    assert training_stats(tiles, own, None, True) == mine
    own.unlink()
    assert training_stats(tiles, own, pre, True) == tiles and caplog.records[-1].levelname == "WARNING"

    # train.json's channel_stats is that choice: normalisation and the statistics the run writes
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"bundle_root": str(tmp_path / "run"), "pretrained": pre,
                   "datalist": {"channel_stats": tiles}})
    assert parser.get_parsed_content("channel_stats") == theirs
    expression = parser.get("channel_stats")
    assert "@pretrained" in expression and "@resume" in expression and "@stats_file" in expression


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_evaluation_and_tuning_normalise_with_the_statistics_beside_the_weights(configs, tmp_path):
    """``--checkpoint`` on evaluate (the workflow ``nucleiseg evaluate`` runs) and ``--set checkpoint=FILE`` on tune
    bring the channel_stats.json of the weights' folder; weights without one keep the bundle's."""
    from monai.transforms import NormalizeIntensityd

    from nucleiseg_monai.cli import bundle_workflow, evaluate_configs
    from nucleiseg_monai.data import load_stats
    from nucleiseg_monai.tuning import _validation_parser

    bundle = configs.parent
    own = load_stats(bundle / "models" / "channel_stats.json")
    theirs = {"mean": [201.0, 151.0, 191.0], "std": [31.0, 41.0, 36.0]}
    (tmp_path / "ft" / "models").mkdir(parents=True)
    (tmp_path / "ft" / "models" / "channel_stats.json").write_text(json.dumps(theirs))
    (tmp_path / "loose").mkdir()
    files = evaluate_configs(str(bundle))
    for checkpoint, expected in ((tmp_path / "ft" / "models" / "model.pt", theirs),
                                 (tmp_path / "loose" / "model.pt", own), (None, own)):
        settings = {} if checkpoint is None else {"checkpoint": str(checkpoint)}
        evaluating = bundle_workflow(files, "evaluating", str(bundle), settings).parser
        tuning = _validation_parser(files, {"bundle_root": str(bundle), **settings})
        for parser in (evaluating, tuning):
            assert parser.get_parsed_content("channel_stats") == expected
            [normalise] = [t for t in parser.get_parsed_content("validate#preprocessing").transforms
                           if isinstance(t, NormalizeIntensityd)]
            assert normalise.normalizer.subtrahend == expected["mean"]


def test_a_bundles_own_registry_is_found_when_its_outputs_go_elsewhere(tmp_path):
    """The README's recipe for a bundle trained on a registry of its own: sources_file under @bundle_dir, which
    --bundle_root (where outputs go) does not move."""
    from nucleiseg_monai.cli import bundle_workflow
    from nucleiseg_monai.inference import SlidePredictor

    bundle = tmp_path / "my_model"
    shutil.copytree(SMALL.parent / "configs", bundle / "configs")
    train = json.loads((bundle / "configs" / "train.json").read_text())
    train["sources_file"] = "$os.path.join(@bundle_dir, 'configs', 'sources.json')"
    (bundle / "configs" / "train.json").write_text(json.dumps(train))
    runs = tmp_path / "runs" / "fine_tune"
    parser = bundle_workflow([bundle / "configs" / "train.json"], "training", str(bundle),
                             {"bundle_root": str(runs)}).parser
    assert parser.get_parsed_content("bundle_root") == str(runs)
    assert parser.get_parsed_content("sources_file") == str(bundle.resolve() / "configs" / "sources.json")
    predictor_parser, _ = SlidePredictor._parser(bundle, {})
    assert predictor_parser.get_parsed_content("bundle_dir") == str(bundle.resolve())


@pytest.mark.parametrize("configs", [SMALL, FULL])
def test_shipped_weights_carry_their_datas_licenses_and_name_them(configs):
    """pack's license check reads the datalist's provenance: the shipped datalists hold it, and each LICENSE names
    every training source's license; the metadata names a package release this one is not older than."""
    from nucleiseg_monai import __version__
    from nucleiseg_monai.bundle import _release
    from nucleiseg_monai.packaging import unstated_licenses

    bundle = configs.parent
    provenance = json.loads((bundle / "models" / "datalist.json").read_text())["provenance"]
    assert set(provenance) == {"cryonuseg", "monuseg2018_train", "nuinsseg"}
    assert {p["license"] for p in provenance.values()} == {"CC BY-NC-SA 4.0", "CC BY 4.0"}
    assert unstated_licenses(bundle) == []
    needed = json.loads((configs / "metadata.json").read_text())["required_packages_version"]["nucleiseg-monai"]
    assert _release(__version__) is None or _release(needed) <= _release(__version__)  # this package runs them


@pytest.mark.parametrize("enabled, frozen", [(True, True), ("false", False)])
def test_frozen_batch_norm_keeps_its_statistics_while_the_weights_learn(enabled, frozen):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    network[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    x = torch.randn(4, 3, 8, 8) * 2 + 1

    def step(engine, batch):
        network.train()  # as MONAI's SupervisedTrainer does every iteration
        optimizer.zero_grad()
        out = network(batch)
        out.square().mean().backward()
        optimizer.step()
        return out

    engine = Engine(step)
    handlers.FreezeBatchNorm(network, enabled, pretrained="start.pt").attach(engine)
    with torch.no_grad():
        expected = network.eval()(x)
    out = engine.run([x], max_epochs=1).output
    stats = ("1.running_mean", "1.running_var", "1.num_batches_tracked")
    assert all(torch.equal(network.state_dict()[k], before[k]) for k in stats) == frozen
    assert torch.allclose(out, expected) == frozen  # normalised as in eval mode
    assert not torch.equal(network.state_dict()["0.weight"], before["0.weight"])  # the weights learn either way


def test_frozen_batch_norm_needs_starting_weights():
    network = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="--pretrained"):
        handlers.FreezeBatchNorm(network, "true", pretrained=None, resume="false")
    handlers.FreezeBatchNorm(network, "true", pretrained=None, resume="true")  # a resumed run has its own
    handlers.FreezeBatchNorm(network, "false")  # off: nothing to check


@pytest.mark.parametrize("configs", [SMALL, FULL], ids=["small", "full"])
def test_evaluation_runs_in_float32_and_training_as_the_device_allows(configs):
    """bf16 where native would make a report's figures depend on the CPU (up to 0.01 AJI per organ measured
    between bf16 and float32); evaluation and tuning read the evaluate.json overlay."""
    train = ConfigParser()
    train.read_config(str(configs / "train.json"))
    evaluate = ConfigParser()
    evaluate.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    assert train.get_parsed_content("amp_dtype") == "auto"
    assert networks.resolve_dtype(evaluate.get_parsed_content("amp_dtype"), "cpu") is None
