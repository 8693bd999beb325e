"""Average the weights of checkpoints of one network (a weight-space ensemble: a fine-tuned network and the one it
started from, as in Wortsman et al.'s WiSE-FT), into one checkpoint that costs no more to run than either.

    python scripts/average_weights.py A.pt B.pt --out averaged.pt                # equal shares
    python scripts/average_weights.py A.pt B.pt --shares 0.7 0.3 --out averaged.pt

Floating-point tensors (weights and batch-norm statistics) are averaged; integer ones (batch-norm's batch counters)
are taken from the first checkpoint. The checkpoints must hold the same tensors with the same shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def average(states: list[dict], shares: list[float]) -> dict:
    if len(states) != len(shares) or len(states) < 2:
        raise ValueError(f"give two or more checkpoints and one share each, got {len(states)} and {len(shares)}")
    if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares must be >= 0 and sum to 1, got {shares}")
    first = states[0]
    for i, state in enumerate(states[1:], start=2):
        if state.keys() != first.keys():
            raise ValueError(f"checkpoint {i} holds other tensors than the first: "
                             f"{sorted(set(state) ^ set(first))[:5]} (not the same network)")
        shapes = [k for k in first if state[k].shape != first[k].shape]
        if shapes:
            raise ValueError(f"checkpoint {i} differs from the first in the shape of {shapes[:5]}")
    out = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            out[key] = sum(share * state[key].double() for share, state in zip(shares, states)).to(tensor.dtype)
        else:
            out[key] = tensor.clone()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--shares", nargs="*", type=float, help="one per checkpoint, summing to 1 (default: equal)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.checkpoints if not p.is_file()]
    if missing:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    shares = args.shares or [1.0 / len(args.checkpoints)] * len(args.checkpoints)
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in args.checkpoints]
    try:
        averaged = average(states, shares)
    except ValueError as err:
        parser.error(str(err))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save(averaged, partial)
    partial.replace(args.out)  # never a half-written checkpoint under the final name
    print(f"{args.out}: {len(averaged)} tensors, shares {', '.join(f'{s:g}' for s in shares)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
