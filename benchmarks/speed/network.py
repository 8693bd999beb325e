"""Network only: the bundle's network exactly as its predictor runs it (the runtime, precision and layout of
inference.json), on a batch of tiles, without reading, normalising, sliding windows or post-processing."""

from __future__ import annotations

import torch

from .bundles import Bundle
from .common import forward_rate


def network_only(bundle: Bundle, device: torch.device, x: torch.Tensor, args) -> dict:
    """Megapixels per second of the prepared network of the bundle's predictor, built for windows the shape of
    ``x`` (so a runtime that compiles for one shape compiles for this one)."""
    predictor = bundle.predictor(device, roi_size=x.shape[-1], sw_batch_size=x.shape[0])
    net = predictor.network.network
    # counted on a fresh copy: a compiled runtime holds its weights as constants, not parameters
    return {"parameters": sum(p.numel() for p in bundle.network().parameters()), "runtime": predictor.network.runtime,
            **forward_rate(net, x, args), "tile": x.shape[-1], "batch": x.shape[0], "grad_mode": "inference_mode"}
