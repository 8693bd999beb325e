"""The yardstick: the reference notebooks' U-Net (64-512 features, 3 poolings) as a plain float32 PyTorch forward
pass and training step, measured in the same run as every figure compared with it."""

from __future__ import annotations

import torch

from .common import forward_rate

NETWORK = "UNet(features=(64, 128, 256, 512), out_channels=3)"


def reference_network(device: torch.device) -> torch.nn.Module:
    """The reference notebooks' small U-Net; 3 output classes here (the 1-class head costs nothing measurable)."""
    from nucleiseg_monai.networks import REFERENCE_SMALL, UNet

    torch.manual_seed(0)
    return UNet(features=REFERENCE_SMALL, out_channels=3).to(device).eval()


def forward(device: torch.device, x: torch.Tensor, args) -> dict:
    """Megapixels per second of the reference forward pass: float32, contiguous, no autocast, ``no_grad``."""
    net = reference_network(device)
    return {"network": NETWORK, "precision": "float32", "channels_last": False, "autocast": False,
            "grad_mode": "no_grad", "tile": x.shape[-1], "batch": x.shape[0],
            "parameters": sum(p.numel() for p in net.parameters()), **forward_rate(net, x, args, "no_grad")}


def train(device: torch.device, batch: int, patch: int, stats, args) -> dict:
    """Images per second of a plain float32 training loop of the reference network (DiceCE, AdamW)."""
    from monai.losses import DiceCELoss

    from .training import plain_training, training_batch

    net = reference_network(device)
    x, y = training_batch(batch, patch, stats, args.seed)
    return {"network": NETWORK, "precision": "float32", "loss": "DiceCELoss", "optimizer": "AdamW", "patch": patch,
            **plain_training(net, DiceCELoss(to_onehot_y=True, softmax=True),
                             torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4),
                             x.to(device), y.to(device), args.train_warmup, args.train_steps)}
