"""The U-Net of the reference notebooks, made configurable, its weights, and a wrapper for mixed-precision forwards
(``runtimes`` makes a copy fast for inference).

The reference had two networks: "small" (3 poolings, 64-128-256-512 features) and "full" (Ronneberger's 4
poolings, 64-1024 features). Both are ``UNet(features=...)``: the number of poolings is
``len(features) - 1``. Bundles pick narrower widths where measurement showed the speed was worth more than the
capacity (see each bundle's docs/README.md).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

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
        self.out_channels = int(out_channels)
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


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU that supports it, or a CPU where oneDNN has a
    bf16 path (AVX-512 and newer). Elsewhere (an AVX2-only CPU) bf16 is emulated and many times slower than
    float32, the opposite of what it is for."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


_reported_precision: set[str] = set()


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype | None:
    """An autocast dtype for ``device``: "auto" is bfloat16 where ``native_bf16``, else None (float32, and one log
    line per device type saying so); names ("bfloat16", "float32") become torch dtypes; float32 becomes None."""
    if dtype == "auto":
        device = torch.device(device)
        if native_bf16(device):
            return torch.bfloat16
        if device.type not in _reported_precision:
            _reported_precision.add(device.type)
            why = "oneDNN has no bf16 path without AVX-512" if device.type == "cpu" else "not supported here"
            logger.info("bf16 is not native on this %s (%s), so the network runs in float32 (amp_dtype 'auto'); "
                        "'bfloat16' forces it", device.type.upper(), why)
        return None
    named = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype  # an unknown name stays a string
    if named not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {dtype!r}")
    return None if named == torch.float32 else named


class ZScored(nn.Module):
    """``network`` on RGB input of the 0-255 scale, z-scored inside with the channel statistics it learnt with: what
    the bundles export, so that a TorchScript taken elsewhere needs no ``channel_stats.json`` beside it. Its weights
    are the network's (``state_dict`` and ``load_state_dict`` pass through), so a model.pt loads into it as is."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network((x - self.mean) / self.std)

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


class MixedPrecision(nn.Module):
    """Runs a network under autocast on whatever device its input lives, in channels-last memory layout.

    MONAI's engines only autocast on CUDA; on CPUs with a native bf16 path, bf16 autocast halves the U-Net's forward
    time and channels-last halves it again. ``dtype`` "auto" (the bundles' ``amp_dtype``) takes bf16 only where it
    is native (``native_bf16``), decided for each device the input arrives on. Outputs come back as float32 so
    losses and post-processing are unaffected. The wrapped module's state dict is the plain network's (checkpoints
    stay loadable without this wrapper).
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype | str | None = "auto", channels_last: bool = True):
        super().__init__()
        self.network = network
        self.requested = dtype
        if dtype != "auto":
            resolve_dtype(dtype, "cpu")  # an unknown name fails here, not mid-run
        self.channels_last = channels_last
        self._dtypes: dict[str, torch.dtype | None] = {}
        if channels_last:
            self.network.to(memory_format=torch.channels_last)

    def dtype_for(self, device: torch.device) -> torch.dtype | None:
        key = str(device)
        if key not in self._dtypes:
            self._dtypes[key] = resolve_dtype(self.requested, device)
        return self._dtypes[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.dtype_for(x.device)
        if dtype is None:
            return self.network(x).float()
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            return self.network(x).float()

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def weights_sha256(network: nn.Module) -> str:
    """SHA-256 over a network's state dict (names, dtypes, shapes, values): names the weights that made outputs,
    however they were loaded."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{values.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def unet_layout(state: Mapping[str, torch.Tensor], source: str = "these weights") -> dict:
    """``in_channels``, ``out_channels`` and ``features`` of the ``UNet`` a state dict belongs to, read from the
    weights' shapes. Transpose upsampling only (the bundles' kind; interpolating variants leave no trace of their
    mode in the weights)."""
    depth = sum(1 for key in state if key.startswith("encoders.") and key.endswith(".0.weight"))
    if depth == 0 or "head.weight" not in state or "decoders.0.up.weight" not in state:
        raise ValueError(f"{source} does not hold the weights of a UNet of this package with transpose upsampling")
    features = [state[f"encoders.{i}.0.weight"].shape[0] for i in range(depth)] + [state["bottleneck.0.weight"].shape[0]]
    return {"in_channels": state["encoders.0.0.weight"].shape[1], "out_channels": state["head.weight"].shape[0],
            "features": features}


def unet_from_checkpoint(path, map_location: str | torch.device = "cpu") -> UNet:
    """The ``UNet`` a checkpoint was saved from (``unet_layout``), with the weights loaded: a teacher or another
    bundle's network without its config."""
    state = _state_dict(path, map_location)
    network = UNet(**unet_layout(state, str(path)))
    network.load_state_dict(state)
    return network


def load_weights(network: nn.Module, path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Loads a bundle checkpoint (a plain state dict, or one held under "network", "model", "state_dict" or "net").

    ``weights_only=True``: a checkpoint is data, never code, even when the bundle came from someone else.
    """
    network.load_state_dict(_state_dict(path, map_location))
    return network


def require_weights(path) -> None:
    """FileNotFoundError naming the bundle's ways to get weights, where ``path`` is no file."""
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        return
    bundle = path.parent.parent
    if path.parent.name == "models":  # where a bundle keeps its weights: one not trained yet
        raise FileNotFoundError(
            f"no trained weights at {path}; train the bundle first (nucleiseg train --bundle {bundle}), "
            f"unpack a packed copy of it (nucleiseg unpack) or pass --checkpoint PATH"
        )
    # weights named by hand (--checkpoint): the path is what is wrong, not the bundle
    raise FileNotFoundError(f"no weights file at {path}: check the path given as the checkpoint (--checkpoint), or "
                            "leave it out to use the bundle's own models/model.pt")


def _state_dict(path, map_location) -> dict:
    require_weights(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises weights_only=False, which would run whatever the file carries
        raise pickle.UnpicklingError(
            f"{path} holds pickled objects besides tensors, so it is refused unread: weights are data, and objects "
            "in a checkpoint can run code when loaded. Do not load it with weights_only=False unless you made it "
            f"yourself; save the network's state_dict alone instead ({type(err).__name__}: "
            f"{str(err).splitlines()[0]})") from None

    for key in ("network", "model", "state_dict", "net"):  # training checkpoints and other tools' files
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return state
