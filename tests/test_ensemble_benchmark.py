"""benchmarks/ensemble.py: the combined checkpoint loads, as the evaluation config loads any bundle's weights, into
a network whose output is exactly the mean of its members' outputs."""

import sys
from pathlib import Path

import pytest
import torch

from nucleiseg_monai.networks import UNet, load_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ensemble  # noqa: E402


def test_combined_checkpoint_gives_the_mean_of_its_members(tmp_path):
    torch.manual_seed(0)
    members = [UNet(3, 4, features=(4, 8, 16)).eval(), UNet(3, 4, features=(6, 12, 24)).eval()]
    for i, m in enumerate(members):
        torch.save({"network": m.state_dict()}, tmp_path / f"m{i}.pt")  # a training checkpoint's layout
    config = ensemble.combine([tmp_path / "m0.pt", tmp_path / "m1.pt"], tmp_path / "ensemble.pt")
    assert config == {"_target_": "ensemble.MeanOfNetworks", "widths": [[4, 8, 16], [6, 12, 24]], "out_channels": 4}
    combined = load_weights(ensemble.MeanOfNetworks(config["widths"], config["out_channels"]), tmp_path / "ensemble.pt")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = (members[0](x) + members[1](x)) / 2
        assert torch.allclose(combined.eval()(x), expected, atol=1e-6)
    assert combined.multiple == 4


def test_members_with_other_outputs_are_refused(tmp_path):
    torch.save(UNet(3, 3, features=(4, 8)).state_dict(), tmp_path / "a.pt")
    torch.save(UNet(3, 4, features=(4, 8)).state_dict(), tmp_path / "b.pt")
    with pytest.raises(SystemExit, match="same outputs"):
        ensemble.combine([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "ensemble.pt")


def test_each_member_is_scored_alone_with_its_own_widths(tmp_path):
    # a member wider than the bundle's network (the full bundle's beside the small one's) loads into the config
    # that scores it alone, as the combined checkpoint loads into MeanOfNetworks
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    members = [UNet(3, 4, features=(4, 8, 16)), UNet(3, 4, features=(8, 16, 32))]
    for i, m in enumerate(members):
        torch.save(m.state_dict(), tmp_path / f"m{i}.pt")
    config = ensemble.combine([tmp_path / "m0.pt", tmp_path / "m1.pt"], tmp_path / "ensemble.pt")
    for i, m in enumerate(members):
        parser = ConfigParser({"network_def": ensemble.member_def(config["widths"][i], config["out_channels"])})
        alone = load_weights(parser.get_parsed_content("network_def"), tmp_path / f"m{i}.pt").eval()
        x = torch.rand(1, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(alone(x), m.eval()(x))
