"""scripts/average_weights.py: a weight-space average of checkpoints of one network."""

import importlib.util
from pathlib import Path

import pytest
import torch

from nucleiseg_monai.networks import UNet

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "average_weights.py"
spec = importlib.util.spec_from_file_location("average_weights", SCRIPT)
average_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(average_weights)


def states():
    torch.manual_seed(0)
    a, b = UNet(3, 4, features=(4, 8, 8, 8, 8)), UNet(3, 4, features=(4, 8, 8, 8, 8))
    b.encoders[0][1].num_batches_tracked += 7
    return a.state_dict(), b.state_dict()


def test_average_is_the_weighted_mean_of_floats_and_keeps_the_first_counters(tmp_path):
    a, b = states()
    out = average_weights.average([a, b], [0.25, 0.75])
    key = "encoders.0.0.weight"
    assert torch.allclose(out[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-7)
    assert torch.equal(out["encoders.0.1.num_batches_tracked"], a["encoders.0.1.num_batches_tracked"])
    # the same checkpoint twice is itself
    same = average_weights.average([a, a], [0.5, 0.5])
    assert all(torch.allclose(same[k].float(), a[k].float()) for k in a)
    # and it loads into the network
    UNet(3, 4, features=(4, 8, 8, 8, 8)).load_state_dict(out)


def test_refuses_other_networks_and_bad_shares(tmp_path, capsys):
    a, b = states()
    other = UNet(3, 3, features=(4, 8, 8, 8, 8)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        average_weights.average([a, other], [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        average_weights.average([a, b], [0.5, 0.6])
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save(b, pb)
    assert average_weights.main([str(pa), str(pb), "--out", str(tmp_path / "m.pt")]) == 0
    assert not (tmp_path / "m.pt.partial").exists()
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.allclose(loaded["encoders.0.0.weight"], (a["encoders.0.0.weight"] + b["encoders.0.0.weight"]) / 2)
    with pytest.raises(SystemExit):
        average_weights.main([str(pa), str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt")])
    assert "no such checkpoint" in capsys.readouterr().err
