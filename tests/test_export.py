"""TorchScript export with MONAI's own ``ckpt_export`` as the README runs it; the .ts loads without our package and
takes RGB on the 0-255 scale, the channel statistics inside it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import bundle_outputs, saved_random_unet
from nucleiseg_monai.networks import UNet

REPO = Path(__file__).resolve().parents[1]
EXPORTABLE = sorted(p.parents[1] for p in (REPO / "bundles").glob("*/configs/export.json"))
TINY = [4, 8, 16]

# Runs in a fresh interpreter: only torch may be imported, so the .ts must stand on its own.
LOAD_TS = """
import sys, torch
torch.set_num_threads(1)
extra = {"metadata.json": "", "train.json": ""}
net = torch.jit.load(sys.argv[1], map_location="cpu", _extra_files=extra)
with torch.no_grad():
    out = net(torch.load(sys.argv[2], weights_only=True))
torch.save(out, sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] in ("nucleiseg_monai", "monai")], "the .ts needs our code"
assert extra["metadata.json"] and extra["train.json"], "metadata or config missing from the .ts"
"""


@pytest.mark.slow  # two subprocesses: MONAI's ckpt_export, then a bare load of what it wrote
@pytest.mark.parametrize("bundle", EXPORTABLE, ids=lambda p: p.name)
def test_ckpt_export_runs_without_the_package(bundle, tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / bundle.name
    shutil.copytree(bundle / "configs", root / "configs")
    out_channels = bundle_outputs(bundle)
    net = saved_random_unet(root / "models" / "model.pt", out_channels, TINY)
    stats = {"mean": [180.0, 120.0, 160.0], "std": [30.0, 40.0, 35.0]}
    (root / "models" / "channel_stats.json").write_text(json.dumps(stats))
    ts_file = root / "models" / "model.ts"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    export = [
        sys.executable, "-m", "monai.bundle", "ckpt_export",
        "--args_file", str(root / "configs" / "export.json"),
        "--filepath", str(ts_file),
        "--ckpt_file", str(root / "models" / "model.pt"),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--config_file", str(root / "configs" / "train.json"),
        "--network_def#features", json.dumps(TINY),
    ]  # fmt: skip
    done = subprocess.run(export, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and ts_file.is_file(), done.stderr[-3000:]

    # a shape other than the export's trace input, and not square: the .ts must generalise
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 255
    torch.save(x, tmp_path / "x.pt")
    load = [sys.executable, "-c", LOAD_TS, str(ts_file), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    done = subprocess.run(load, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]

    exported = torch.load(tmp_path / "y.pt", weights_only=True)
    mean, std = (torch.tensor(stats[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        expected = net((x - mean) / std)  # z-scored inside: the .ts needs no channel_stats.json beside it
    assert exported.shape == (2, out_channels, 64, 96)
    assert (exported - expected).abs().max().item() < 1e-4


def test_unet_scripts_and_keeps_its_shape_check():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = UNet(features=TINY).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert (scripted(x) - net(x)).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="divisible by 4,"):
        scripted(torch.randn(1, 3, 30, 32))


@pytest.mark.parametrize("bundle", EXPORTABLE, ids=lambda p: p.name)
def test_export_takes_the_statistics_of_weights_from_elsewhere_from_stats_file(bundle, tmp_path):
    # ckpt_export never shows its --ckpt_file to the config, so weights of another run bring their statistics
    # through --stats_file, as the README says; without it the bundle's own are inside
    from monai.bundle import ConfigParser

    run = {"mean": [170.0, 110.0, 150.0], "std": [25.0, 45.0, 30.0]}
    (tmp_path / "channel_stats.json").write_text(json.dumps(run))
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "export.json")])
    parser["bundle_root"] = str(bundle)
    export = json.loads((bundle / "configs" / "export.json").read_text())
    own = json.loads((bundle / "models" / "channel_stats.json").read_text())
    net = parser.get_parsed_content(export["net_id"], instantiate=True)
    assert net.mean.flatten().tolist() == pytest.approx(own["mean"])
    parser["stats_file"] = str(tmp_path / "channel_stats.json")
    net = parser.get_parsed_content(export["net_id"], instantiate=True, lazy=False)
    assert net.mean.flatten().tolist() == pytest.approx(run["mean"])
    assert net.std.flatten().tolist() == pytest.approx(run["std"])


def test_export_takes_the_statistics_beside_the_ckpt_file_it_is_given(tmp_path, caplog, capsys):
    from nucleiseg_monai.bundle import export_stats

    own = {"mean": [126.0, 79.0, 108.0], "std": [40.0, 40.0, 40.0]}
    run = {"mean": [183.0, 134.0, 169.0], "std": [25.0, 45.0, 30.0]}
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "channel_stats.json").write_text(json.dumps(own))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    (tmp_path / "run" / "channel_stats.json").write_text(json.dumps(run))
    stats_file = str(tmp_path / "bundle" / "channel_stats.json")
    command = ["ckpt_export", "--args_file", "export.json", "--ckpt_file", str(tmp_path / "run" / "model.pt")]
    with caplog.at_level("INFO", logger="nucleiseg_monai.bundle"):
        assert export_stats(stats_file, command) == run  # ckpt_export never shows --ckpt_file to the config
    assert f"channel statistics {tmp_path / 'run' / 'channel_stats.json'}, beside the weights" in caplog.text
    # said whatever the logging: ckpt_export sets up none
    assert capsys.readouterr().err == ("nucleiseg-monai: the exported network normalises its input with "
                                       f"{tmp_path / 'run' / 'channel_stats.json'}\n")
    assert export_stats(stats_file, command + ["--stats_file", stats_file]) == own  # chosen on the command line
    assert export_stats(stats_file, ["ckpt_export", f"--ckpt_file={tmp_path / 'run' / 'model.pt'}"]) == run
    assert export_stats(stats_file, ["ckpt_export", "--args_file", "export.json"]) == own  # the bundle's weights
    assert export_stats(stats_file, ["ckpt_export", "--ckpt-file", str(tmp_path / "run" / "model.pt")]) == run
    args = tmp_path / "args.json"  # ckpt_export merges an args file's keys under the command line's
    args.write_text(json.dumps({"net_id": "export_network", "ckpt_file": str(tmp_path / "run" / "model.pt")}))
    assert export_stats(stats_file, ["ckpt_export", "--args_file", str(args)]) == run
