"""scripts/recalibrate_bn.py: batch-norm statistics become the plain mean and variance of the activations over the
given batches; no weight changes."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import recalibrate_bn  # noqa: E402


def test_statistics_are_those_of_the_batches_and_weights_stay():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    network[1].running_mean.fill_(5.0)  # as an average of two networks might leave them
    network[1].running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in network.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(2, 3, 8, 8) * 3 + 1 for _ in range(4)]
    with torch.no_grad():
        recalibrate_bn.recalibrate(network, iter(batches))
        activations = torch.cat([network[0](b) for b in batches])  # equal batch sizes: the mean of batch means
    assert not network.training
    torch.testing.assert_close(network[1].running_mean, activations.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    per_batch_var = torch.stack([network[0](b).var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(network[1].running_var, per_batch_var.detach(), rtol=1e-4, atol=1e-4)
    for key, value in weights.items():
        assert torch.equal(network.state_dict()[key], value), key


BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "nuclei_unet_small"


@pytest.mark.skipif(not (SHARED / "nuinsseg").is_dir(), reason="shared datasets absent")
@pytest.mark.parametrize("augment", [True, False])
def test_patches_are_the_bundles_training_patches_normalised_with_the_given_statistics(augment):
    """The patches come through the bundle's own train section: its patch size, and the statistics passed in (those
    beside the weights), not the bundle's."""
    def first_batch(mean):
        stats = {"mean": [mean] * 3, "std": [1.0] * 3}
        # loaded in this process: a loading process forked from one running OpenVINO's threads (other tests') crashed
        return next(recalibrate_bn.training_patches(BUNDLE, stats, 1, 2, None, seed=0, augment=augment,
                                                    num_workers=0))

    plain, shifted = first_batch(0.0), first_batch(100.0)
    assert plain.shape == (2, 3, 256, 256)
    torch.testing.assert_close(plain - shifted, torch.full_like(plain, 100.0), rtol=0, atol=1e-3)
