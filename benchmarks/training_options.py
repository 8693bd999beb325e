"""Training options, each measured the same way: the bundle's weights fine-tuned for ``--epochs`` with one option
changed, the best checkpoint then scored on every source's validation tiles with the bundle's watershed (the last
epoch's where no epoch beat the starting weights, which the trainer validates as epoch 0).

    python benchmarks/training_options.py --out runs/options                   # every variant, ~17 min each on 2 cores
    python benchmarks/training_options.py --out runs/options --only control no_ignore

Variants (``VARIANTS``): ``control`` (the recipe as trained before 0.5.0), NuInsSeg's unstated pixel size at 0.125
and 0.175 um/px instead of its registry's 0.148 (a copy of the registry passed as ``sources_file``), no ignored far
background in NuInsSeg's sparsely annotated tiles (``ignore_beyond`` 0), batches drawn by tile count instead of a
third from each source (``source_mix``), the loss weighted 3x or 6x where touching nuclei meet (``contact_weight`` 2,
since 0.5.0 the recipe's own, or 5), and three times the stain jitter (``stain_jitter`` sigma 0.15, bias 0.05,
against 0.05 and 0.02), and patches of 384 px instead of 256 (``patch_384``: 4 per batch instead of 8, about the
same pixels, with the recipe's contact weight 2), for more context around large nuclei, and half of every batch
from NuInsSeg instead of a third (``nuinsseg_half``, with contact weight 2): more of its 23 organ groups, for its
held-out ones, and a Gaussian blur on 30% of the patches (``blur_0.3``, with contact weight 2): out-of-focus
tissue and softer scanners, and the cross-entropy of nucleus pixels (interior and boundary) weighted 2x
(``foreground_2``, ``class_weights`` [1, 2, 2], with contact weight 2): a missed pale nucleus costs more, and the
same with contact weight 4 (``foreground_2_contact_4``): the pale nuclei it finds parted from their neighbours, and
three times the stain jitter with the recipe's contact weight 2 (``stain_jitter_strong_cw2``), for other labs'
staining (``benchmarks/stain_shift.py`` scores it), and six times (``stain_jitter_0.3_cw2``: concentrations drawn
from 0.7x to 1.3x, the range of stain_shift.py's shifts), and some nuclei stained paler in half of the patches
(``pale_nuclei_0.5_cw2``: ``transforms.RandPaleNucleid``, with contact weight 2), the nuclei it misses, and the
same with their edges blended into the tissue around them (``pale_nuclei_soft_0.5_cw2``: ``pale_nuclei_edge`` 2 px),
as real pale nuclei's are, and in every patch (``pale_nuclei_soft_1.0_cw2``), and the resampling's scale drawn for
both axes (``scale_both_0.1_cw2``: ``scale_jitter`` [0.1, 0.1] instead of the rows only, as trained) and wider
(``scale_both_0.25_cw2``), for nuclei of other sizes and files whose stated pixel size is off
(``benchmarks/scale_error.py`` scores that), and 16 patches per batch instead of 8 (``batch_16_cw2``), and a third
of the learning rate (``lr_1e-4_cw2``: 1e-4), a gentler restart from weights that are already good, and half of
the patches centred where the starting weights err on the training tiles (``hard_examples_0.5_cw2``: the maps of
``nucleiseg_monai.hard_examples``, made once per ``--out`` in ``OUT/error_maps``), and batch norm frozen
(``freeze_bn_cw2``: the starting weights' statistics kept, ``handlers.FreezeBatchNorm``), with hard examples
(``freeze_bn_hard_examples_cw2``) and at lr 1e-3 (``freeze_bn_lr_1e-3_cw2``). Every
variant runs with ``BASE_SETTINGS`` (the recipe these options were measured against: no contact weight) and its
own settings over them. ``bundle`` is the starting weights, not fine-tuned. Every
variant starts from the same weights, seed, schedule and learning rate (but where the rate is the option), so
they differ by the option and by chance:
``control`` against ``bundle`` shows how large chance and the restart are. Resumable: a variant whose
``OUT/NAME/DONE`` exists is not trained again, a report of the same weights is not evaluated again. Writes
``OUT/training_options.json``.

The figures in ``bundles/nuclei_unet_small/docs/training_options.json`` started from 0.4.0's weights::

    git show 91e91e9:bundles/nuclei_unet_small/models/model.pt > runs/model_040.pt
    python benchmarks/training_options.py --out runs/options --pretrained runs/model_040.pt
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("cryonuseg", "monuseg2018_train", "nuinsseg")
LEARNING_RATE = 3e-4
BASE_SETTINGS = ["--contact_weight", "0"]  # what the options were measured against; a variant's settings come after
KEYS = ("aji", "pq", "recall", "f1", "missed", "merged")


def tile_mix(datalist: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in datalist["training"]:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    return counts


VARIANTS = {
    "control": {},
    "nuinsseg_mpp_0.125": {"nuinsseg_mpp": 0.125},
    "nuinsseg_mpp_0.175": {"nuinsseg_mpp": 0.175},
    "no_ignore": {"settings": ["--ignore_beyond", "0"]},
    "mix_by_tiles": {"mix": "tiles"},
    "contact_weight_2": {"settings": ["--contact_weight", "2"]},
    "contact_weight_5": {"settings": ["--contact_weight", "5"]},
    "stain_jitter_strong": {"settings": ["--stain_jitter", "[0.15, 0.05]"]},
    "patch_384": {"settings": ["--contact_weight", "2", "--patch_size", "[384, 384]", "--batch_size", "4"]},
    "nuinsseg_half": {"settings": ["--contact_weight", "2", "--source_mix",
                                   repr({"cryonuseg": 1, "monuseg2018_train": 1, "nuinsseg": 2})]},
    "blur_0.3": {"settings": ["--contact_weight", "2", "--blur", "0.3"]},
    "foreground_2": {"settings": ["--contact_weight", "2", "--class_weights", "[1, 2, 2]"]},
    "foreground_2_contact_4": {"settings": ["--contact_weight", "4", "--class_weights", "[1, 2, 2]"]},
    "stain_jitter_strong_cw2": {"settings": ["--contact_weight", "2", "--stain_jitter", "[0.15, 0.05]"]},
    "stain_jitter_0.3_cw2": {"settings": ["--contact_weight", "2", "--stain_jitter", "[0.3, 0.05]"]},
    "pale_nuclei_0.5_cw2": {"settings": ["--contact_weight", "2", "--pale_nuclei", "0.5"]},
    "pale_nuclei_soft_0.5_cw2": {"settings": ["--contact_weight", "2", "--pale_nuclei", "0.5",
                                             "--pale_nuclei_edge", "2.0"]},
    "pale_nuclei_soft_1.0_cw2": {"settings": ["--contact_weight", "2", "--pale_nuclei", "1.0",
                                             "--pale_nuclei_edge", "2.0"]},
    "scale_both_0.1_cw2": {"settings": ["--contact_weight", "2", "--scale_jitter", "[0.1, 0.1]"]},
    "scale_both_0.25_cw2": {"settings": ["--contact_weight", "2", "--scale_jitter", "[0.25, 0.25]"]},
    "batch_16_cw2": {"settings": ["--contact_weight", "2", "--batch_size", "16"]},
    "lr_1e-4_cw2": {"settings": ["--contact_weight", "2"], "learning_rate": 1e-4},
    "hard_examples_0.5_cw2": {"settings": ["--contact_weight", "2", "--hard_examples", "0.5"], "error_maps": True},
    "freeze_bn_cw2": {"settings": ["--contact_weight", "2", "--freeze_batch_norm", "true"]},
    "freeze_bn_hard_examples_cw2": {"settings": ["--contact_weight", "2", "--freeze_batch_norm", "true",
                                                 "--hard_examples", "0.5"], "error_maps": True},
    "freeze_bn_lr_1e-3_cw2": {"settings": ["--contact_weight", "2", "--freeze_batch_norm", "true"],
                              "learning_rate": 1e-3},
}


def variant_args(spec: dict, run: Path, bundle: Path) -> list[str]:
    """Config settings of one variant, for training and evaluation alike (a registry copy where it needs one)."""
    args = [*BASE_SETTINGS, *spec.get("settings", [])]
    if "nuinsseg_mpp" in spec:
        registry = json.loads((REPO / "nucleiseg_monai" / "sources.json").read_text())
        registry["nuinsseg"]["mpp"] = spec["nuinsseg_mpp"]
        registry["nuinsseg"]["mpp_note"] = "a training option measured by benchmarks/training_options.py"
        (run / "sources.json").write_text(json.dumps(registry, indent=1))
        args += ["--sources_file", repr(str(run / "sources.json"))]
    if spec.get("error_maps"):
        args += ["--hard_examples_dir", repr(str(run.parent / "error_maps"))]
    if spec.get("mix") == "tiles":
        datalist = json.loads((bundle / "models" / "datalist.json").read_text())
        args += ["--source_mix", repr(tile_mix(datalist))]
    return args


def error_maps(bundle: Path, pretrained: Path, out: Path) -> Path:
    """``OUT/error_maps``: where the starting weights err on the training tiles (``nucleiseg_monai.hard_examples``),
    made from their predictions (``OUT/train_predictions``) once, again only for other starting weights."""
    from nucleiseg_monai.packaging import sha256_file

    maps, predictions, digest = out / "error_maps", out / "train_predictions", sha256_file(pretrained)
    if (maps / "DONE").exists() and (maps / "DONE").read_text().strip() == digest:
        return maps
    if not scored_with(predictions / "metrics.json", pretrained):
        nucleiseg("evaluate", "--bundle", str(bundle), "--split", "training", "--checkpoint", repr(str(pretrained)),
                  "--output_dir", repr(str(predictions)), "--rescans", "{}", log=out / "train_predictions.log")
    shutil.rmtree(maps, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "nucleiseg_monai.hard_examples", "--bundle", str(bundle),
                    "--predictions", str(predictions), "--output", str(maps)], check=True)
    (maps / "DONE").write_text(digest)
    return maps


def nucleiseg(*args: str, log: Path) -> None:
    command = [str(Path(sys.executable).with_name("nucleiseg")), *args]
    with log.open("w") as stream:
        if subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{' '.join(command)} failed; see {log}")


def train(bundle: Path, pretrained: Path, run: Path, args: list[str], epochs: int,
          learning_rate: float = LEARNING_RATE) -> None:
    models = run / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name in ("datalist.json", "channel_stats.json"):  # the bundle's split and statistics, not a new split
        if not (models / name).exists():
            shutil.copy(bundle / "models" / name, models / name)
    resume = (models / "checkpoint_last.pt").exists()
    nucleiseg("train", "--bundle", str(bundle), "--bundle_root", str(run), "--epochs", str(epochs),
              "--epoch_length", "50", "--val_interval", "4", "--learning_rate", repr(learning_rate),
              "--pretrained", str(pretrained), "--resume", str(resume).lower(), *args,
              log=run / "train.log")
    (run / "DONE").touch()


def best_epoch(log: Path) -> int | None:
    found = re.findall(r"val_aji best value: [\d.]+ at epoch: (\d+)", log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else None


def trained_weights(run: Path) -> tuple[Path, int | None, int | None]:
    """The weights a variant is scored with, their epoch and the run's best epoch: its best epoch's
    (``models/model.pt``), or, where no epoch beat the weights it started from (the trainer validates those as epoch
    0 and keeps them in model.pt), the last epoch's network out of ``models/checkpoint_last.pt`` (as
    ``models/last.pt``). The best epoch is read from the checkpoint, which a resumed run keeps, not from the log,
    which it starts afresh."""
    import torch

    saved = run / "models" / "checkpoint_last.pt"
    if not saved.exists():
        epoch = best_epoch(run / "train.log")
        return run / "models" / "model.pt", epoch, epoch
    state = torch.load(saved, map_location="cpu", weights_only=True)
    epoch = int(state["best_model"]["best_metric_epoch"])
    if epoch != 0:
        return run / "models" / "model.pt", epoch, epoch
    last = run / "models" / "last.pt"
    if not last.exists() or last.stat().st_mtime < saved.stat().st_mtime:  # a run extended since
        torch.save(state["network"], last)
    return last, int(state["trainer"]["iteration"]) // int(state["trainer"]["epoch_length"]), epoch


def scored_with(report: Path, checkpoint: Path) -> bool:
    """Whether ``report`` exists and was made with the weights ``checkpoint`` (its SHA-256, which every evaluation
    records): a report of other weights, or of a run extended since, is made again."""
    from nucleiseg_monai.packaging import sha256_file

    if not report.exists():
        return False
    made = json.loads(report.read_text()).get("made_with") or {}
    return made.get("weights_sha256") == sha256_file(checkpoint)


def summary(report: dict) -> dict:
    keys = [k for k in KEYS if k in report["sources"][SOURCES[0]]["model"]["mean"]]  # older reports lack some
    sources = {s: {k: round(report["sources"][s]["model"]["mean"][k], 4) for k in keys} for s in SOURCES}
    mean = {k: round(sum(v[k] for v in sources.values()) / len(sources), 4) for k in keys}
    others = {k: round(sum(sources[s][k] for s in SOURCES[:2]) / 2, 4) for k in keys}
    return {"sources": sources, "mean": mean, "mean_cryonuseg_monuseg": others}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(REPO / "bundles" / "nuclei_unet_small"))
    parser.add_argument("--out", required=True, help="folder for the runs, their reports and training_options.json")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="these variants only")
    parser.add_argument("--pretrained", help="weights every variant starts from (default: the bundle's models/model.pt)")
    args = parser.parse_args(argv)
    bundle, out = Path(args.bundle).resolve(), Path(args.out).resolve()
    pretrained = Path(args.pretrained).resolve() if args.pretrained else bundle / "models" / "model.pt"
    if not pretrained.is_file():
        parser.error(f"--pretrained: no such file {pretrained}")
    out.mkdir(parents=True, exist_ok=True)
    results = {"bundle": str(bundle), "epochs": args.epochs, "epoch_length": 50, "learning_rate": LEARNING_RATE,
               "pretrained": str(pretrained), "base_settings": BASE_SETTINGS, "variants": {}}
    for name in ["bundle", *(args.only or VARIANTS)]:
        run, report = out / name, out / f"val_{name}" / "metrics.json"
        run.mkdir(exist_ok=True)
        extra = [] if name == "bundle" else variant_args(VARIANTS[name], run, bundle)
        if name != "bundle" and not (run / "DONE").exists():
            if VARIANTS[name].get("error_maps"):
                error_maps(bundle, pretrained, out)
            print(f"{name}: training", flush=True)
            train(bundle, pretrained, run, extra, args.epochs, VARIANTS[name].get("learning_rate", LEARNING_RATE))
        checkpoint, epoch, best = (pretrained, None, None) if name == "bundle" else trained_weights(run)
        if not scored_with(report, checkpoint):
            nucleiseg("evaluate", "--bundle", str(bundle), "--split", "validation", "--checkpoint", repr(str(checkpoint)),
                      "--output_dir", repr(str(report.parent)), "--rescans", "{}", *extra, log=out / f"val_{name}.log")
        row = summary(json.loads(report.read_text()))
        row["best_epoch"] = best
        row["scored_epoch"] = epoch
        if "learning_rate" in VARIANTS.get(name, {}):
            row["learning_rate"] = VARIANTS[name]["learning_rate"]
        results["variants"][name] = row
        print(f"{name:22s} AJI mean {row['mean']['aji']:.3f}  " + "  ".join(
            f"{s} {row['sources'][s]['aji']:.3f}/{row['sources'][s]['recall']:.3f}" for s in SOURCES), flush=True)
    (out / "training_options.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
