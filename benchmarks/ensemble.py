"""What independently trained networks are worth together: the mean of their outputs (logits), scored on every
source's validation tiles by ``nucleiseg evaluate`` with the bundle's watershed, beside each network alone.

An ensemble costs its members' time at inference, so it is not shipped; it bounds what combining them could give
(distilling an ensemble into one network of the bundle's width gives back part of its gain, never more). Where the
ensemble scores as its best member, the networks make the same errors and more runs of the recipe will not
close the gap.

    python benchmarks/ensemble.py A.pt B.pt --out runs/ensemble      # the members' widths are read from their weights

Writes ``OUT/ensemble.json`` (each member's and the ensemble's validation figures, as
``benchmarks/training_options.py`` summarises them) and keeps each report under ``OUT/val_*``; a report already
written is not evaluated again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from nucleiseg_monai.networks import UNet, unet_from_checkpoint, unet_layout

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from training_options import SOURCES, summary  # noqa: E402


class MeanOfNetworks(nn.Module):
    """The mean of its members' outputs. Built by the evaluation config from ``widths`` (one list of features per
    member), its weights loaded from ``combine``'s checkpoint as any bundle network's are."""

    def __init__(self, widths: list[list[int]], out_channels: int = 4):
        super().__init__()
        self.members = nn.ModuleList(UNet(3, out_channels, features=w) for w in widths)
        self.out_channels = out_channels
        self.multiple = max(m.multiple for m in self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def combine(checkpoints: list[Path], out: Path) -> dict:
    """One checkpoint holding every member's weights under ``members.i.``; returns the network's config."""
    networks = [unet_from_checkpoint(c) for c in checkpoints]
    if len({n.out_channels for n in networks}) != 1:
        raise SystemExit("the members must have the same outputs: " + ", ".join(
            f"{c} has {n.out_channels}" for c, n in zip(checkpoints, networks)))
    state = {f"members.{i}.{k}": v for i, n in enumerate(networks) for k, v in n.state_dict().items()}
    torch.save(state, out)
    widths = [unet_layout(n.state_dict())["features"] for n in networks]
    return {"_target_": "ensemble.MeanOfNetworks", "widths": widths, "out_channels": networks[0].out_channels}


def member_def(widths: list[int], out_channels: int) -> dict:
    """One member's network for the bundle's evaluation config: its own widths, so that a member of another width
    than the bundle's (the full bundle's network beside the small one's) is scored alone too."""
    return {"_target_": "nucleiseg_monai.networks.UNet", "in_channels": 3, "out_channels": out_channels,
            "features": list(widths)}


def evaluate(bundle: Path, checkpoint: Path, report: Path, network_def: dict | None = None) -> dict:
    if not (report / "metrics.json").exists():
        command = [str(Path(sys.executable).with_name("nucleiseg")), "evaluate", "--bundle", str(bundle),
                   "--split", "validation", "--checkpoint", repr(str(checkpoint)), "--output_dir", repr(str(report)),
                   "--rescans", "{}"]
        if network_def:
            command += ["--network_def", repr(network_def)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
        log = report.with_suffix(".log")
        with log.open("w") as stream:
            if subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode:
                raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return summary(json.loads((report / "metrics.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="two or more checkpoints of this package's UNet")
    parser.add_argument("--bundle", type=Path, default=REPO / "bundles" / "nuclei_unet_small")
    parser.add_argument("--out", type=Path, required=True, help="folder for the combined weights and the reports")
    args = parser.parse_args(argv)
    if len(args.checkpoints) < 2:
        parser.error("an ensemble needs two or more checkpoints")
    for c in args.checkpoints:
        if not c.is_file():
            parser.error(f"no such checkpoint: {c}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    network_def = combine([c.resolve() for c in args.checkpoints], out / "ensemble.pt")
    rows = {}
    for i, c in enumerate(args.checkpoints):
        rows[f"member {i}: {c}"] = evaluate(args.bundle.resolve(), c.resolve(), out / f"val_member{i}",
                                            member_def(network_def["widths"][i], network_def["out_channels"]))
    rows["ensemble (mean of outputs)"] = evaluate(args.bundle.resolve(), out / "ensemble.pt", out / "val_ensemble",
                                                  network_def)
    for name, row in rows.items():
        print(f"{name:40s} AJI mean {row['mean']['aji']:.3f}  " + "  ".join(
            f"{s} {row['sources'][s]['aji']:.3f}/{row['sources'][s]['recall']:.3f}" for s in SOURCES), flush=True)
    (out / "ensemble.json").write_text(json.dumps({"bundle": str(args.bundle), "variants": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
