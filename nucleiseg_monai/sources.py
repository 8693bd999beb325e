"""Training sources, each described once: where it lives, its layout, pixel size, organs, split, license.

The registry is a JSON file (``sources.json`` beside this module by default; a bundle config may name another)
mapping a source name to::

    root            folder under the data root (or an absolute path)
    layout          "kaggle" (``tissue images/`` + ``label masks modify/``, CryoNuSeg and NuInsSeg's official
                    release) or "generic" (``images/`` + ``labels/``)
    mpp             microns per pixel: a number, "file" (read from each image's TIFF tags) or "unknown" (or null:
                    tiles used as read, taken to be at the model's working pixel size)
    organs          how a tile's organ is known: "name" (``Human_<Organ>_<NN>``), "tcga" (the tissue source
                    site code of a TCGA barcode) or a CSV file in the root (``stem,organ,...``)
    split           "organ_stratified" (fractions, per organ), "per_organ" (n validation tiles per organ, no test)
                    or "groups" (whole organ groups held out for validation and test: their tiles share a slide)
    sparse_labels   true where unannotated nuclei may sit in the background (training ignores far background)
    license, commercial_use, citation: what travels with weights trained on it

One combined datalist holds every source's split; each record names its source, organ and pixel size.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import tifffile

from .atomic import sha256_file, write_json_atomic
from .data import (
    LABEL_SUFFIXES,
    DataError,
    Sample,
    _files_by_stem,
    _stable_rank,
    channel_stats,
    check_sample,
    check_sizes,
    discover,
    is_binary_mask,
    split,
    warn_binary_labels,
)

logger = logging.getLogger(__name__)

REGISTRY = Path(__file__).with_name("sources.json")
DATA_ROOT_ENV = "NUCLEISEG_DATA"
GENERIC_IMAGES, GENERIC_LABELS = "images", "labels"
PARTS = ("training", "validation", "test")
REQUIRED_KEYS = ("root", "layout", "mpp", "organs", "split")
OPTIONAL_KEYS = ("sparse_labels", "license", "commercial_use", "citation", "mpp_note")
LAYOUTS = ("kaggle", "generic")
SPLIT_KEYS = {"organ_stratified": ("val_fraction", "test_fraction", "seed"),
              "per_organ": ("validation_per_organ", "seed"), "groups": ("validation", "test")}
UNKNOWN_MPP = "unknown"

# TCGA tissue source sites of the MoNuSeg 2018 training tiles -> organ. MoNuSeg's release calls the LUSC/LUAD
# tiles (sites 18, 21, 38, 49, 50) "liver"; their TCGA projects are lung, so they are named lung here.
TCGA_SITES = {
    "18": "lung", "21": "lung", "38": "lung", "49": "lung", "50": "lung",
    "A7": "breast", "AR": "breast", "E2": "breast", "AN": "breast",
    "B0": "kidney", "HE": "kidney",
    "CH": "prostate", "G9": "prostate",
    "DK": "bladder", "G2": "bladder",
    "AY": "colon", "NH": "colon",
    "KB": "stomach", "RD": "stomach",
}


@dataclass(frozen=True)
class Source:
    name: str
    root: str
    layout: str
    mpp: float | str
    organs: str
    split: dict
    sparse_labels: bool = False
    license: str = ""
    commercial_use: bool | None = None  # None: unknown, as when no license is stated
    citation: str = ""
    mpp_note: str = ""

    def folder(self, data_root: str | os.PathLike) -> Path:
        return Path(data_root).expanduser() / self.root


def load_sources(registry: str | os.PathLike | None = None, names: list[str] | None = None) -> dict[str, Source]:
    """The sources of a registry file (all, or those in ``names``, in that order)."""
    path = Path(registry) if registry else REGISTRY
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the source registry {path} ({err}); fix the JSON or name another file") from err
    if not isinstance(entries, dict):
        raise DataError(f"{path} must hold a JSON object of source name -> settings, not {type(entries).__name__}")
    names = list(entries) if names is None else list(names)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise DataError(f"source(s) {unknown} are not in {path}; it lists {list(entries)}")
    return {name: source_from_entry(name, entries[name], path) for name in names}


def _unknown_key(key: str, known: tuple[str, ...], where: str) -> DataError:
    near = difflib.get_close_matches(key, known, n=1)
    return DataError(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                     + f"; the keys are {', '.join(known)}")


def source_from_entry(name: str, entry, path: Path) -> Source:
    """One registry entry, checked as it is loaded: a misspelt key would otherwise be ignored without a word
    (``licence``, ``validation_per_organs``) and a missing or mistyped value fail far away, without its name."""
    where = f"source {name!r} in {path}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} must be a JSON object of settings ({', '.join(REQUIRED_KEYS)}, ...)")
    for key in entry:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            raise _unknown_key(key, REQUIRED_KEYS + OPTIONAL_KEYS, where)
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise DataError(f"{where} lacks {', '.join(map(repr, missing))}; every source needs "
                        f"{', '.join(REQUIRED_KEYS)}")
    if entry["layout"] not in LAYOUTS:
        raise DataError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, not {entry['layout']!r}")
    for key in ("root", "organs", "license", "citation", "mpp_note"):
        if key in entry and not isinstance(entry[key], str):
            raise DataError(f"{where}: {key} must be a string, not {entry[key]!r}")
    for key in ("sparse_labels", "commercial_use"):
        if key in entry and not isinstance(entry[key], bool):
            raise DataError(f"{where}: {key} must be true or false (no quotes), not {entry[key]!r}")
    _check_split(entry["split"], where)
    commercial = entry.get("commercial_use", _commercial_use(entry.get("license", "")))
    return Source(name=name, **{**entry, "mpp": _mpp(entry["mpp"], where), "commercial_use": commercial})


def _commercial_use(license_: str) -> bool | None:
    """Whether a license allows commercial use, where the entry does not say: not for a Creative Commons NC
    license, unknown where no license is stated (weights would otherwise be marked free to sell)."""
    if not license_.strip():
        return None
    return not re.search(r"(^|[-\s])NC([-\s]|$)|non-?commercial", license_, re.IGNORECASE)


def _check_split(spec, where: str) -> None:
    if not isinstance(spec, dict) or spec.get("kind") not in SPLIT_KEYS:
        raise DataError(f"{where}: split must be an object whose kind is one of {', '.join(SPLIT_KEYS)}, not {spec!r}")
    known = ("kind",) + SPLIT_KEYS[spec["kind"]]
    for key in spec:
        if key not in known:
            raise _unknown_key(key, known, f"{where}, split kind {spec['kind']!r}")


def _mpp(value, where: str) -> float | str:
    """A number, "file" or "unknown" (null too: an unstated pixel size is unknown, not an error)."""
    if value is None:
        return UNKNOWN_MPP
    if isinstance(value, str) and value.strip().lower() in ("file", UNKNOWN_MPP):
        return value.strip().lower()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        from .wsi import MPP_HINT, PLAUSIBLE_MPP, doubtful_mpp

        if not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:  # 40 would resample every tile x160
            raise DataError(f"{where}: mpp {value!r} is outside the plausible pixel sizes {PLAUSIBLE_MPP[0]:g}-"
                            f"{PLAUSIBLE_MPP[1]:g} um/px; {MPP_HINT}")
        # plausible but unlike a scan: 4 (px/um typed for 0.25 um/px) resamples every tile x16, in hours and memory
        if (doubt := doubtful_mpp(value, None)) and (where, value) not in _doubted:
            _doubted.add((where, value))
            logger.warning("%s: mpp %g is %s; %s", where, value, doubt, MPP_HINT)
        return float(value)
    raise DataError(
        f"{where}: mpp {value!r} is no pixel size; give microns per pixel as a number (0.25 for a 40x scan), "
        "\"file\" to read it from each TIFF's resolution tags, or \"unknown\" (or null) to use the tiles as read, "
        "taken to be at the model's working pixel size"
    )


_doubted: set[tuple[str, float]] = set()  # registry pixel sizes already warned about (a registry is read often)


def default_data_root(bundle_root: str | os.PathLike) -> str:
    """``$NUCLEISEG_DATA``, else ``shared/datasets`` beside the checkout that holds the bundle (or this package)."""
    if os.environ.get(DATA_ROOT_ENV):
        return os.environ[DATA_ROOT_ENV]
    # bundles/<name> in a checkout, then the checkout this package was installed from (editable installs)
    candidates = [p.parents[2] for p in (Path(bundle_root).resolve(), Path(__file__).resolve()) if len(p.parents) > 2]
    for checkout_parent in candidates:
        if (checkout_parent / "shared" / "datasets").is_dir():
            return str(checkout_parent / "shared" / "datasets")
    return str(Path(bundle_root).resolve().parent / "shared" / "datasets")


def _discover_generic(root: Path) -> list[tuple[str, Path, Path]]:
    images = _files_by_stem(root / GENERIC_IMAGES)
    labels = _files_by_stem(root / GENERIC_LABELS)
    if not images:
        raise DataError(f"{root / GENERIC_IMAGES} holds no images; a 'generic' source needs images/ and labels/")
    missing = sorted(set(images) - set(labels))
    unmatched = sorted(set(labels) - set(images))
    if missing:
        others = (f"; it holds label(s) matching no image, e.g. {', '.join(labels[n].name for n in unmatched[:3])}"
                  if unmatched else "")
        raise DataError(f"no label in {root / GENERIC_LABELS} for {len(missing)} image(s): "
                        f"{', '.join(str(images[n]) for n in missing)}{others}; a label's file name must be its "
                        "image's stem with a lossless suffix (" + ", ".join(LABEL_SUFFIXES) + ")")
    if unmatched:  # left out of the datalist, but said: a misnamed tile would otherwise vanish
        logger.warning("%d label(s) in %s have no image in %s and are left out: %s", len(unmatched),
                       root / GENERIC_LABELS, root / GENERIC_IMAGES, ", ".join(labels[n].name for n in unmatched))
    return [(n, images[n], labels[n]) for n in sorted(images)]


def _generic_label_kind(label: Path) -> str:
    """'binary' for a mask of 0 and one other value (its connected components become the nuclei), else
    'instance': a generic source's labels folder may hold either."""
    return "binary" if is_binary_mask(label) else "instance"


def _warn_binary(source: Source, folder: Path, samples: list[Sample]) -> None:
    binary = [s.label.name for s in samples if s.label_kind == "binary"]
    if binary:
        shown = ", ".join(binary[:3]) + (", ..." if len(binary) > 3 else "")
        warn_binary_labels(f"source {source.name!r}: {len(binary)} of {len(samples)} label maps in "
                           f"{folder / GENERIC_LABELS} hold only 0 and one other value ({shown})")


def _organ_rule(source: Source, folder: Path):
    if source.organs == "name":
        from .data import organ_of

        return organ_of
    if source.organs == "tcga":
        def tcga(stem: str) -> str:
            parts = stem.split("-")
            if len(parts) < 2 or parts[1] not in TCGA_SITES:
                raise DataError(f"{stem}: unknown TCGA tissue source site; add it to TCGA_SITES in {__file__}")
            return TCGA_SITES[parts[1]]
        return tcga
    table = folder / source.organs
    try:
        with open(table, newline="", encoding="utf-8") as f:
            rows = {r["stem"]: r.get("organ") or r["organ_group"] for r in csv.DictReader(f)}
    except (OSError, KeyError) as err:
        raise DataError(f"cannot read organs from {table} ({err}); it needs 'stem' and 'organ' (or 'organ_group') columns") from err

    def from_table(stem: str) -> str:
        if stem not in rows:
            raise DataError(f"{stem} is not listed in {table}; add its organ group there")
        return rows[stem]
    return from_table


def tile_mpp(source: Source, image: Path) -> float | None:
    """The tile's microns per pixel: the source's number, the TIFF tags' ("file"), or None ("unknown")."""
    if source.mpp == UNKNOWN_MPP:
        return None
    if source.mpp != "file":
        return float(source.mpp)
    from .wsi import TIFF_SUFFIXES, _tiff_mpp

    fix = f"give source {source.name!r} its mpp as a number in the sources file, or \"unknown\""
    if image.suffix.lower() not in TIFF_SUFFIXES:
        raise DataError(f"{image}: source {source.name!r} has mpp 'file', but only TIFF files state a pixel size "
                        f"(resolution tags), not {image.suffix} files; {fix}")
    try:
        with tifffile.TiffFile(image) as tif:
            mpp = _tiff_mpp(tif, image)
    except tifffile.TiffFileError as err:
        raise DataError(f"{image}: cannot read its pixel size ({err}), which source {source.name!r} takes from "
                        f"the file (mpp 'file'); replace the file or {fix}") from err
    if mpp is None:
        raise DataError(f"{image} states no pixel size, but source {source.name!r} says 'file'; give its mpp")
    return round(mpp, 4)


@dataclass(frozen=True)
class SourceSample:
    sample: Sample
    source: str
    mpp: float | None
    sparse: bool

    def record(self, root: Path) -> dict:
        return {**self.sample.record(root), "source": self.source, "mpp": self.mpp, "sparse": self.sparse}


def missing_folder(name: str, folder: Path, root: str) -> DataError:
    return DataError(
        f"source {name!r}: folder {folder} does not exist; set {DATA_ROOT_ENV} (or --data_root) to the "
        f"folder that holds {root}/, or fix 'root' in the source registry"
    )


def discover_source(source: Source, data_root: str | os.PathLike) -> list[SourceSample]:
    folder = source.folder(data_root)
    if not folder.is_dir():
        raise missing_folder(source.name, folder, source.root)
    if source.layout == "kaggle":
        samples = discover(folder)
    elif source.layout == "generic":
        organ = _organ_rule(source, folder)
        samples = [Sample(n, organ(n), img, lab, _generic_label_kind(lab)) for n, img, lab in _discover_generic(folder)]
        _warn_binary(source, folder, samples)
    else:
        raise DataError(f"source {source.name!r}: layout must be 'kaggle' or 'generic', not {source.layout!r}")
    if source.layout == "kaggle" and source.organs != "name":
        organ = _organ_rule(source, folder)
        samples = [Sample(s.name, organ(s.name), s.image, s.label, s.label_kind) for s in samples]
    return [SourceSample(s, source.name, tile_mpp(source, s.image), source.sparse_labels) for s in samples]


def split_source(source: Source, samples: list[SourceSample]) -> dict[str, list[SourceSample]]:
    spec = dict(source.split)
    kind = spec.pop("kind")
    by_name = {s.sample.name: s for s in samples}
    if kind == "organ_stratified":
        parts = split([s.sample for s in samples], **spec)
        return {k: [by_name[s.name] for s in v] for k, v in parts.items()}
    parts: dict[str, list[SourceSample]] = {"training": [], "validation": [], "test": []}
    if kind == "per_organ":
        by_organ: dict[str, list[SourceSample]] = defaultdict(list)
        for s in sorted(samples, key=lambda s: _stable_rank(s.sample.name, spec.get("seed", 0))):
            by_organ[s.sample.organ].append(s)
        for group in by_organ.values():
            n_val = min(int(spec.get("validation_per_organ", 1)), len(group) - 1)
            parts["validation"] += group[:n_val]
            parts["training"] += group[n_val:]
    elif kind == "groups":
        held = {g: part for part in ("validation", "test") for g in spec.get(part, [])}
        organs = {s.sample.organ for s in samples}
        missing = sorted(set(held) - organs)
        if missing:
            raise DataError(f"source {source.name!r}: held-out organ group(s) {missing} have no tiles")
        for s in samples:
            parts[held.get(s.sample.organ, "training")].append(s)
    else:
        raise DataError(f"source {source.name!r}: split kind must be organ_stratified, per_organ or groups, not {kind!r}")
    return {k: sorted(v, key=lambda s: s.sample.name) for k, v in parts.items()}


def make_datalist(sources: dict[str, Source], data_root: str | os.PathLike, check: bool = True,
                  require_validation: bool = True) -> dict:
    """One datalist over all sources: training / validation / test records (paths relative to each source's
    folder) with each source's split specification, plus the training tiles' channel statistics.

    A split without validation tiles is refused here, before any training: training selects ``model.pt`` on
    validation, so without it a run would end "successfully" with no model (``require_validation`` False: a
    datalist for other uses than training)."""
    datalist: dict = {"description": "multi-source split; paths relative to each source's folder under the data root",
                      "sources": {}, "training": [], "validation": [], "test": []}
    train_images = []
    for source in sources.values():
        samples = discover_source(source, data_root)
        if check:
            _warn_empty([s.sample.label for s in samples if not check_sample(s.sample)], source)
        folder = source.folder(data_root)
        parts = split_source(source, samples)
        datalist["sources"][source.name] = {"root": source.root, "split": source.split}
        for part, items in parts.items():
            datalist[part] += [s.record(folder) for s in items]
        train_images += [s.sample.image for s in parts["training"]]
        if source.mpp == UNKNOWN_MPP:
            logger.warning("source %r states no pixel size (mpp 'unknown'): its tiles are used as read, taken to be "
                           "at the model's working pixel size; give its mpp, or estimate one with python -m "
                           "nucleiseg_monai.sources --estimate_mpp %s", source.name, source.name)
    if require_validation:
        check_parts(datalist, sources)
    warn_empty_parts(datalist, sources)
    if train_images:
        datalist["channel_stats"] = channel_stats(train_images)
    else:  # one's own tiles split for evaluation alone: weights bring the statistics they learnt with
        datalist["channel_stats"] = None
        logger.info("no training tiles in these sources' splits: the datalist can serve evaluation and tuning, "
                    "not training")
    datalist["provenance"] = provenance(datalist, sources)
    log_provenance(datalist["provenance"])
    return datalist


def provenance(datalist: dict, sources: dict[str, Source]) -> dict:
    """Each source's license, commercial use, citation and tiles per part: the datalist is written into a run's
    models/ folder, so what the weights were trained on, and under which terms, travels with them."""
    counts = part_counts(datalist)
    return {name: {"license": sources[name].license, "commercial_use": sources[name].commercial_use,
                   "citation": sources[name].citation, "tiles": counts[name]} for name in counts}


def log_provenance(facts: dict) -> None:
    for name, f in facts.items():
        tiles = ", ".join(f"{n} {p}" for p, n in f["tiles"].items())
        if f["license"]:
            terms = f"license {f['license']}" + ("" if f["commercial_use"] is not False else ", non-commercial")
        else:
            terms = "license not stated: give its license and citation in the sources file before sharing weights"
        logger.info("source %r: %s tiles; %s", name, tiles, terms)


def _warn_empty(labels: list[Path], source: Source) -> None:
    """One line per source for its all-zero label maps: a tile without nuclei can be right, but a label export
    that failed looks the same, and on a validation tile it scores every predicted nucleus as wrong."""
    if labels:
        shown = ", ".join(str(p) for p in labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
        logger.warning("source %r: %d label map(s) hold no nucleus (all zero): %s; if their tiles do show nuclei, "
                       "fix or remove these files", source.name, len(labels), shown)


def part_counts(datalist: dict) -> dict[str, dict[str, int]]:
    """Tiles per source and part: {source: {"training": n, "validation": n, "test": n}}."""
    counts = {name: dict.fromkeys(PARTS, 0) for name in datalist["sources"]}
    for part in PARTS:
        for r in datalist[part]:
            counts[r["source"]][part] += 1
    return counts


def _holds_out(split_spec: dict, part: str) -> bool:
    """Whether a source's split settings ask for tiles in ``part``: a per_organ split never has test tiles, nor a
    zero fraction or an empty group list any, by design."""
    kind = split_spec.get("kind")
    if kind == "organ_stratified":
        key, default = ("val_fraction", 0.15) if part == "validation" else ("test_fraction", 0.3)
        return float(split_spec.get(key, default)) > 0
    if kind == "per_organ":
        return part == "validation" and int(split_spec.get("validation_per_organ", 1)) > 0
    return bool(split_spec.get(part))


def _organs(datalist: dict, name: str) -> set[str]:
    """The organs of a source's tiles, over every part."""
    return {r["organ"] for part in PARTS for r in datalist[part] if r["source"] == name}


def _describe_split(name: str, source: Source, datalist: dict, counts: dict[str, int]) -> str:
    tiles, organs = sum(counts.values()), _organs(datalist, name)
    return (f"source {name!r} ({tiles} tiles of {len(organs)} organ(s), organs {source.organs!r}, "
            f"split {source.split}) gave {', '.join(f'{p} {counts[p]}' for p in PARTS)}")


def check_parts(datalist: dict, sources: dict[str, Source]) -> None:
    """Refuses a datalist whose pooled validation part is empty, naming each source's split and the fixes."""
    if datalist["validation"]:
        return
    counts = part_counts(datalist)
    described = "; ".join(_describe_split(n, sources[n], datalist, counts[n]) for n in counts if n in sources)
    own_organs = [n for n in counts if n in sources and sources[n].organs == "name"
                  and len(_organs(datalist, n)) == sum(counts[n].values())]
    hint = (f" With organs 'name', stems outside Human_<Organ>_<NN> are each their own organ ({own_organs}): "
            "list each tile's organ in a CSV (columns stem,organ) in the source's folder and set 'organs' to its "
            "file name." if own_organs else "")
    raise DataError(
        f"the datalist would hold no validation tiles, so training could select no model (it would end without "
        f"models/model.pt): {described}. organ_stratified holds out round(tiles x val_fraction) validation tiles, "
        "per_organ validation_per_organ per organ, both at most one per organ in turn and never an organ's last "
        "training tile, so validation needs organs with 2 or more tiles left after test. Fix it in the sources "
        "file: more tiles per organ, an organs file (CSV of stem,organ) that groups "
        "tiles into fewer organs, or a split that holds some out (organ_stratified with a smaller test_fraction "
        "or larger val_fraction, per_organ, or groups naming validation groups)." + hint
    )


def warn_empty_parts(datalist: dict, sources: dict[str, Source]) -> None:
    """One line per source whose validation or test part is empty while other sources' are not (and its split
    settings asked for some): its tiles then take no part in model selection, or in the test report."""
    counts = part_counts(datalist)
    consequence = {"validation": "model selection sees none of its tiles",
                   "test": "evaluation --split test reports its validation tiles instead"}
    for name, parts in counts.items():
        for part in ("validation", "test"):
            if not parts[part] and datalist[part] and name in sources and _holds_out(sources[name].split, part):
                logger.warning("%s while other sources have %s tiles: %s; give it more tiles per organ or a split "
                               "that holds some out", _describe_split(name, sources[name], datalist, parts), part,
                               consequence[part])


def prepare(data_root: str | os.PathLike, datalist_file: str | os.PathLike,
            sources: dict[str, Source] | None = None, require_validation: bool = True) -> dict:
    """Loads the datalist at ``datalist_file``, or makes and writes it on first use.

    The split is made once and read back, so training, evaluation and resumed runs see the same tiles; a registry
    whose sources or split specifications differ from the file's is an error, never a silent re-split.
    ``require_validation`` False (evaluate.json) admits a split with no validation tiles: one's own tiles held out
    for testing alone; training, which selects its model on validation, keeps refusing it.
    """
    from .handlers import parse_bool

    require_validation = parse_bool(require_validation, "require_validation")
    sources = load_sources() if sources is None else sources
    wanted = {s.name: {"root": s.root, "split": s.split} for s in sources.values()}
    datalist_file = Path(datalist_file)
    if datalist_file.is_file():
        datalist = json.loads(datalist_file.read_text(encoding="utf-8"))
        if (made := datalist.get("sources")) != wanted:
            made = made if isinstance(made, dict) else {}
            differ = {name: (made.get(name), wanted.get(name)) for name in sorted(set(made) | set(wanted), key=str)
                      if made.get(name) != wanted.get(name)}
            raise DataError(
                f"{datalist_file} was made for other sources: "
                + "; ".join(f"{name}: {was} in the file, {now} now" for name, (was, now) in differ.items())
                + ". If it was made with another sources file (a resumed run), pass that file again with "
                "--sources_file FILE; for a split of these sources (one's own tiles, say), pass --datalist_file "
                "with a new file's name, e.g. beside the data (a bundle's models/datalist.json records what its "
                "weights learnt from: keep it)"
            )
        if require_validation:
            check_parts(datalist, sources)  # a file written before empty validation parts were refused
        # the registry's terms, as for the records' facts below: files older than the key have none, and a
        # registry edited since the split takes effect
        datalist["provenance"] = provenance(datalist, sources)
        log_provenance(datalist["provenance"])
        return _with_registry_facts(datalist, sources, datalist_file)
    datalist = make_datalist(sources, data_root, require_validation=require_validation)
    write_json_atomic(datalist, datalist_file)
    logger.info("wrote datalist %s (%s)", datalist_file,
                ", ".join(f"{p}: {len(datalist[p])}" for p in ("training", "validation", "test")))
    return datalist


def _with_registry_facts(datalist: dict, sources: dict[str, Source], datalist_file: Path) -> dict:
    """The registry is where a source's stated pixel size and sparse flag live; the datalist only caches the split
    and what was read from files. A registry edited after the split (say, a pixel size the source's authors have
    since stated) therefore takes effect, with a log line, instead of being shadowed by the cached records."""
    changed: dict[str, set] = defaultdict(set)
    for part in ("training", "validation", "test"):
        for r in datalist[part]:
            source = sources[r["source"]]
            facts = {"sparse": bool(source.sparse_labels)}
            if source.mpp != "file":
                facts["mpp"] = None if source.mpp == UNKNOWN_MPP else float(source.mpp)
            for key, value in facts.items():
                if r.get(key) != value:
                    changed[source.name].add(f"{key} {r.get(key)} -> {value}")
                    r[key] = value
    for name, what in changed.items():
        logger.warning("%s: source %r now has %s from the registry", datalist_file, name, ", ".join(sorted(what)))
    return datalist


MAX_STARTS = 64  # levels of started_from read: far beyond any lineage, short of JSON's nesting limits


def starts(start, levels: int = MAX_STARTS):
    """Each level of a ``started_from`` chain, the run's own start first, to ``levels`` levels (each fine-tune in a
    folder nests one more); a level that is no mapping ends it, as a received datalist may hold anything."""
    for _ in range(levels):
        if not isinstance(start, dict):
            return
        yield start
        start = start.get("started_from")


def is_local_path(value) -> bool:
    """A path that names folders of the machine it was written on: absolute (POSIX, a Windows drive, with or
    without a slash after it, or a share), under a home folder (``~/``, ``~user/``), or reaching above its start
    (``..``). A plain relative path, or a name with a colon past its first letter (``s3://``), is none."""
    if not isinstance(value, str):
        return False
    if value.startswith(("/", "\\")) or re.match(r"[A-Za-z]:|~[^/\\]*[/\\]", value):
        return True
    return ".." in re.split(r"[/\\]", value)


def _private_starts(start):
    """``started_from`` as recorded before, its weights recorded by path (as datalists did before naming them)
    named by their file name only: a run's datalist, which ``pack`` publishes, names no folder of its lineage. Kept
    to the levels ``provenance_chain`` reads below the run's own start (MAX_STARTS in all)."""
    levels = [{key: value for key, value in level.items() if key != "started_from"}
              for level in starts(start, MAX_STARTS - 1)]
    for level in levels:
        if is_local_path(level.get("weights")):
            level["weights"] = re.split(r"[/\\]|^[A-Za-z]:", level["weights"].rstrip("/\\"))[-1]
    chain = None
    for level in reversed(levels):
        chain = {**level, "started_from": chain} if chain is not None else level
    return chain


def _beside(weights: Path) -> dict | None:
    """The datalist beside ``weights`` (their run's record), or None where there is none or it cannot be read:
    then the data they learnt from is unknown, and a warning says why."""
    beside = weights.parent / "datalist.json"
    if not beside.is_file():
        logger.warning("no datalist.json beside the pretrained weights %s: the data they learnt from, and its "
                       "license, are unknown, and so are this run's weights' terms", weights)
        return None
    before = read_record(beside)
    if isinstance(before, str):
        logger.warning("%s, beside the pretrained weights, is no datalist (%s): the data they learnt from, and its "
                       "license, are unknown, and so are this run's weights' terms", beside, before)
        return None
    return before


def read_record(path: Path) -> dict | str:
    """A datalist.json that only informs (a bundle's record of its weights, the one beside starting weights), read
    without a crash: its object, or why there is none."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than JSON readers go
        return str(e)
    return record if isinstance(record, dict) else f"a JSON {type(record).__name__}"


def _weights_identity(weights: Path) -> dict:
    """The weights a run started from, named without the folders they sit in (``pack`` publishes the datalist, and
    a path would show the trainer's folder names): their SHA-256, and as ``weights`` the bundle's "name version"
    from its ``configs/metadata.json`` where they sit in a bundle's ``models/``, else the file's name."""
    name = weights.name
    meta_file = weights.parent.parent / "configs" / "metadata.json"
    if weights.parent.name == "models" and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None  # a damaged metadata.json names nothing; the file's name still does
        if isinstance(meta, dict) and meta.get("name") and meta.get("version"):
            name = f"{meta['name']} {meta['version']}"
    return {"weights": name, "sha256": sha256_file(weights)}


def record_start(datalist: dict, ckpt_dir: str | os.PathLike, pretrained: str | os.PathLike | None,
                 resume: bool | str = False) -> None:
    """Writes the datalist a new training run uses into its own ``ckpt_dir`` (``datalist.json``), with what its
    weights start from (``started_from``): the ``pretrained`` weights (``weights``, a name: "name version" of the
    bundle they come from, else the file's name; ``sha256``, their digest), and the provenance of the datalist
    beside them, its own ``started_from`` included. Weights that older datalists recorded by path keep only their
    file's name when inherited so.

    Weights carry the terms of all the data behind them: a fine-tune on one's own data under a permissive license
    from weights that learnt from non-commercial data is not free for commercial use, and ``pack`` must know it
    (``provenance_chain``). Weights with no datalist beside them are recorded with provenance None: unknown. The
    run's folder gets the datalist even where ``--datalist_file`` named another, so the weights' record is beside
    them. A resumed run keeps its own.
    """
    from .handlers import parse_bool, weights_path

    if parse_bool(resume, "resume"):
        return
    own = Path(ckpt_dir) / "datalist.json"
    record = {key: value for key, value in datalist.items() if key != "started_from"}
    weights = weights_path(pretrained)
    if weights is not None:
        weights = weights.expanduser().resolve()
        start: dict = {**_weights_identity(weights), "provenance": None}
        if (before := _beside(weights)) is not None:
            start.update(provenance=before.get("provenance"),
                         started_from=_private_starts(before.get("started_from")))
        record["started_from"] = start
    # a missing or unreadable earlier record reads as its reason, never equal: this run's replaces it
    if read_record(own) != record:
        write_json_atomic(record, own)


def provenance_chain(datalist: dict) -> dict[str, dict | None]:
    """Every source the weights of ``datalist``'s run owe to, this run's and those its ``started_from`` weights
    learnt from, each as ``provenance`` gives it (None: weights whose data is unknown). Inherited ones are named
    "<source> (through <weights>)" and weights of unknown data "weights <weights>", with <weights> as
    ``record_start`` names them and the first 12 digits of their SHA-256 (an absolute path, and no digest, in
    datalists written before it named them so); a source met again through the same weights (repeated fine-tunes
    in one folder) is listed once, unless its terms differ there."""
    def facts_of(provenance) -> dict:
        return {name: facts if isinstance(facts, dict) else {} for name, facts in provenance.items()}

    own = datalist.get("provenance")
    chain: dict[str, dict | None] = facts_of(own) if isinstance(own, dict) else {}
    for start in starts(datalist.get("started_from")):
        who = start.get("weights")
        if isinstance(start.get("sha256"), str) and start["sha256"]:  # names repeat (model.pt, a copied bundle)
            who = f"{who}, sha256 {start['sha256'][:12]}"
        if not isinstance(start.get("provenance"), dict):
            chain[f"weights {who}"] = None
            break
        for name, facts in facts_of(start["provenance"]).items():
            key, n = f"{name} (through {who})", 2
            while key in chain and chain[key] != facts:
                key, n = f"{name} (through {who}, #{n})", n + 1
            chain[key] = facts
    return chain


def resolve(datalist: dict, data_root: str | os.PathLike, part: str, working_mpp: float,
            sources: list[str] | None = None) -> list[dict]:
    """Records of one part with absolute paths and ``scale`` (tile mpp / working mpp), optionally of some sources."""
    if part not in datalist:
        raise KeyError(f"datalist has no part {part!r}; it has {[k for k in datalist if isinstance(datalist[k], list)]}")
    roots = {name: Path(data_root).expanduser() / spec["root"] for name, spec in datalist["sources"].items()}
    records, checked = [], set()
    for r in datalist[part]:
        if sources is not None and r["source"] not in sources:
            continue
        root = roots[r["source"]]
        if r["source"] not in checked:  # a wrong data root, said once, before a loader fails on its first tile
            if not root.is_dir():
                raise missing_folder(r["source"], root, datalist["sources"][r["source"]]["root"])
            checked.add(r["source"])
        records.append({**r, "image": str(root / r["image"]), "label": str(root / r["label"]),
                        "scale": 1.0 if r["mpp"] is None else round(float(r["mpp"]) / float(working_mpp), 4)})
    return records


def sampling_weights(records: list[dict], mix: dict[str, float] | None = None) -> list[float]:
    """Per-record weights so that each source gives its share of ``mix`` (equal shares by default) of the
    samples, whatever its tile count."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r["source"]] += 1
    mix = mix or {s: 1.0 for s in counts}
    total = sum(mix.get(s, 0.0) for s in counts)
    return [mix.get(r["source"], 0.0) / total / counts[r["source"]] for r in records]


def nucleus_areas(sources: list[Source], data_root: str | os.PathLike) -> list[int]:
    """Pixel areas of the annotated nuclei of every tile of ``sources`` (seconds for the three datasets: a sample
    would make a small source's estimate hang on a few tiles' tissue)."""
    import numpy as np

    from .data import read_instance_labels

    areas: list[int] = []
    for source in sources:
        for s in discover_source(source, data_root):
            counts = np.bincount(read_instance_labels(s.sample.label, s.sample.label_kind).ravel())[1:]
            areas += counts[counts > 0].tolist()
    return areas


def estimate_mpp(source: Source, data_root: str | os.PathLike, reference: dict[str, float]) -> float:
    """A pixel size for a source that states none: the reference sources' pixel size scaled by the square root of
    the ratio of median nucleus areas.

    ``reference``: {"mpp": microns per pixel of the reference sources, "median_area_px": their median nucleus area}.
    """
    import numpy as np

    areas = nucleus_areas([source], data_root)
    if not areas:
        raise DataError(f"source {source.name!r} has no annotated nuclei to estimate its pixel size from")
    return float(reference["mpp"]) / float(np.sqrt(np.median(areas) / float(reference["median_area_px"])))


def evaluation_records(datalist: dict, data_root: str | os.PathLike, split: str, working_mpp: float,
                       rescans: dict[str, float] | None = None) -> list[dict]:
    """The tiles an evaluation reports: each source's ``split`` part, or its validation part where the source
    holds no such part (MoNuSeg has no test tiles here), plus copies of some sources' tiles as a scanner at
    another pixel size would give them (``rescans``: source -> microns per pixel, e.g. CryoNuSeg at 20x)."""
    parts = ("training", "validation", "test")
    if split not in parts:  # a typo would otherwise score every source's validation tiles under its name
        raise DataError(f"split {split!r} is none of {', '.join(parts)}")
    for name, mpp in (rescans or {}).items():
        if name not in datalist["sources"]:
            # a misspelt source is warned about; one the data lacks is only said (the bundles' default rescans
            # CryoNuSeg, which one's own data lacks)
            close = difflib.get_close_matches(name, list(datalist["sources"]), n=1)
            logger.log(logging.WARNING if close else logging.INFO,
                       "rescans names %r, which is not a source of this datalist (%s)%s: no rescanned copy of it",
                       name, ", ".join(datalist["sources"]), f"; did you mean {close[0]!r}?" if close else "")
            continue
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not mpp > 0:
            raise DataError(f"rescans gives {name!r} the pixel size {mpp!r}; it takes microns per pixel as a positive "
                            "number, e.g. 0.5 for a 20x scan")
    records = []
    for name in datalist["sources"]:
        part = split if any(r["source"] == name for r in datalist.get(split, [])) else "validation"
        records += [{**r, "part": part} for r in resolve(datalist, data_root, part, working_mpp, [name])]
    if not records:
        counts = part_counts(datalist)
        wanted = split if split == "validation" else f"{split} or validation"
        raise DataError(f"no tiles to evaluate: the datalist holds no {wanted} tiles ("
                        + "; ".join(f"{name}: " + ", ".join(f"{p} {n}" for p, n in c.items())
                                    for name, c in counts.items())
                        + "); evaluate another --split, or give the sources file a split that holds tiles out "
                          "(tuning scores the validation part)")
    check_sizes((r["image"], r["label"]) for r in records)  # before the evaluation replaces its earlier report
    for name, mpp in (rescans or {}).items():
        for r in [r for r in records if r["source"] == name]:
            if r["mpp"] is None:
                raise DataError(f"source {name!r} states no pixel size, so it cannot be rescanned to {mpp:g} um/px; "
                                "give its mpp in the sources file, or leave it out of the rescans")
            records.append({**r, "source": f"{name}@{mpp:g}um", "mpp": mpp,
                            "rescan_scale": round(float(r["mpp"]) / mpp, 4),
                            "scale": round(mpp / float(working_mpp), 4)})
    return records


def bundle_records(bundle: str | os.PathLike, data_root: str | os.PathLike | None = None, split: str = "test",
                   rescans: dict[str, float] | None = None) -> tuple[list[dict], float]:
    """``evaluation_records`` of a bundle folder (its ``models/datalist.json``, its data root unless ``data_root``)
    and its working pixel size (``microns_per_pixel`` of its metadata): the tiles its evaluation reports, for
    scripts that score them outside the evaluating workflow."""
    bundle = Path(bundle)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    working = float(metadata["microns_per_pixel"])
    datalist = json.loads((bundle / "models" / "datalist.json").read_text(encoding="utf-8"))
    records = evaluation_records(datalist, data_root or default_data_root(bundle), split, working, rescans)
    return records, working


def main(argv: list[str] | None = None) -> None:
    """``python -m nucleiseg_monai.sources --estimate_mpp nuinsseg --data_root DIR``: the pixel size a source with
    none stated would have, from its nuclei against the sources that state theirs (how sources.json's NuInsSeg
    entry was set)."""
    import argparse

    import numpy as np

    parser = argparse.ArgumentParser(prog="python -m nucleiseg_monai.sources", description=main.__doc__)
    parser.add_argument("--estimate_mpp", required=True, help="name of the source to estimate")
    parser.add_argument("--data_root", required=True, help="folder holding the sources' folders")
    parser.add_argument("--sources_file", help="source registry (default: the shipped one)")
    parser.add_argument("--reference", nargs="+", help="the sources whose pixel size is known to compare with "
                        "(default: every other source that states one; all at one pixel size)")
    args = parser.parse_args(argv)
    sources = load_sources(args.sources_file)
    names = args.reference or [n for n, s in sources.items() if n != args.estimate_mpp and s.mpp != UNKNOWN_MPP]
    unknown = sorted(set(names + [args.estimate_mpp]) - set(sources))
    if unknown:
        raise SystemExit(f"no source {', '.join(unknown)} in the registry; it lists {', '.join(sources)}")
    references = [sources[n] for n in names]
    stated = {tile_mpp(s, discover_source(s, args.data_root)[0].sample.image) for s in references}
    if len(stated) != 1:
        raise SystemExit(f"the reference sources {', '.join(names)} state different pixel sizes {sorted(stated)} (an "
                         "estimated one among them?); choose references of one pixel size: --reference NAME ...")
    reference = {"mpp": stated.pop(), "median_area_px": float(np.median(nucleus_areas(references, args.data_root)))}
    source = sources[args.estimate_mpp]
    mpp = estimate_mpp(source, args.data_root, reference)
    tiles, nuclei = len(discover_source(source, args.data_root)), len(nucleus_areas([source], args.data_root))
    print(f"{args.estimate_mpp}: {mpp:.3f} um/px (from {nuclei} nuclei in its {tiles} tiles; reference: {names}, "
          f"{reference})")
    if nuclei < 200:
        print("few nuclei: the median nucleus size, and so the estimate, depends on the tissue of so few tiles; "
              "prefer the scanner's stated pixel size where it is known")


if __name__ == "__main__":
    main()
