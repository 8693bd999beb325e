"""The U-Net of the reference notebooks, made configurable, and a wrapper for fast mixed-precision forwards.

The reference had two networks: "small" (3 poolings, 64-128-256-512 features, 7.8M parameters) and "full"
(Ronneberger's 4 poolings, 64-1024 features, 31.4M). Both are ``UNet(features=...)``: the number of poolings is
``len(features) - 1``. Bundles pick narrower widths where measurement showed the speed was worth more than the
capacity (see each bundle's docs/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

REFERENCE_SMALL = (64, 128, 256, 512)
REFERENCE_FULL = (64, 128, 256, 512, 1024)


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by batch norm and ReLU (Ronneberger's block, plus BN)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class Up(nn.Module):
    """Upsample the deeper features, concatenate the skip connection, then a double convolution."""

    def __init__(self, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        if mode == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        elif mode in ("bilinear", "nearest"):
            # interpolation has no weights; a 1x1 conv brings the channels down to match the transpose variant
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode=mode, **({"align_corners": False} if mode == "bilinear" else {})),
                nn.Conv2d(in_channels, out_channels, 1),
            )
        else:
            raise ValueError(f"upsample must be 'transpose', 'bilinear' or 'nearest', got {mode!r}")
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """A 2-D U-Net whose depth, widths, upsampling and outputs are constructor arguments.

    Args:
        in_channels: image channels (3 for RGB).
        out_channels: output channels; 3 for the background / interior / boundary classes used here.
        features: feature count at each resolution, shallowest first; ``len(features) - 1`` poolings.
        upsample: "transpose" (learned, as Ronneberger), "bilinear" or "nearest".
        dropout: dropout after the bottleneck block.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        features: Sequence[int] = REFERENCE_SMALL,
        upsample: str = "transpose",
        dropout: float = 0.0,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError(f"features needs at least two levels (one pooling), got {features}")
        self.depth = len(features) - 1
        self.multiple = 2**self.depth  # an int attribute: TorchScript's int ** int is a float
        self.encoders = nn.ModuleList([DoubleConv(in_channels, features[0])])
        self.encoders.extend(DoubleConv(a, b) for a, b in zip(features[:-2], features[1:-1]))
        self.bottleneck = DoubleConv(features[-2], features[-1], dropout=dropout)
        self.pool = nn.MaxPool2d(2)
        self.decoders = nn.ModuleList(
            Up(deep, shallow, upsample) for deep, shallow in zip(features[:0:-1], features[-2::-1])
        )
        self.head = nn.Conv2d(features[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = self.multiple
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"UNet with {self.depth} poolings needs height and width divisible by {multiple}, got "
                f"{x.shape[-2]}x{x.shape[-1]}; pad the input (SlidingWindowInferer and the inference pipeline do this)"
            )
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i, decoder in enumerate(self.decoders):
            x = decoder(x, skips[-1 - i])
        return self.head(x)


class MixedPrecision(nn.Module):
    """Runs a network under autocast on whatever device its input lives, in channels-last memory layout.

    MONAI's engines only autocast on CUDA; on these CPUs bf16 autocast halves the U-Net's forward time and
    channels-last halves it again. Outputs come back as float32 so losses and post-processing are unaffected.
    The wrapped module's state dict is the plain network's (checkpoints stay loadable without this wrapper).
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype | str | None = torch.bfloat16, channels_last: bool = True):
        super().__init__()
        self.network = network
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.channels_last = channels_last
        if channels_last:
            self.network.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None or self.dtype == torch.float32:
            return self.network(x).float()
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.network(x).float()

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def load_weights(network: nn.Module, path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Loads a bundle checkpoint (a plain state dict, or one held under "network", "model", "state_dict" or "net").

    ``weights_only=True``: a checkpoint is data, never code, even when the bundle came from someone else.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights at {path}; train the bundle first (python -m monai.bundle run training "
            f"--config_file {path.parent.parent / 'configs' / 'train.json'}) or pass --checkpoint PATH"
        )
    state = torch.load(path, map_location=map_location, weights_only=True)
    for key in ("network", "model", "state_dict", "net"):  # training checkpoints and other tools' files
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    network.load_state_dict(state)
    return network
