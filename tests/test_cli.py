"""The nucleiseg command: settings checked before a run, one line per error, help and version, stale temporaries.

Bundles here are tiny hand-written configs in tmp_path (no network, no data), so what is tested is the command, not
the real bundles; one test copies the small bundle without its weights.
"""

import errno
import shutil
import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.bundle import ConfigParser

from conftest import REPO
from nucleiseg_monai import atomic, cli, errors, overrides
from nucleiseg_monai.data import DataError
from nucleiseg_monai.overrides import SettingError

CONFIG = {
    "imports": ["$import os"],
    "bundle_root": ".",
    "ckpt_dir": "$os.path.join(@bundle_root, 'models')",
    "epochs": 60,
    "learning_rate": 0.001,
    "resume": False,
    "amp_dtype": "bfloat16",
    "patch_size": [256, 256],
    "source_mix": None,
    "network_def": {"_target_": "UNet", "features": [16, 32, 64, 128], "upsample": "transpose"},
    "postprocess_params": {"min_size": 25, "fg_threshold": 0.5},
    "train": {"handlers": [{"_target_": "Resume", "enabled": "@resume"}]},
}


def checked(*args: str, config: dict = CONFIG) -> dict:
    return overrides.check(overrides.parse_pairs(list(args)), config)


# --- settings: parsed, then checked against the config ------------------------------------------------------------


def test_pairs_in_both_spellings_keep_their_text():
    assert overrides.parse_pairs(["--epochs", "2", "--device=cpu", "--lr", "-1"]) == {
        "epochs": "2", "device": "cpu", "lr": "-1"}


@pytest.mark.parametrize("args, message", [
    (["--epochs"], "--epochs needs a value"),
    (["--epochs", "--resume", "true"], "--epochs needs a value"),
    (["epochs", "2"], "unexpected argument 'epochs'"),
])
def test_malformed_pairs_are_refused(args, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        overrides.parse_pairs(args)


def test_values_take_the_type_of_the_config_default():
    settings = checked("--epochs", "2", "--learning_rate", "1e-4", "--resume", "false", "--patch_size", "[128,64]",
                       "--amp_dtype", "16", "--source_mix", "{'a': 2}", "--postprocess_params#min_size", "30")
    assert settings == {"epochs": 2, "learning_rate": 1e-4, "resume": False, "patch_size": [128, 64],
                        "amp_dtype": "16", "source_mix": {"a": 2}, "postprocess_params#min_size": 30}
    assert settings["resume"] is False


@pytest.mark.parametrize("word, expected", [("false", False), ("False", False), ("no", False), ("0", False),
                                            ("true", True), ("True", True), ("1", True)])
def test_booleans_given_as_words_are_parsed(word, expected):
    assert checked("--resume", word)["resume"] is expected


@pytest.mark.parametrize("args, message", [
    (["--epoch", "2"], "unknown setting 'epoch'; did you mean 'epochs'?"),
    (["--set", "bundle_root=runs/mine"], "here settings are given as --KEY VALUE (e.g. --bundle_root DIR"),
    (["--learning_rat", "0.1"], "unknown setting 'learning_rat'; did you mean 'learning_rate'?"),
    (["--network_deff#features", "[8,16]"], "unknown setting 'network_deff#features'; did you mean 'network_def'?"),
    (["--train#handler#0#enabled", "true"],
     "unknown setting 'train#handler#0#enabled'; did you mean 'train#handlers'?"),
    (["--train#handlers#3#enabled", "true"], "unknown setting 'train#handlers#3#enabled'"),
    (["--epochs", "abc"], "--epochs expects an integer, got 'abc'"),
    (["--epochs", "2.5"], "--epochs expects an integer, got '2.5'"),
    (["--epochs", "True"], "--epochs expects an integer, got 'True'"),
    (["--learning_rate", "fast"], "--learning_rate expects a number, got 'fast'"),
    (["--resume", "maybe"], "--resume 'maybe' is not a boolean; use --resume true or --resume false"),
    (["--patch_size", "256"], "--patch_size expects a list such as [256, 256], got '256'"),
    (["--patch_size", "[256.0,256]"], "--patch_size expects a list of integers such as [256, 256]"),
    (["--postprocess_params", "25"], "--postprocess_params expects a dict"),
    (["--postprocess_params#min_size", "big"], "--postprocess_params#min_size expects an integer, got 'big'"),
])
def test_settings_the_config_cannot_take_are_refused_in_one_line(args, message):
    with pytest.raises(SettingError, match=re.escape(message)) as refused:
        checked(*args)
    assert "\n" not in str(refused.value)


def test_an_unknown_key_without_a_near_one_lists_the_keys():
    with pytest.raises(SettingError, match=r"unknown setting 'zzz'; the config has amp_dtype, bundle_root, ckpt_dir"):
        checked("--zzz", "1")


def test_new_arguments_of_a_component_and_code_values_pass_unchecked():
    settings = checked("--network_def#dropout", "0.1", "--epochs", "$2 * 3", "--ckpt_dir", "/tmp/x",
                       "--network_def::upsample", "'nearest'")
    assert settings == {"network_def#dropout": 0.1, "epochs": "$2 * 3", "ckpt_dir": "/tmp/x",
                        "network_def#upsample": "nearest"}


def test_a_keyword_of_a_component_whose_target_imports_is_checked_against_its_signature():
    config = {**CONFIG, "planner": {"_target_": "nucleiseg_monai.inference.RegionPlanner", "region_size": "$512 * 3"}}
    with pytest.raises(SettingError, match=re.escape("unknown setting 'planner#region_sise'; did you mean "
                                                     "'planner#region_size'?")):
        checked("--planner#region_sise", "1024", config=config)
    assert checked("--planner#max_regions", "2", config=config) == {"planner#max_regions": 2}  # a new keyword it takes
    # a value the config computes is typed by the parameter's default (region_size: int = 2048)
    assert checked("--planner#region_size", "1024", config=config) == {"planner#region_size": 1024}
    with pytest.raises(SettingError, match=re.escape("--planner#region_size expects an integer, got 'big'")):
        checked("--planner#region_size", "big", config=config)


def test_predict_settings_are_parsed_and_checked_against_the_bundle_config_as_typed():
    from nucleiseg_monai.inference import inference_configs

    files = inference_configs(REPO / "bundles" / "nuclei_unet_small")
    assert cli._overrides(["predictor#network#int8=false", "predictor#region_size=1536"], files) == {
        "predictor#network#int8": False, "predictor#planner#region_size": 1536}  # not the truthy text 'false'
    for pair, message in (
        ("predictor#network#int8=maybe", "--set predictor#network#int8='maybe' is not a boolean; use --set "
                                         "predictor#network#int8=true or --set predictor#network#int8=false"),
        ("predictor#planner#region_sise=1024", "unknown setting 'predictor#planner#region_sise'; did you mean "
                                               "'predictor#planner#region_size'?"),
        ("predictor#planner#region_size=big", "--set predictor#planner#region_size expects an integer, got 'big'"),
        # a part's setting mistyped without its part: the part's is the near one, not another of the predictor's
        ("predictor#regionsize=1024", "unknown setting 'predictor#regionsize'; did you mean "
                                      "'predictor#planner#region_size'?"),
    ):
        with pytest.raises(SettingError, match=re.escape(message)):
            cli._overrides([pair], files)


def test_patch_size_must_be_a_multiple_of_two_to_the_poolings():
    assert checked("--patch_size", "[64,208]")["patch_size"] == [64, 208]  # CONFIG's network pools 3 times
    with pytest.raises(SettingError, match=re.escape(
            '--patch_size [64, 204]: each side must be a positive multiple of 8 (the network pools 3 times), '
            'e.g. --patch_size "[64, 200]" or "[64, 208]"')):
        checked("--patch_size", "[64,204]")
    with pytest.raises(SettingError, match="multiple of 8"):
        checked("--patch_size", "[0,64]")


def test_patch_size_is_checked_against_the_network_given_with_it():
    with pytest.raises(SettingError, match=r"multiple of 16 \(the network pools 4 times\)"):
        checked("--network_def#features", "[16,32,64,128,256]", "--patch_size", "[248,248]")
    # a deeper network makes the config's own patch size invalid too
    with pytest.raises(SettingError, match=re.escape("--patch_size [256, 256]: each side must be a positive multiple "
                                                     "of 512 (the network pools 9 times)")):
        checked("--network_def", str({**CONFIG["network_def"], "features": [8] * 10}))


def test_patch_size_of_a_network_given_by_expression_holds_16():
    config = {**CONFIG, "network_def": "$make_network()"}
    assert checked("--patch_size", "[272,272]", config=config)["patch_size"] == [272, 272]
    with pytest.raises(SettingError, match="multiple of 16"):
        checked("--patch_size", "[264,264]", config=config)


def test_a_config_that_is_not_json_is_named(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text('{"epochs": 2,,}')
    with pytest.raises(SettingError, match=re.escape(f"{bad} is not a valid config")):
        overrides.load_config([bad])


def test_config_files_merge_as_monai_merges_them(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": 1, "y": {"k": 1}, "z": {"k": 1, "l": 2}}))
    (tmp_path / "b.json").write_text(json.dumps({"y": {"j": 2}, "z#k": 3}))  # an overlay sets one entry by its id
    assert overrides.load_config([tmp_path / "a.json", tmp_path / "b.json"]) == {
        "x": 1, "y": {"j": 2}, "z": {"k": 3, "l": 2}}


# --- one line per error --------------------------------------------------------------------------------------------


def _raised_through_monai(exc: Exception) -> Exception:
    """What MONAI raises when ``exc`` comes from an expression two references deep in a config."""

    def fail():
        raise exc

    parser = ConfigParser({"datalist": "$fail()", "train": {"records": "$@datalist[0]"}, "run": ["$len(@train)"]},
                          globals={"fail": fail})
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("run")
    return raised.value


def test_the_cause_is_found_under_monais_wrappers():
    wrapped = _raised_through_monai(DataError("tiles/a.png: 4 channels; save it as RGB"))
    assert str(wrapped).startswith("Failed to evaluate")
    assert isinstance(errors.root_cause(wrapped), DataError)
    assert errors.one_line(wrapped) == "tiles/a.png: 4 channels; save it as RGB"


def test_the_cause_is_found_under_a_transforms_wrapper():
    from monai.transforms import Compose, Lambda

    def load(_):
        raise DataError("tiles/a.tif does not exist; check the data folder (--data_root) and the datalist")

    with pytest.raises(RuntimeError) as raised:
        Compose([Lambda(load)])({"image": "tiles/a.tif"})
    assert str(raised.value).startswith("applying transform")
    wrapped = _raised_through_monai(raised.value)
    assert errors.one_line(wrapped) == ("tiles/a.tif does not exist; check the data folder (--data_root) and the "
                                        "datalist")


def test_our_message_wins_over_the_exception_it_was_raised_from():
    try:
        try:
            raise KeyError("width")
        except KeyError as err:
            raise DataError("a.tif: no width tag; re-save it with tifffile") from err
    except DataError as err:
        assert errors.one_line(err) == "a.tif: no width tag; re-save it with tifffile"


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "free space on that disk or write elsewhere"),
    (errno.EACCES, "choose a place you can write to, or change its permissions"),
    (errno.ENOENT, "check the path (or the setting that names it)"),
])
def test_os_errors_name_the_path_and_the_fix(code, fix):
    wrapped = _raised_through_monai(OSError(code, os.strerror(code), "/out/models/model.pt"))
    assert errors.one_line(wrapped) == f"/out/models/model.pt: {os.strerror(code)}; {fix}"


def test_an_unexpected_error_says_its_type_and_where_in_the_config():
    line = errors.one_line(_raised_through_monai(TypeError("'NoneType' object is not subscriptable")))
    assert line == ("TypeError: 'NoneType' object is not subscriptable (in '$fail()'); "
                    "--debug shows the full traceback")


def test_logged_tracebacks_are_dropped_only_inside_the_block():
    stream = io.StringIO()
    log = logging.getLogger("test_cli.tracebacks")
    log.addHandler(logging.StreamHandler(stream))
    log.propagate = False
    try:
        with errors.tracebacks_out_of_logs():
            try:
                raise OSError("disk full")
            except OSError:
                log.exception("Exception: disk full")
        assert stream.getvalue() == "Exception: disk full\n"
        try:
            raise OSError("disk full")
        except OSError:
            log.exception("again")
        assert "Traceback" in stream.getvalue()
    finally:
        log.handlers.clear()


# --- the commands, on a tiny bundle --------------------------------------------------------------------------------


def tiny_bundle(root: Path, evaluate: dict | None = None, **settings) -> Path:
    """A bundle whose training records its settings in output_dir/ran.json after reading data.json."""
    train = {
        "imports": ["$import os", "$import json"],
        "bundle_root": ".",
        "ckpt_dir": "$os.path.join(@bundle_root, 'models')",
        "output_dir": "$os.path.join(@bundle_root, 'runs')",
        "data": "$json.load(open(os.path.join(@bundle_root, 'data.json')))",
        "epochs": 3,
        "resume": False,
        "patch_size": [64, 64],
        "network_def": {"_target_": "torch.nn.Identity", "features": [8, 16, 32]},
        "split": "test",
        "record": "$lambda name: open(os.path.join(@output_dir, name), 'w').write(json.dumps("
                  "{'epochs': @epochs, 'resume': @resume, 'patch_size': @patch_size, 'split': @split, 'data': @data}))",
        "training": ["$@record('ran.json')"],
        **settings,
    }
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "train.json").write_text(json.dumps(train))
    (root / "configs" / "metadata.json").write_text("{}")
    if evaluate is not None:
        (root / "configs" / "evaluate.json").write_text(json.dumps(evaluate))
    (root / "data.json").write_text("[1, 2]")
    return root


def test_train_runs_the_bundle_with_checked_settings(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    assert cli.main(["train", "--bundle", str(bundle), "--epochs", "5", "--resume", "false",
                     "--patch_size", "[32,48]"]) == 0
    assert json.loads((bundle / "runs" / "ran.json").read_text()) == {
        "epochs": 5, "resume": False, "patch_size": [32, 48], "split": "test", "data": [1, 2]}


def test_a_resumed_train_gives_the_run_its_own_settings_and_warns_of_those_typed_otherwise(tmp_path, caplog):
    import torch

    bundle = tiny_bundle(tmp_path / "b")
    (bundle / "models").mkdir()
    torch.save({"settings": {"given": {"patch_size": [32, 32], "split": "validation"}}},
               bundle / "models" / "checkpoint_last.pt")
    with caplog.at_level(logging.INFO, logger="nucleiseg"):
        assert cli.main(["train", "--bundle", str(bundle), "--resume", "true", "--split", "training"]) == 0
    ran = json.loads((bundle / "runs" / "ran.json").read_text())
    assert (ran["patch_size"], ran["split"], ran["resume"]) == ([32, 32], "training", True)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "nucleiseg"] == [
        ("INFO", f"resuming {bundle} with its own settings: --patch_size '[32, 32]'"),
        ("WARNING", f"resuming {bundle} with other settings than its own, as typed: --split training (the run had "
                    "validation)")]
    # a new run is given only what is typed
    caplog.clear()
    assert cli.main(["train", "--bundle", str(bundle), "--split", "training"]) == 0
    assert json.loads((bundle / "runs" / "ran.json").read_text())["patch_size"] == [64, 64]
    assert not [r for r in caplog.records if r.name == "nucleiseg"]


def test_a_whole_setting_typed_over_recorded_parts_of_it_names_those_parts():
    config = {"network_def": {"_target_": "UNet", "features": [4, 8]}, "epochs": 2}
    recorded = {"network_def#features": [8, 16], "seed": 1}
    typed = {"network_def": {"_target_": "UNet", "features": [2, 4]}, "seed": 1}
    assert cli._typed_otherwise(recorded, typed, config) == {
        "network_def": ("--network_def#features '[8, 16]'", typed["network_def"])}


def test_a_refused_setting_stops_before_anything_runs(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path / "b")
    assert cli.main(["train", "--bundle", str(bundle), "--epoch", "2"]) == 2
    assert capsys.readouterr().err == "nucleiseg train: error: unknown setting 'epoch'; did you mean 'epochs'?\n"
    assert not (bundle / "runs").exists()


def test_an_error_in_the_run_is_one_line_naming_the_file(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path / "b")
    (bundle / "data.json").unlink()
    assert cli.main(["train", "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert err == (f"nucleiseg train: error: {bundle.resolve() / 'data.json'}: No such file or directory; "
                   "check the path (or the setting that names it)\n")


def test_an_output_folder_that_cannot_be_made_is_reported_before_the_run(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path / "b")
    (tmp_path / "a_file").write_text("")
    (bundle / "data.json").unlink()  # the run would fail on it: the folder must be reported first
    assert cli.main(["train", "--bundle", str(bundle), "--output_dir", str(tmp_path / "a_file" / "runs")]) == 2
    err = capsys.readouterr().err
    assert err == (f"nucleiseg train: error: cannot create the output folder {tmp_path / 'a_file' / 'runs'} "
                   "(setting 'output_dir'): Not a directory; choose one you can write to with --output_dir DIR "
                   "or --bundle_root DIR\n")


def test_train_removes_the_temporaries_of_dead_writers_from_models(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    models = bundle / "models"
    models.mkdir()
    stale = _temporary_of_a_killed_writer(models / "checkpoint_last.pt")
    live = atomic.AtomicFile(models / "model.pt").tmp  # this process is writing it
    assert cli.main(["train", "--bundle", str(bundle)]) == 0
    assert not stale.exists() and live.exists()


def test_evaluate_runs_a_whole_evaluate_json_alone(tmp_path):
    evaluate = {"imports": ["$import os"], "bundle_root": ".", "output_dir": "$os.path.join(@bundle_root, 'eval')",
                "evaluating": ["$open(os.path.join(@output_dir, 'done'), 'w').write('alone')"]}
    bundle = tiny_bundle(tmp_path / "b", evaluate=evaluate)
    assert cli.evaluate_configs(str(bundle)) == [bundle / "configs" / "evaluate.json"]
    assert cli.main(["evaluate", "--bundle", str(bundle)]) == 0
    assert (bundle / "eval" / "done").read_text() == "alone"


def test_evaluate_runs_an_overlay_over_train_json(tmp_path, capsys):
    overlay = {"output_dir": "$os.path.join(@bundle_root, 'eval', @split)", "evaluating": ["$@record('scored.json')"],
               "network_def#features": [8, 16, 32, 64]}
    bundle = tiny_bundle(tmp_path / "b", evaluate=overlay)
    configs = bundle / "configs"
    assert cli.evaluate_configs(str(bundle)) == [configs / "train.json", configs / "evaluate.json"]
    assert cli.main(["evaluate", "--bundle", str(bundle), "--split", "validation"]) == 0
    assert json.loads((bundle / "eval" / "validation" / "scored.json").read_text())["split"] == "validation"
    assert cli.main(["evaluate", "--bundle", str(bundle), "--epochs", "x"]) == 2
    assert capsys.readouterr().err == "nucleiseg evaluate: error: --epochs expects an integer, got 'x'\n"
    # the overlay's network pools 3 times, train.json's twice: 36 is checked against the overlay's
    assert cli.main(["evaluate", "--bundle", str(bundle), "--patch_size", "[36,36]"]) == 2
    assert "multiple of 8 (the network pools 3 times)" in capsys.readouterr().err


def test_a_failed_evaluate_leaves_no_empty_output_folder(tmp_path, capsys):
    overlay = {"output_dir": "$os.path.join(@bundle_root, 'eval', @split)", "evaluating": ["$@record('scored.json')"]}
    bundle = tiny_bundle(tmp_path / "b", evaluate=overlay)
    (bundle / "data.json").unlink()  # the run fails after its output folder was made and checked
    assert cli.main(["evaluate", "--bundle", str(bundle)]) == 2
    assert "data.json" in capsys.readouterr().err
    assert not (bundle / "eval").exists()
    # a folder that was there before the run stays, and so does one the run wrote in
    (bundle / "eval" / "test").mkdir(parents=True)
    assert cli.main(["evaluate", "--bundle", str(bundle)]) == 2
    assert (bundle / "eval" / "test").is_dir()
    (bundle / "data.json").write_text("[1]")
    assert cli.main(["evaluate", "--bundle", str(bundle), "--split", "validation"]) == 0
    assert (bundle / "eval" / "validation" / "scored.json").is_file()


def test_a_failed_training_leaves_no_empty_output_folders(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    (bundle / "data.json").unlink()
    assert cli.main(["train", "--bundle", str(bundle)]) == 2
    assert not (bundle / "runs").exists() and not (bundle / "models").exists()


def test_other_commands_refuse_settings(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["verify", "--bundle", "x", "--epochs", "2"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --epochs 2" in capsys.readouterr().err


@pytest.mark.slow
def test_the_installed_command_ends_an_error_in_one_line(tmp_path):
    """End to end through the console script: no traceback, no "Failed to evaluate", exit code 2; --debug adds
    the traceback and keeps the line."""
    bundle = tiny_bundle(tmp_path / "b")
    (bundle / "data.json").unlink()
    command = [str(Path(sys.executable).with_name("nucleiseg")), "train", "--bundle", str(bundle)]
    line = (f"nucleiseg train: error: {bundle.resolve() / 'data.json'}: No such file or directory; "
            "check the path (or the setting that names it)")
    # both at once: each is seconds of imports on one core before the error, and neither writes anything
    started = subprocess.Popen([*command, "--debug"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        quiet = subprocess.run(command, capture_output=True, text=True, timeout=300)
        out, err = started.communicate(timeout=300)
    finally:
        started.kill()  # nothing once it has ended; a hung one must not outlive the test
        started.wait()
    debug = subprocess.CompletedProcess(started.args, started.returncode, out, err)
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines()[-1] == line
    assert "Traceback" not in quiet.stdout + quiet.stderr
    assert "Failed to evaluate" not in quiet.stdout + quiet.stderr
    assert debug.returncode == 2
    assert debug.stderr.splitlines()[-1] == line
    assert "Traceback" in debug.stderr and "Failed to evaluate" in debug.stderr


def test_predict_without_weights_says_so_in_one_line(tmp_path, caplog):
    """The predictor is built by MONAI's config evaluation, which wraps the missing file in two RuntimeErrors."""
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "nuclei_unet_small", bundle, ignore=shutil.ignore_patterns("model.pt", "eval"))
    image = tmp_path / "tile.tif"
    tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8))
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", "--bundle", str(bundle), "--input", str(image),
                         "--output_dir", str(tmp_path / "out")]) == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == (
        f"no trained weights at {bundle / 'models' / 'model.pt'}; train the bundle first (nucleiseg train --bundle "
        f"{bundle}), unpack a packed copy of it (nucleiseg unpack) or pass --checkpoint PATH")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_interrupted_evaluation_says_it_starts_again(monkeypatch, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_evaluate", interrupted)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["evaluate", "--bundle", "b"]) == 130
    assert "interrupted: no report was written" in caplog.text and "evaluate from the start" in caplog.text


@pytest.mark.parametrize("raised, code, said", [
    (PermissionError(13, "Permission denied", "/data/out"), 2,
     "/data/out: Permission denied; choose a place you can write to, or change its permissions"),
    (NotADirectoryError(20, "Not a directory", "/data/afile/x"), 2, "Not a directory"),
    (KeyboardInterrupt(), 130, "interrupted: finished images, and the finished regions of an unfinished one, "
                               "are kept; run the same command again to go on"),
])
def test_a_run_ends_an_os_error_or_an_interruption_in_one_line(monkeypatch, caplog, raised, code, said):
    def fails(args):
        raise raised

    monkeypatch.setattr(cli, "cmd_predict", fails)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", "--bundle", "b", "--input", "i.tif", "--output_dir", "o"]) == code
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert said in record.getMessage() and record.exc_info is None


def test_an_interrupted_overwrite_says_to_go_on_without_it(monkeypatch, caplog):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_predict", interrupted)
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", "--bundle", "b", "--input", "i.tif", "--output_dir", "o", "--overwrite"]) == 130
    assert "are kept; run the same command again without --overwrite to go on" in caplog.text


def test_a_mistyped_input_is_named_before_the_network_is_built(monkeypatch, tmp_path, caplog):
    from nucleiseg_monai.inference import SlidePredictor

    def built(*args, **kwargs):
        raise AssertionError("the network was built for an input that does not exist")

    monkeypatch.setattr(SlidePredictor, "from_bundle", built)
    missing = tmp_path / "slide_typo.svs"
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", "--bundle", str(REPO / "bundles" / "nuclei_unet_small"), "--input", str(missing),
                         "--output_dir", str(tmp_path / "out")]) == 2
    assert f"{missing} does not exist; give an image file, a folder of images or a glob" in caplog.text


def test_a_warning_is_one_log_line_without_python_source(monkeypatch, caplog):
    def warns(args):
        warnings.warn("scan.tif: ignoring implausible pixel size 352.8 um/px from the resolution tags", stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "cmd_predict", warns)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["predict", "--bundle", "b", "--input", "i.tif", "--output_dir", "o"]) == 0
    (record,) = [r for r in caplog.records if r.name == "py.warnings"]
    assert record.getMessage() == ("UserWarning: scan.tif: ignoring implausible pixel size 352.8 um/px from the "
                                   "resolution tags")
    assert warnings.formatwarning is not None and "UserWarning: x\n" in warnings.formatwarning("x", UserWarning, "f", 1)


@pytest.mark.parametrize("value", ["40", "0", "-1", "nan", "abc"])
def test_predict_refuses_an_mpp_that_is_no_pixel_size_before_anything_runs(monkeypatch, capsys, value):
    monkeypatch.setattr(cli, "cmd_predict", lambda args: pytest.fail("ran with --mpp " + value))
    with pytest.raises(SystemExit) as exited:
        cli.main(["predict", "--bundle", "b", "--input", "i.tif", "--output_dir", "o", "--mpp", value])
    assert exited.value.code == 2
    assert "microns per pixel, not a magnification: 40x is about 0.25 um/px" in capsys.readouterr().err


# --- help and version ----------------------------------------------------------------------------------------------


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"nucleiseg {version('nucleiseg-monai')}\n"


def _option_descriptions(help_text: str) -> dict[str, str]:
    """Each option of an argparse help text and its description (on its line, or on the next, indented)."""
    lines = help_text.split("options:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    options = {}
    for i, line in enumerate(lines):
        if re.match(r"  -", line):
            name, _, description = line.strip().partition("  ")
            if not description.strip() and i + 1 < len(lines) and re.match(r" {6,}\S", lines[i + 1]):
                description = lines[i + 1]
            options[name] = description.strip()
    return options


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_every_command_and_option_has_help(capsys):
    top = _help(capsys)
    commands = dict(re.findall(r"^    (\w+) +(.*)$", top, flags=re.MULTILINE))
    assert {"train", "evaluate", "predict", "tune", "pack", "unpack", "verify"} <= set(commands)
    assert all(commands.values()), commands
    assert _option_descriptions(top) == {"-h, --help": "show this help message and exit",
                                         "--version": "show program's version number and exit"}
    for command in commands:
        options = _option_descriptions(_help(capsys, command))
        assert "-h, --help" in options
        missing = [name for name, description in options.items() if not description]
        assert not missing, f"nucleiseg {command}: no help for {missing}"


def test_the_help_reader_sees_a_missing_description():
    text = "usage: x\n\noptions:\n  -h, --help  show this\n  --bare\n  --long LONG\n                 described\n"
    assert _option_descriptions(text) == {"-h, --help": "show this", "--bare": "", "--long LONG": "described"}


# --- stale temporary files -----------------------------------------------------------------------------------------


def _temporary_of_a_killed_writer(path: Path) -> Path:
    """The temporary file a process killed mid-write leaves beside ``path``."""
    code = ("import os, sys; from nucleiseg_monai.atomic import AtomicFile; "
            "f = AtomicFile(sys.argv[1]); f.tmp.write_bytes(b'half'); print(f.tmp, flush=True); "
            "os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9
    return Path(done.stdout.strip())


def test_temporary_names_carry_the_writer_and_keep_the_suffix(tmp_path):
    target = atomic.AtomicFile(tmp_path / "model.pt")
    assert target.tmp.name.startswith(f".model.pt.pid{os.getpid()}@")
    assert target.tmp.suffix == ".pt"
    assert atomic.TEMPORARY_NAME.match(target.tmp.name)
    assert atomic.TEMPORARY_NAME.match(".model.pt.k2j4_9ab.tmp.pt")  # written before names carried the writer
    assert not atomic.TEMPORARY_NAME.match("model.pt") and not atomic.TEMPORARY_NAME.match(".model.pt.tmp")


def test_remove_stale_deletes_what_dead_or_long_idle_writers_left(tmp_path):
    dead = _temporary_of_a_killed_writer(tmp_path / "checkpoint_last.pt")
    live = atomic.AtomicFile(tmp_path / "model.pt").tmp
    idle = atomic.AtomicFile(tmp_path / "metrics.json").tmp
    old = time.time() - 7200
    os.utime(idle, (old, old))
    elsewhere = tmp_path / ".a.tif.pid1@another_host-abcd1234.tmp.tif"  # pid 1 lives there, maybe not here
    elsewhere.write_bytes(b"")
    unnamed = tmp_path / ".a.csv.abcd1234.tmp.csv"
    unnamed.write_bytes(b"")
    others = [tmp_path / "model.pt.tmp", tmp_path / "notes.txt"]
    for path in others:
        path.write_bytes(b"")
    assert sorted(atomic.remove_stale(tmp_path)) == sorted([dead, idle])
    assert live.exists() and elsewhere.exists() and unnamed.exists() and all(p.exists() for p in others)
    assert sorted(atomic.remove_stale(tmp_path, older_than_s=-1)) == sorted([live, elsewhere, unnamed])
    assert all(p.exists() for p in others)


def test_liveness_tells_a_finished_process_from_a_running_one():
    # psutil asks each system its own way: Windows' os.kill(pid, 0) would terminate the process instead
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert atomic.process_alive(os.getpid()) and not atomic.process_alive(finished.pid)


def test_remove_stale_of_a_missing_folder_removes_nothing(tmp_path):
    assert atomic.remove_stale(tmp_path / "none") == []


@pytest.mark.parametrize("other_weights", ["--set bundle_root={run}", "--set checkpoint={run}/models/model.pt",
                                           "--bundle_root {run}", "--checkpoint {run}/models/model.pt"])
def test_tune_never_writes_another_runs_parameters_into_the_bundle(tmp_path, caplog, other_weights):
    bundle = tiny_bundle(tmp_path / "b", evaluate={"checkpoint": "$os.path.join(@ckpt_dir, 'model.pt')"},
                         postprocess_params={"min_size": 25})
    train = (bundle / "configs" / "train.json").read_text()
    run = tmp_path / "runs" / "mine"
    # the flags as train and evaluate spell them, or --set as before
    assert cli.main(["tune", "--bundle", str(bundle), *other_weights.format(run=run).split(), "--apply"]) == 2
    assert (bundle / "configs" / "train.json").read_text() == train
    assert f"tuned for {run / 'models' / 'model.pt'}" in caplog.text and "--bundle COPY --apply" in caplog.text
    assert not (bundle / "docs").exists()


def test_tune_on_another_registry_keeps_the_bundles_record_and_refuses_to_apply(tmp_path, caplog, monkeypatch,
                                                                             capsys):
    from nucleiseg_monai import tuning

    bundle = tiny_bundle(tmp_path / "b", evaluate={"checkpoint": "$os.path.join(@ckpt_dir, 'model.pt')"},
                         postprocess_params={"min_size": 25}, sources_file=None, datalist_file="d.json")
    train = (bundle / "configs" / "train.json").read_text()
    mine = tmp_path / "my_sources.json"
    assert cli.main(["tune", "--bundle", str(bundle), "--sources_file", str(mine), "--apply"]) == 2
    assert "tuned on other data than the bundle's registry" in caplog.text
    assert (bundle / "configs" / "train.json").read_text() == train

    reports = []

    def tune(configs, report_file, overrides, **_):
        reports.append((Path(report_file), overrides["sources_file"]))
        return {"chosen": {"params": {"min_size": 30}, "validation": {}}, "validation_tiles": [], "results": []}

    monkeypatch.setattr(tuning, "tune", tune)
    capsys.readouterr()
    assert cli.main(["tune", "--bundle", str(bundle), "--sources_file", str(mine)]) == 0
    assert reports == [(bundle / "eval" / "postprocess_tuning.json", str(mine))]  # not the bundle's docs/ record
    printed = capsys.readouterr().out
    assert "--postprocess_params \"{'min_size': 30}\" on evaluate" in printed and "--apply" not in printed


def test_a_whole_postprocess_params_dict_is_one_setting():
    params = {"fg_threshold": 0.6, "marker_threshold": 0.4, "min_size": 60}
    assert checked("--postprocess_params", str(params)) == {"postprocess_params": params}


def test_tune_leaves_a_packed_bundle_as_it_was_packed(tmp_path, caplog, monkeypatch):
    from nucleiseg_monai import tuning
    from nucleiseg_monai.packaging import verify, write_manifest

    bundle = tiny_bundle(tmp_path / "b", evaluate={"checkpoint": "$os.path.join(@ckpt_dir, 'model.pt')"},
                         postprocess_params={"min_size": 25})
    (bundle / "configs" / "metadata.json").write_text('{"version": "0.1.0"}')
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    write_manifest(bundle)  # as nucleiseg unpack leaves it
    monkeypatch.setenv("NUCLEISEG_TRUST_CONFIGS", "1")  # its configs read data.json with open(), which is named
    assert cli.main(["tune", "--bundle", str(bundle), "--apply"]) == 2
    assert "a file of the packed bundle's manifest.json" in caplog.text and verify(bundle) == []

    reports = []

    def tune(configs, report_file, **_):
        reports.append(Path(report_file))
        return {"chosen": {"params": {"min_size": 25}, "validation": {}}, "validation_tiles": [], "results": []}

    monkeypatch.setattr(tuning, "tune", tune)
    assert cli.main(["tune", "--bundle", str(bundle)]) == 0
    assert reports == [bundle / "eval" / "postprocess_tuning.json"]  # an output folder, not its sealed docs/


def test_force_mpp_without_a_pixel_size_is_refused_before_anything_runs(tmp_path):
    bundle = str(REPO / "bundles" / "nuclei_unet_small")
    with pytest.raises(SystemExit, match=r"--force_mpp needs the pixel size to force: pass --mpp X --force_mpp"):
        cli.main(["predict", "--bundle", bundle, "--input", str(tmp_path / "i.tif"), "--output_dir",
                  str(tmp_path / "o"), "--force_mpp"])
    assert not (tmp_path / "o").exists()


def test_predict_with_a_checkpoint_that_is_not_there_names_it_not_the_bundle(tmp_path, caplog):
    image = tmp_path / "tile.tif"
    tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8))
    missing = tmp_path / "nope.pt"
    with caplog.at_level(logging.ERROR):
        assert cli.main(["predict", "--bundle", str(REPO / "bundles" / "nuclei_unet_small"), "--input", str(image),
                         "--output_dir", str(tmp_path / "out"), "--checkpoint", str(missing)]) == 2
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == (f"no weights file at {missing}: check the path given as the checkpoint "
                                   "(--checkpoint), or leave it out to use the bundle's own models/model.pt")


def test_null_is_none_where_a_setting_takes_none_and_refused_by_name_elsewhere():
    from nucleiseg_monai.inference import inference_configs

    files = inference_configs(REPO / "bundles" / "nuclei_unet_small")
    # RegionPlanner's tissue_threshold: float | None = 0.0 ("None processes every region")
    for word in ("null", "None", "none"):
        assert cli._overrides([f"predictor#planner#tissue_threshold={word}"], files) == {
            "predictor#planner#tissue_threshold": None}
    assert cli._overrides(["predictor#planner#tissue_threshold=0.2"], files) == {
        "predictor#planner#tissue_threshold": 0.2}
    with pytest.raises(SettingError, match=re.escape("--set predictor#planner#region_size cannot be null: it expects "
                                                     "an integer, got 'null'")):
        cli._overrides(["predictor#planner#region_size=null"], files)
    # train.json's window is null, and window_inferer takes it as int | None: typed by that
    train = overrides.load_config([REPO / "bundles" / "nuclei_unet_small" / "configs" / "train.json"])
    assert checked("--window", "null", config=train) == {"window": None}
    assert checked("--window", "512", config=train) == {"window": 512}
    with pytest.raises(SettingError, match=re.escape("--window expects an integer, got 'big'")):
        checked("--window", "big", config=train)
    assert checked("--bundle_root", "none", config=train) == {"bundle_root": "none"}  # a text keeps the word


def test_datalist_reads_the_default_data_root_and_says_which(tmp_path, monkeypatch, caplog):
    from nucleiseg_monai.synthetic import write_dataset

    write_dataset(tmp_path / "data" / "tiles", n_tiles=9, size=64, organs=("Skin", "Thymus", "Lung"), seed=0)
    (tmp_path / "sources.json").write_text(json.dumps({"tiles": {
        "root": "tiles", "layout": "kaggle", "mpp": 0.25, "organs": "name",
        "split": {"kind": "organ_stratified", "val_fraction": 0.15, "test_fraction": 0.3, "seed": 0}}}))
    monkeypatch.setenv("NUCLEISEG_DATA", str(tmp_path / "data"))
    with caplog.at_level(logging.INFO, logger="nucleiseg"):
        assert cli.main(["datalist", "--output", str(tmp_path / "dl.json"),
                         "--sources_file", str(tmp_path / "sources.json")]) == 0
    assert f"data root {tmp_path / 'data'} ($NUCLEISEG_DATA" in caplog.text
    datalist = json.loads((tmp_path / "dl.json").read_text())
    assert sum(len(datalist[p]) for p in ("training", "validation", "test")) == 9


def test_output_the_console_cannot_encode_is_escaped_not_an_error(monkeypatch):
    # Windows writes output sent to a file or pipe in its ANSI code page, and strictly: a path in another alphabet
    # ended the command with UnicodeEncodeError
    raw = io.BytesIO()
    console = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    monkeypatch.setattr(sys, "stdout", console)
    with pytest.raises(UnicodeEncodeError):
        print("Łódź/slide.svs", file=console)
    cli._printable_anywhere()
    print("Łódź/slide.svs", file=console)
    console.flush()
    assert raw.getvalue().endswith(b"\\u0141\xf3d\\u017a/slide.svs\n")
