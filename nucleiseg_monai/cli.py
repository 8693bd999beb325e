"""The ``nucleiseg`` console commands: argument parsing and progress only; the work is in the library modules.

    nucleiseg download --dest DIR [--archive ZIP]     fetch / unpack CryoNuSeg
    nucleiseg datalist --data_root DIR --output F    every source's split + channel statistics
    nucleiseg train --bundle DIR [--KEY VALUE ...]    the bundle's training workflow, settings checked first
    nucleiseg evaluate --bundle DIR [--KEY VALUE ...] its evaluating workflow (metrics, maps, overlays of a split)
    nucleiseg predict --bundle DIR --input PATH --output_dir DIR   the bundle's inference.json, as a command
    nucleiseg tune --bundle DIR                      watershed parameters on the validation split
    nucleiseg pack / verify / unpack                 share a bundle as one checked zip
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import __version__

logger = logging.getLogger("nucleiseg")


def _overrides(pairs: list[str], files: list[Path]) -> dict:
    """``--set ID=VALUE`` pairs as config overrides, each value parsed and checked against the config ``files``
    as train's and evaluate's settings are (``overrides.check``): ``int8=false`` is False, not the truthy text
    'false', and an id the config lacks is refused with the nearest one."""
    from .inference import config_id
    from .overrides import check, load_config

    pairs_by_id = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE (a config id such as postprocess_params#min_size=20), got {pair!r}")
        key, value = pair.split("=", 1)
        pairs_by_id[config_id(key)] = value
    return check(pairs_by_id, load_config(files), spelling="set") if pairs_by_id else {}


def _bundle_config(bundle: str, name: str) -> Path:
    path = Path(bundle) / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --bundle must be a bundle folder holding configs/{name}")
    return path


def _check_bundle(bundle: str) -> None:
    from .packaging import check_bundle

    check_bundle(bundle)


def cmd_download(args) -> int:
    from .download import KaggleUnavailableError, download

    try:
        download(args.dest, archive=args.archive, sha256=args.sha256, force=args.force, log=print)
    except KaggleUnavailableError as err:  # what to do instead, without a traceback
        print(f"nucleiseg download: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_datalist(args) -> int:
    from .atomic import write_json_atomic
    from .data import DataError
    from .sources import default_data_root, load_sources, make_datalist

    data_root = args.data_root or default_data_root(os.getcwd())
    if not args.data_root:
        logger.info("data root %s ($NUCLEISEG_DATA, else shared/datasets beside the checkout; --data_root DIR chooses)",
                    data_root)
    datalist = make_datalist(load_sources(args.sources_file, args.sources), data_root)
    if args.stats and datalist["channel_stats"] is None:
        raise DataError(f"--stats {args.stats}: the split leaves no training tiles to compute channel statistics "
                        "from; leave --stats out (evaluation takes the weights' statistics), or give a source "
                        "training tiles in the sources file's split")
    write_json_atomic(datalist, args.output)
    if args.stats:
        write_json_atomic(datalist["channel_stats"], args.stats)
    sizes = {k: len(datalist[k]) for k in ("training", "validation", "test")}
    print(f"wrote {args.output}: {sizes}, channel stats {datalist['channel_stats']}")
    return 0


def bundle_workflow(config_files: Path | list[Path], run_id: str, bundle: str, overrides: dict):
    """The ConfigWorkflow of one runner id, built as ``python -m monai.bundle run`` builds it: the config files
    merged in order, the bundle's metadata and logging, then the overrides (after ``bundle_root``, so one given
    explicitly wins)."""
    from monai.bundle import ConfigWorkflow

    from .bundle import own_folder

    files = [config_files] if isinstance(config_files, (str, Path)) else list(config_files)
    configs = Path(files[0]).parent
    workflow = ConfigWorkflow(
        config_file=[str(f) for f in files], meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"), run_id=run_id, workflow_type=None,
    )
    # not as keyword arguments: a setting named like one of ConfigWorkflow's own (tracking, run_id) stays a setting
    workflow.parser.update({**own_folder(bundle), **overrides})
    return workflow


def run_workflow(workflow):
    workflow.initialize()
    result = workflow.run()
    workflow.finalize()
    return result


def cmd_predict(args) -> int:
    from .cohort import is_slide_list

    roi = None
    if args.roi:
        from .inputs import find_images
        from .roi import read_roi

        # one image's areas: a folder's or a list's slides each need their own, which only a slide list can give
        if is_slide_list(args.input) or args.workers or args.scheduler or len(find_images(args.input)) != 1:
            raise SystemExit("nucleiseg predict: error: --roi belongs to one image (--input IMAGE, or a DICOM slide's "
                             "folder), run in this process; for many slides give each its ROI in the roi column of a "
                             "slide list (a CSV with columns path, roi: --input slides.csv)")

        roi = read_roi(args.roi)  # a wrong file is named before seconds go into building the network
    _check_bundle(args.bundle)
    from .inference import inference_configs

    overrides = {"input": args.input, "output_dir": args.output_dir,
                 **_overrides(args.set, inference_configs(args.bundle))}
    if args.checkpoint:
        overrides["checkpoint"] = args.checkpoint
    if args.mpp is not None:
        overrides["predictor#input_mpp"] = args.mpp
    if args.force_mpp:
        if args.mpp is None and not is_slide_list(args.input):  # a slide list's input_mpp column may give it
            raise SystemExit("nucleiseg predict: error: --force_mpp needs the pixel size to force: pass --mpp X "
                             "--force_mpp (X in um/px, about 0.25 at 40x, 0.5 at 20x)")
        overrides["predictor#force_mpp"] = True
    if args.overwrite:
        overrides["predictor#overwrite"] = True
    if args.test_time_flips is not None:
        overrides["test_time_flips"] = args.test_time_flips
    if args.workers or args.scheduler or is_slide_list(args.input):
        return _predict_cohort(args, overrides)
    from .inference import SlidePredictor
    from .inputs import find_images

    find_images(args.input)  # a mistyped input is named before seconds go into building the network
    settings = {k: v for k, v in overrides.items() if k not in ("input", "output_dir")}
    try:
        predictor = SlidePredictor.from_bundle(args.bundle, **settings)
        predictor.roi = roi
        summary = predictor.run(args.input, args.output_dir)
    except FileExistsError as err:  # finished outputs of other settings: refused before any image was read
        print(f"nucleiseg predict: error: {err}", file=sys.stderr)
        return 2  # a usage error, as the other ones are; 1 says that images failed
    if not summary.ok:  # each failure was already logged with its path
        logger.error("%d image(s) failed (%d done, %d already complete)", len(summary.failed), len(summary.done),
                     len(summary.skipped))
    return 0 if summary.ok else 1


# the settings naming the folders each workflow writes, created and checked before anything runs
OUTPUT_SETTINGS = {"training": ("ckpt_dir", "output_dir"), "evaluating": ("output_dir",)}


def evaluate_configs(bundle: str) -> list[Path]:
    """evaluate.json alone where it is a whole config, else as an overlay over train.json: a config without
    "imports" relies on train.json's (run as ``--config_file "['configs/train.json','configs/evaluate.json']"``)."""
    from .overrides import read_config

    evaluate = _bundle_config(bundle, "evaluate.json")
    if "imports" in read_config(evaluate):
        return [evaluate]
    return [_bundle_config(bundle, "train.json"), evaluate]


def prepare_output_folders(parser, ids: tuple[str, ...], created: list[Path] | None = None) -> dict[str, Path]:
    """Creates the folders the settings ``ids`` name and checks that they take files, so a run that could not keep
    its results stops before it reads any data. The settings must be plain path expressions (they are evaluated
    here and again by the run). The folders this made (parents included, deepest first) are added to ``created``,
    for ``remove_if_empty`` after a run that failed."""
    from .overrides import SettingError

    folders = {}
    for setting in ids:
        value = parser.get_parsed_content(setting) if setting in parser else None
        if not isinstance(value, str):  # absent, or None for "write nothing"
            continue
        folder = Path(value)
        missing = [f for f in (folder, *folder.parents) if not f.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if created is not None:
                created += [f for f in missing if f.is_dir()]
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise SettingError(
                f"cannot create the output folder {folder} (setting {setting!r}): {err.strerror or err}; "
                f"choose one you can write to with --{setting} DIR or --bundle_root DIR"
            ) from err
        folders[setting] = folder
    return folders


def own_settings(parser, settings: dict, config: dict, files: list[Path]) -> tuple[dict, list[str]]:
    """For a resumed training run (``resume`` true): the settings its run was started with and ``settings``, those
    typed now, leave out, to give it again (one log line names them); and the settings typed now otherwise than the
    run had them, which win, typed (one warning names them). Both empty for a new run, or one whose state records
    none (``Resume`` says so). ``handlers.NOT_RECORDED`` keep their own rules."""
    from .handlers import NOT_RECORDED, as_flags, as_typed, config_mismatch, parse_bool, run_record

    if not parse_bool(parser.get_parsed_content("resume") if "resume" in parser else False, "resume"):
        return {}, []
    state = Path(parser.get_parsed_content("ckpt_dir")) / "checkpoint_last.pt"
    record = run_record(state)
    if record is None:
        return {}, []
    config_mismatch(state, record.get("configs"), [f.name for f in files])  # its settings fit its own configs
    recorded = {k: v for k, v in record["given"].items() if k not in NOT_RECORDED}
    # a part of one typed now (network_def#features, where network_def is typed whole) is replaced with it
    replaced = [k for k in recorded if any(k.startswith(f"{t}#") for t in settings)]
    restored = {k: v for k, v in recorded.items() if k not in settings and k not in replaced}
    changed = _typed_otherwise(recorded, settings, config)
    run = state.parent.parent if state.parent.name == "models" else state.parent
    if restored:
        logger.info("resuming %s with its own settings: %s", run, as_flags(restored))
    if changed:
        logger.warning("resuming %s with other settings than its own, as typed: %s", run, ", ".join(
            f"--{key} {as_typed(now)} (the run had {was})" for key, (was, now) in changed.items()))
    return restored, [*changed, *replaced]


def _typed_otherwise(recorded: dict, settings: dict, config: dict) -> dict[str, tuple[str, object]]:
    """{setting: (the run's value as typed, the one typed now)} where they differ; the run's is the parts of the
    setting it recorded (``network_def#features`` for ``network_def``), else the config's default where it
    recorded none (not known where that is computed)."""
    from .handlers import NOT_RECORDED, as_flags, as_typed, recordable, same_setting
    from .overrides import CODE_PREFIXES, MISSING, default_of

    changed = {}
    for key, value in settings.items():
        value = recordable(key, value)  # a path as the run recorded its own: absolute
        was = recorded.get(key, MISSING)
        parts = {k: v for k, v in recorded.items() if k.startswith(f"{key}#")}
        if was is MISSING and parts and key not in NOT_RECORDED:
            changed[key] = (as_flags(parts), value)
            continue
        if was is MISSING:
            try:
                was = default_of(config, key)
            except ValueError:  # SettingError: checked already, so not met here
                continue
            if isinstance(was, str) and was.startswith(CODE_PREFIXES):
                continue
        if key not in NOT_RECORDED and was is not MISSING and not same_setting(was, value):
            changed[key] = (as_typed(was), value)
    return changed


def _run_checked(args, run_id: str) -> None:
    from .atomic import remove_if_empty, remove_stale
    from .bundle import command
    from .overrides import check, load_config, parse_pairs

    _check_bundle(args.bundle)
    files = [_bundle_config(args.bundle, "train.json")] if run_id == "training" else evaluate_configs(args.bundle)
    config = load_config(files)
    settings = check(parse_pairs(args.settings), config)
    workflow = bundle_workflow(files, run_id, args.bundle, settings)
    changed: list[str] = []
    if run_id == "training":
        restored, changed = own_settings(workflow.parser, settings, config, files)
        settings = {**restored, **settings}
        workflow.parser.update(settings)  # in this order: one typed now wins over a restored part of it
    created: list[Path] = []
    try:
        folders = prepare_output_folders(workflow.parser, OUTPUT_SETTINGS[run_id], created)
        if run_id == "training" and "ckpt_dir" in folders:
            for path in remove_stale(folders["ckpt_dir"]):
                logger.info("removed %s, left by an interrupted checkpoint write", path)
        with command(settings, changed, files):
            run_workflow(workflow)
    except BaseException:  # a failed run leaves no empty output folder behind (one with results stays)
        remove_if_empty(created)
        raise


def _bundle_command(args, run_id: str) -> int:
    """train / evaluate: any error ends in one line on stderr (``--debug``: after the full traceback), exit code 2."""
    from .errors import one_line, tracebacks_out_of_logs

    try:
        with nullcontext() if args.debug else tracebacks_out_of_logs():
            _run_checked(args, run_id)
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        print(f"nucleiseg {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


def cmd_train(args) -> int:
    return _bundle_command(args, "training")


def _predict_cohort(args, overrides: dict) -> int:
    """The cohort on a Dask cluster: one task per slide, a run table, exit code 1 when any slide failed."""
    from .cohort import BundlePredictor, predict_cohort

    settings = {k: v for k, v in overrides.items() if k not in ("input", "output_dir")}
    factory = BundlePredictor(str(Path(args.bundle).resolve()), tuple(settings.items()))
    try:
        summary = predict_cohort(args.input, args.output_dir, factory, workers=args.workers,
                                 scheduler=args.scheduler, retries=args.retries, table=args.run_table,
                                 split_above_mpx=args.split_above_mpx,
                                 overwrite=bool(settings.get("predictor#overwrite", False)))
    except FileExistsError as err:  # finished outputs of other settings: refused before any slide was sent out
        print(f"nucleiseg predict: error: {err}", file=sys.stderr)
        return 2  # as a single-process run exits
    return 0 if summary.ok else 1


def cmd_evaluate(args) -> int:
    if args.split:
        args.settings = ["--split", args.split, *args.settings]
    return _bundle_command(args, "evaluating")


def cmd_tune(args) -> int:
    from .bundle import own_folder
    from .packaging import MANIFEST
    from .tuning import apply, tune, tuned_checkpoint

    _check_bundle(args.bundle)
    configs = evaluate_configs(args.bundle)
    bundle_only = own_folder(args.bundle)
    overrides = {**bundle_only, **_overrides(args.set, configs)}
    if args.data_root:
        overrides["data_root"] = args.data_root
    if args.sources_file:
        overrides["sources_file"] = args.sources_file
    # spelt as train's and evaluate's are; --set bundle_root=DIR still works
    overrides.update({key: value for key in ("bundle_root", "checkpoint", "datalist_file")
                      if (value := getattr(args, key)) is not None})
    # another registry or split is other data: what is tuned on it is not the bundle's to keep or write
    own_data = not {"sources_file", "datalist_file"} & set(overrides)
    train = _bundle_config(args.bundle, "train.json")
    weights = tuned_checkpoint(configs, overrides)
    own_weights = weights == tuned_checkpoint(configs, bundle_only)
    if args.apply and not own_weights:
        # the bundle's train.json is its shipped config: parameters tuned for other weights don't belong there
        raise ValueError(
            f"--apply would write parameters tuned for {weights} into {train}, the config of the bundle's own "
            f"weights; make them a bundle of their own first (copy {args.bundle} and put the weights in its "
            "models/model.pt), then tune it with --bundle COPY --apply")
    if args.apply and not own_data:
        raise ValueError(
            f"--apply would write parameters tuned on other data than the bundle's registry into {train}; make a "
            f"bundle of your own whose train.json names that registry (README, Sharing a bundle), then tune it with "
            "--bundle COPY --apply")
    sealed = (Path(args.bundle) / MANIFEST).is_file()
    if args.apply and sealed:
        # its train.json is listed in manifest.json: changed, the bundle would fail its own verification
        raise ValueError(
            f"--apply would change {train}, a file of the packed bundle's {MANIFEST} (it would then fail "
            f"verification and refuse to run); copy {args.bundle} to a working copy without {MANIFEST} and tune "
            "that one with --apply")
    if args.report:
        report_file = args.report
    elif own_weights and own_data and not sealed:
        report_file = str(Path(args.bundle) / "docs" / "postprocess_tuning.json")
    elif own_weights:  # the shipped record stays as it was packed or measured; the new one goes where evaluations go
        report_file = str(Path(args.bundle) / "eval" / "postprocess_tuning.json")
    else:
        report_file = str(weights.parent / "postprocess_tuning.json")
    from .overrides import parse_value

    grid = parse_value(args.grid) if args.grid else None
    report = tune(configs, report_file, grid=grid, overrides=overrides)
    chosen = report["chosen"]
    print(f"chosen on {len(report['validation_tiles'])} validation tiles: {chosen['params']}")
    print(f"validation figures (mean over sources): {chosen['validation']}")
    print(f"all {len(report['results'])} settings: {report_file}")
    if args.apply:
        apply(train, chosen["params"])
        print(f"wrote them as postprocess_params in {train}")
    else:
        print(f"to use them: --postprocess_params \"{chosen['params']}\" on evaluate, or "
              f"--set \"postprocess_params={chosen['params']}\" on predict")
        if own_weights and own_data and not sealed:
            print(f"to keep them in the bundle: nucleiseg tune --bundle {args.bundle} --apply (the same search "
                  f"again, its choice written as postprocess_params in {train})")
    return 0


def cmd_pack(args) -> int:
    from .packaging import pack, sha256_file

    zip_path = pack(args.bundle, args.output, overwrite=args.overwrite)
    digest = sha256_file(zip_path)
    print(f"wrote {zip_path}\nsha256 {digest}")
    print(f"publish the sha256 with the zip; receivers run: nucleiseg unpack --zip {zip_path.name} --dest DIR --sha256 {digest}")
    return 0


def cmd_verify(args) -> int:
    from .packaging import MANIFEST, TRUST_ENV, bundle_files, config_findings, verify, working_copy_problems

    path = Path(args.bundle)
    findings = config_findings(path) if path.is_dir() else []  # a zip's configs are read when it is unpacked
    for finding in findings:
        print(f"config: {finding}")
    if path.is_dir() and not (path / MANIFEST).is_file():
        problems = working_copy_problems(path)
        for problem in problems:
            print(problem)
        if problems:
            print(f"{len(problems)} problem(s): fix them before packing this working copy")
            return 1
        print(
            f"no {MANIFEST}: {path} is a working copy, so its structure was checked ({len(bundle_files(path))} bundle "
            "files, metadata version, weights, no code, no links) but not its contents; pack it to share it: "
            f"nucleiseg pack --bundle {path} --output {path.resolve().name}.zip"
        )
        if findings:
            print(f"its configs reach beyond what a bundle needs ({len(findings)} line(s) above): receivers will be "
                  f"told, and will run it only with {TRUST_ENV}=1")
        return 0
    problems = verify(args.bundle, max_bytes=args.max_size_mb << 20)
    for problem in problems:
        print(problem)
    print("bundle matches its manifest" if not problems else f"{len(problems)} problem(s): do not run this bundle")
    if problems:
        return 1
    if findings:
        print(f"its configs reach beyond what a bundle needs ({len(findings)} line(s) above): read them; nucleiseg "
              f"runs it only with {TRUST_ENV}=1 set, which says you trust whoever sent it")
        return 1
    print(_NOT_TRUSTED)
    return 0


def cmd_unpack(args) -> int:
    from .packaging import config_findings, unpack

    dest = unpack(args.zip, args.dest, sha256=args.sha256, overwrite=args.overwrite, max_bytes=args.max_size_mb << 20)
    print(f"unpacked and verified: {dest}")
    if not config_findings(dest):  # else unpack's warning names them
        print(_NOT_TRUSTED)
    return 0


# verification proves a bundle is what its sender packed, not that its configs are harmless
_NOT_TRUSTED = ("intact, which is not trusted: its configs run the Python expressions and import the components they "
                "name (read, not run: nothing outside the allow-list of nucleiseg_monai.config_audit was found); read "
                "its configs/*.json before running it if you do not know who packed it")


def _workflow_parser(sub, name: str, description: str, func, example: str, same_as: str, extra_usage: str = ""):
    """A sub-command that runs a bundle workflow and takes any setting of its config as --KEY VALUE."""
    p = sub.add_parser(
        name, help=description, description=description, allow_abbrev=False,
        usage=f"%(prog)s --bundle DIR{extra_usage} [--debug] [--KEY VALUE ...]",
        epilog=f"Any setting of the config can follow as --KEY VALUE, e.g. {example}; nested ones as "
        '--network_def#features "[16,32,64,128]". Values are Python literals, checked against the config before '
        f"anything runs: unknown keys and wrong types are refused. The same as python -m monai.bundle {same_as} "
        "--KEY VALUE ...",
    )
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/nuclei_unet_small")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback too")
    p.set_defaults(func=func, settings=[])
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleiseg", description="Nuclei instance segmentation with MONAI bundles")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch and unpack CryoNuSeg (Kaggle API, or a zip you downloaded)")
    p.add_argument("--dest", required=True, help="folder to unpack into (the flat Kaggle layout)")
    p.add_argument("--archive", help="a local copy of the Kaggle zip instead of downloading")
    p.add_argument("--sha256", help="expected SHA-256 of the archive")
    p.add_argument("--force", action="store_true", help="replace an incomplete or different copy at --dest")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("datalist", help="write the combined split of every training source and the channel statistics")
    p.add_argument("--data_root", help="folder holding each source's folder (default: $NUCLEISEG_DATA, else "
                   "shared/datasets beside the checkout)")
    p.add_argument("--output", required=True, help="datalist JSON to write")
    p.add_argument("--stats", help="also write the channel statistics JSON here")
    p.add_argument("--sources_file", help="source registry JSON (default: the one shipped in nucleiseg_monai)")
    p.add_argument("--sources", nargs="*", help="use only these sources of the registry")
    p.set_defaults(func=cmd_datalist)

    p = sub.add_parser("predict", help="segment images or whole slides with a bundle")
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/nuclei_unet_small")
    p.add_argument("--input", required=True, help="an image, a folder or a glob (PNG, JPEG, BMP, WebP, TIFF, "
                   "pyramidal BigTIFF, .svs and other OpenSlide formats, DICOM slides: one image per series of .dcm "
                   "files), or a .csv/.tsv slide list (columns path, slide, input_mpp, roi)")
    p.add_argument("--output_dir", required=True, help="folder for the label maps, GeoJSON, CSV and overlays")
    p.add_argument("--checkpoint", help="weights to use instead of the bundle's models/model.pt")
    p.add_argument("--mpp", type=_mpp, help="pixel size (um/px) of input files that state none; a size the file "
                   "states wins unless --force_mpp (default: the model's own size is assumed, with a warning, and "
                   "the um^2 columns stay empty)")
    p.add_argument("--force_mpp", action="store_true", help="apply --mpp (or a slide list's input_mpp) to every "
                   "input, also files that state a pixel size: for files that state a wrong one (a print "
                   "resolution such as 2400 dpi, which reads as 10.6 um/px)")
    p.add_argument("--roi", metavar="FILE.geojson", help="segment only within these areas of a single image: "
                   "QuPath's File > Export objects as GeoJSON of annotations drawn on it (polygons; their holes are "
                   "outside); nuclei whose centroid lies outside are left out of every output. For many slides: a "
                   "slide list's roi column")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs in --output_dir are finished, "
                   "also those made with other weights or settings (a run meeting those stops otherwise)")
    p.add_argument("--test_time_flips", type=int, choices=(1, 2, 4), help="average the network over the image and "
                   "its flips: more accurate, that many network passes (default: the bundle's, 1; the model card "
                   "measures both)")
    p.add_argument("--set", nargs="*", metavar="ID=VALUE", help="config overrides, e.g. predictor#planner#region_size=1024 "
                   "(the flat predictor#region_size of earlier configs is taken too)")
    p.add_argument("--workers", type=int, help="run on a local Dask cluster of this many worker processes (the "
                   "cores are shared out between them); the default for a .csv/.tsv slide list is 1")
    p.add_argument("--scheduler", help="run on the running Dask cluster at this address (tcp://host:8786)")
    p.add_argument("--retries", type=int, default=2, help="cluster runs: attempts after a slide's first fails "
                   "or its worker dies, before it is recorded as failed (default 2; a missing or unusable input "
                   "fails at once)")
    p.add_argument("--run_table", help="cluster runs: the run table CSV (default OUTPUT_DIR/run_table.csv)")
    p.add_argument("--split_above_mpx", type=float,
                   help="cluster runs: split slides larger than this many megapixels into region tasks (default: never)")
    p.set_defaults(func=cmd_predict)

    _workflow_parser(
        sub, "train", "train a bundle: its configs/train.json training workflow", cmd_train,
        example='--epochs 20 --resume true --patch_size "[256,256]"',
        same_as="run training --config_file BUNDLE/configs/train.json",
    )

    p = _workflow_parser(
        sub, "evaluate", "a bundle's evaluating workflow: metrics, instance maps and overlays of a split", cmd_evaluate,
        example="--checkpoint other/model.pt --output_dir eval/", extra_usage=" [--split SPLIT]",
        same_as="run evaluating --config_file BUNDLE/configs/evaluate.json (train.json first where evaluate.json "
        "is an overlay of it)",
    )
    p.add_argument("--split", choices=("training", "validation", "test"),
                   help="the split to score (default: the config's, test)")

    p = sub.add_parser("tune", help="grid-search the watershed parameters on the validation split")
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/nuclei_unet_small")
    p.add_argument("--data_root", help="folder holding the datasets of the source registry (default: the config's)")
    p.add_argument("--sources_file", help="a source registry of your own (its report goes to eval/, not docs/); "
                                          "with --datalist_file FILE for its split")
    p.add_argument("--datalist_file", help="the split of --sources_file's tiles (made on first use)")
    p.add_argument("--bundle_root", help="a training run's folder: tune for its weights (models/model.pt there)")
    p.add_argument("--checkpoint", help="weights to tune for instead of the bundle's models/model.pt")
    p.add_argument("--report", help="JSON report (default: the bundle's docs/postprocess_tuning.json for its own "
                   "weights; postprocess_tuning.json beside other weights, e.g. those of --bundle_root DIR)")
    p.add_argument("--grid", help="values to try instead of the default ones, as a dict, e.g. "
                   "\"{'elevation': ['interior'], 'min_size': [15, 25]}\"")
    p.add_argument("--apply", action="store_true",
                   help="write the chosen parameters as postprocess_params in the bundle's train.json (its one place)")
    p.add_argument("--set", nargs="*", metavar="ID=VALUE", help="config overrides, e.g. device=cpu")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("pack", help="zip a bundle with a manifest (SHA-256 and size of each file); prints the zip's SHA-256")
    p.add_argument("--bundle", required=True, help="bundle folder to pack")
    p.add_argument("--output", required=True, help="zip file to write, or a folder to write <bundle name>.zip into")
    p.add_argument("--overwrite", action="store_true", help="replace an existing zip (its SHA-256 changes)")
    p.set_defaults(func=cmd_pack)

    from .packaging import MAX_UNPACKED_BYTES

    max_size = dict(type=int, default=MAX_UNPACKED_BYTES >> 20, metavar="MB",
                    help="refuse a zip whose files add up to more (default %(default)s; zip-bomb guard)")
    p = sub.add_parser("verify", help="check a bundle folder or zip against its manifest "
                       "(a folder without one, a working copy: its structure only)")
    p.add_argument("--bundle", required=True, help="bundle folder or zip")
    p.add_argument("--max_size_mb", **max_size)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("unpack", help="verify and unpack a bundle zip (refused if any file differs)")
    p.add_argument("--zip", required=True, help="the bundle zip")
    p.add_argument("--dest", required=True, help="a new folder for the bundle; or a folder to unpack BUNDLE_NAME/ "
                   "into: one that exists or ends in / (e.g. bundles/)")
    p.add_argument("--sha256", help="the zip's published SHA-256 (printed by pack), checked before anything else")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle folder of that name, with everything in it (runs/, eval/ too)")
    p.add_argument("--max_size_mb", **max_size)
    p.set_defaults(func=cmd_unpack)
    return parser


@contextmanager
def warnings_as_log_lines() -> Iterator[None]:
    """Warnings (a file's implausible pixel size, an assumed one) as one log line each, "WARNING py.warnings:
    UserWarning: ...", among the run's other lines, rather than Python's two lines with the warning's source file
    and code, which tell a user nothing."""
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}"
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        warnings.formatwarning = format_warning


def _mpp(text: str) -> float:
    from .wsi import check_mpp

    try:
        return check_mpp(text)
    except ValueError as err:  # argparse shows an ArgumentTypeError's message, a ValueError's only as "invalid"
        raise argparse.ArgumentTypeError(str(err)) from None


def _printable_anywhere() -> None:
    """Characters the console's encoding lacks (a path in another alphabet) printed as escapes, not an error:
    Windows encodes output sent to a file or pipe in its ANSI code page, strictly."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    _printable_anywhere()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, settings = parser.parse_known_args(argv)
    if hasattr(args, "settings"):  # train and evaluate take the config's settings as --KEY VALUE
        args.settings = settings
    elif settings:
        parser.error(f"unrecognized arguments: {' '.join(settings)}")
    try:
        with warnings_as_log_lines():
            return args.func(args)
    except KeyboardInterrupt as err:
        from .handlers import interruption_said

        # what is written is written atomically, and stays; temporaries go next run
        if interruption_said(err):  # the training's LastCheckpoint said which epoch its state holds, and how to go on
            return 130
        if args.func is cmd_evaluate:  # an evaluation has nothing to go on from: its report is written at its end
            logger.error("interrupted: no report was written (an earlier one in its folder was removed as it "
                         "started); run the same command again to evaluate from the start")
            return 130
        if args.func is cmd_train:  # before its trainer started: loading the data, caching tiles
            logger.error("interrupted before training started: nothing was trained; run the same command again")
            return 130
        kept = {cmd_predict: "finished images, and the finished regions of an unfinished one, are kept"}.get(
            args.func, "finished outputs are kept")
        again = ""
        if args.func is cmd_predict and args.overwrite:  # which would start every image afresh again
            again = " without --overwrite"
        if args.func is cmd_predict and args.scheduler:  # Dask runs a started task to its end, client or none
            kept += ("; the slides already running on the cluster's workers go on until they finish, and a re-run "
                     "before then reports them busy")
        logger.error("interrupted: %s; run the same command again%s to go on", kept, again)
        return 130
    except Exception as err:
        from .errors import one_line, root_cause

        # also when MONAI's config evaluation wrapped it (predict builds its predictor from the bundle's config);
        # OSError: an output folder that is a file or cannot be written, whose messages name the path and the fix
        if not isinstance(root_cause(err), (OSError, ValueError)):
            raise
        logger.error("%s", one_line(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
