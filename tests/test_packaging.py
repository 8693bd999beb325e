"""Bundles that travel: the metadata schema offline, pack / verify / unpack, and weights that cannot carry code."""

import copy
import filecmp
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from monai.bundle import verify_metadata

from nucleiseg_monai import packaging
from nucleiseg_monai.atomic import sha256_file
from nucleiseg_monai.networks import UNet, load_weights
from nucleiseg_monai.packaging import BundleIntegrityError, check_bundle, pack, unpack, verify

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "schemas" / "meta_schema_20240725.json"
METADATA = sorted((REPO / "bundles").glob("*/configs/metadata.json"))
SOURCE = REPO / "bundles" / "nuclei_unet_small"

PACKED = {
    "LICENSE",
    "configs/metadata.json",
    "configs/train.json",
    "configs/evaluate.json",
    "docs/README.md",
    "models/model.pt",
    "models/channel_stats.json",
}


@pytest.fixture
def offline(monkeypatch):
    """Any download attempt fails the test: the schema must come from schemas/, never from the URL."""
    import monai.apps.utils

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(monai.apps.utils, "_download_with_progress", no_network)
    monkeypatch.setattr(monai.apps.utils, "urlopen", no_network)


@pytest.mark.parametrize("meta_file", METADATA, ids=lambda p: p.parents[1].name)
def test_bundle_metadata_passes_the_schema_offline(meta_file, offline):
    assert METADATA, "no bundles/*/configs/metadata.json found"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))


@pytest.mark.parametrize(
    "path, expected",
    [
        (["changelog"], "'changelog' is a required property"),
        (["required_packages_version"], "'required_packages_version' is a required property"),
        (["network_data_format"], "'network_data_format' is a required property"),
        (["network_data_format", "inputs", "image", "channel_def"], "'channel_def' is a required property"),
    ],
    ids=lambda v: "/".join(v) if isinstance(v, list) else None,
)
def test_metadata_missing_a_required_field_fails(path, expected, tmp_path, offline):
    meta = json.loads((SOURCE / "configs" / "metadata.json").read_text())
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=expected):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _bundle(root: Path) -> Path:
    """A small bundle with the real configs, a tiny checkpoint, and the outputs that a run leaves behind."""
    (root / "configs").mkdir(parents=True)
    for name in ("metadata.json", "train.json", "evaluate.json"):
        shutil.copy(SOURCE / "configs" / name, root / "configs" / name)
    (root / "models").mkdir()
    torch.save(UNet(features=(4, 8)).state_dict(), root / "models" / "model.pt")
    (root / "models" / "channel_stats.json").write_text(json.dumps({"mean": [1, 2, 3], "std": [4, 5, 6]}))
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("# tiny bundle\n")
    (root / "LICENSE").write_text("Apache-2.0\n")
    # outputs and litter: never packed, never checked
    (root / "models" / "checkpoint_last.pt").write_bytes(b"optimizer state")
    (root / "models" / ".model.pt.tmp").write_bytes(b"half-written")
    (root / "runs").mkdir()
    (root / "runs" / "events.out.tfevents.1").write_bytes(b"log")
    (root / "eval" / "test").mkdir(parents=True)
    (root / "eval" / "test" / "metrics.csv").write_text("aji\n0.5\n")
    return root


def _rewrite_zip(src: Path, dst: Path, change: dict[str, bytes | None]) -> None:
    """Copies a zip member by member, replacing (bytes) or dropping (None) the members named in ``change``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename not in change:
                zout.writestr(info, zin.read(info))
            elif change[info.filename] is not None:
                zout.writestr(info, change[info.filename])


@pytest.fixture
def packed(tmp_path) -> tuple[Path, Path]:
    bundle = _bundle(tmp_path / "src" / "tiny_bundle")
    return bundle, pack(bundle, tmp_path / "dist" / "tiny_bundle.zip")


def test_pack_holds_the_bundle_files_and_their_hashes(packed):
    bundle, zip_path = packed
    assert sorted(p.name for p in zip_path.parent.iterdir()) == ["tiny_bundle.zip"]  # no temporary left over
    assert zip_path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as any file the user writes, not private
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("tiny_bundle/manifest.json"))
    assert names == {f"tiny_bundle/{f}" for f in PACKED | {"manifest.json"}}
    assert set(manifest["files"]) == PACKED
    assert manifest["bundle"] == "tiny_bundle"
    assert manifest["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    train = bundle / "configs" / "train.json"
    assert manifest["files"]["configs/train.json"] == {"sha256": sha256_file(train), "size": train.stat().st_size}
    assert not (bundle / "manifest.json").exists(), "pack must not change the bundle folder"
    assert verify(zip_path) == []


def test_pack_warns_when_the_license_misses_a_license_of_the_training_data(tmp_path, caplog):
    bundle = _bundle(tmp_path / "b")
    provenance = {"mine": {"license": "CC BY-NC 4.0", "citation": "My Lab 2026"},
                  "theirs": {"license": "CC BY-NC 4.0"}, "open": {"license": "Apache-2.0"}, "unsure": {"license": ""}}
    (bundle / "models" / "datalist.json").write_text(json.dumps({"training": [], "provenance": provenance}))
    assert packaging.unstated_licenses(bundle) == ["CC BY-NC 4.0 (mine, theirs)"]
    assert packaging.unlicensed_sources(bundle) == ["unsure"]
    with caplog.at_level("WARNING", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    named, unknown = caplog.records
    assert "LICENSE does not name the license of data its weights learnt from: CC BY-NC 4.0 (mine, theirs)" in \
        named.getMessage()
    assert "the weights learnt from source(s) unsure, whose license is not stated" in unknown.getMessage()

    (bundle / "LICENSE").write_text("Apache-2.0; weights: CC BY-NC 4.0 (My Lab 2026)\n")
    assert packaging.unstated_licenses(bundle) == []
    (bundle / "models" / "datalist.json").write_text(json.dumps({"training": []}))  # made before provenance
    assert packaging.unstated_licenses(bundle) == []


def test_pack_reads_the_datalist_once_for_all_its_checks(tmp_path, monkeypatch, caplog):
    from nucleiseg_monai import sources

    bundle = _bundle(tmp_path / "b")
    datalist = bundle / "models" / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "/home/me/a.tif"}], "provenance": {
        "mine": {"license": "CC BY-NC 4.0", "commercial_use": False}, "unsure": {"license": ""}}}))
    reads = []
    read = sources.read_record
    monkeypatch.setattr(sources, "read_record", lambda path: reads.append(Path(path)) or read(path))
    with caplog.at_level("INFO", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    said = caplog.text  # each check that reads the datalist said what it found
    assert "CC BY-NC 4.0 (mine)" in said and "source(s) unsure" in said and "/home/me/a.tif" in said
    assert "non-commercial data (mine)" in said
    assert reads.count(datalist.resolve()) == 1  # pack reads the bundle by its resolved path


def test_weights_fine_tuned_from_others_carry_the_terms_of_the_data_those_learnt_from(tmp_path, caplog):
    from nucleiseg_monai.sources import record_start

    shipped = tmp_path / "shipped" / "models"  # a bundle's weights that learnt from non-commercial data
    shipped.mkdir(parents=True)
    (shipped / "model.pt").write_bytes(b"w")
    (shipped.parent / "configs").mkdir()
    (shipped.parent / "configs" / "metadata.json").write_text(json.dumps({"name": "Shipped U-Net", "version": "1.2"}))
    (shipped / "datalist.json").write_text(json.dumps({"provenance": {
        "cryonuseg": {"license": "CC BY-NC-SA 4.0", "commercial_use": False}}}))
    mine = {"sources": {}, "training": [], "provenance": {"mine": {"license": "CC0-1.0", "commercial_use": True}}}
    run = tmp_path / "run" / "models"
    run.mkdir(parents=True)
    record_start(mine, run, str(shipped / "model.pt"), "false")
    recorded = json.loads((run / "datalist.json").read_text())
    assert recorded["started_from"] == {"weights": "Shipped U-Net 1.2", "sha256": sha256_file(shipped / "model.pt"),
                                        "started_from": None,
                                        "provenance": {"cryonuseg": {"license": "CC BY-NC-SA 4.0",
                                                                     "commercial_use": False}}}
    (run / "model.pt").write_bytes(b"w2")
    again = tmp_path / "again" / "models"  # a second fine-tune, from the first: the chain goes on
    again.mkdir(parents=True)
    record_start(mine, again, str(run / "model.pt"), False)
    bundle = _bundle(tmp_path / "b")
    (bundle / "models" / "datalist.json").write_text((again / "datalist.json").read_text())
    # a bundle's weights by its name, others by the file's; each with its digest's first digits, as names repeat
    through = f"cryonuseg (through Shipped U-Net 1.2, sha256 {sha256_file(shipped / 'model.pt')[:12]})"
    first = f"mine (through model.pt, sha256 {sha256_file(run / 'model.pt')[:12]})"
    assert list(packaging._provenance(bundle)) == ["mine", first, through]
    assert packaging.non_commercial_sources(bundle) == [through]
    (bundle / "LICENSE").write_text("CC0-1.0\n")
    assert packaging.unstated_licenses(bundle) == [f"CC BY-NC-SA 4.0 ({through})"]
    with caplog.at_level("INFO", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    assert f"does not name the license of data its weights learnt from: CC BY-NC-SA 4.0 ({through})" in caplog.text
    assert f"the weights learnt from non-commercial data ({through}): not for commercial use" in caplog.text

    for _ in range(3):  # fine-tuned again and again in its own folder: the first start's terms stay
        record_start(mine, run, str(run / "model.pt"), False)
    (bundle / "models" / "datalist.json").write_text((run / "datalist.json").read_text())
    assert packaging.non_commercial_sources(bundle) == [through]
    assert list(packaging._provenance(bundle)) == ["mine", first, through]
    (again / "model.pt").write_bytes(b"w3")  # other weights of the same file name stay apart in the chain
    third = tmp_path / "third" / "models"
    third.mkdir(parents=True)
    record_start(mine, third, str(again / "model.pt"), False)
    (bundle / "models" / "datalist.json").write_text((third / "datalist.json").read_text())
    second = f"mine (through model.pt, sha256 {sha256_file(again / 'model.pt')[:12]})"
    assert list(packaging._provenance(bundle)) == ["mine", second, first, through]
    for malformed in ({"provenance": ["a list"]}, {"provenance": {"mine": "CC0"}}, {"started_from": "x"}):
        (bundle / "models" / "datalist.json").write_text(json.dumps(malformed))  # read, never a crash
        assert packaging.non_commercial_sources(bundle) == [] and packaging.unstated_licenses(bundle) == []

    record_start(mine, again, None, True)  # a resumed run keeps its record
    assert "started_from" in json.loads((again / "datalist.json").read_text())
    record_start(mine, again, None, False)  # a run from scratch owes nothing to others' weights
    assert "started_from" not in json.loads((again / "datalist.json").read_text())
    (tmp_path / "loose.pt").write_bytes(b"w")
    with caplog.at_level("WARNING"):
        record_start(mine, again, str(tmp_path / "loose.pt"), False)
    assert f"no datalist.json beside the pretrained weights {tmp_path / 'loose.pt'}" in caplog.text
    (bundle / "models" / "datalist.json").write_text((again / "datalist.json").read_text())
    caplog.clear()
    with caplog.at_level("WARNING", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    assert f"the weights started from loose.pt, sha256 {sha256_file(tmp_path / 'loose.pt')[:12]}, whose training " \
        "data is not recorded" in caplog.text
    # a datalist written when the weights were recorded by their absolute path reads as it did
    old = {"provenance": {}, "started_from": {"weights": "/home/me/shipped/models/model.pt",
                                              "provenance": {"cryonuseg": {"commercial_use": False}}}}
    (bundle / "models" / "datalist.json").write_text(json.dumps(old))
    assert packaging.non_commercial_sources(bundle) == ["cryonuseg (through /home/me/shipped/models/model.pt)"]


def test_a_run_and_its_pack_name_no_folder_of_the_weights_it_started_from(tmp_path):
    from nucleiseg_monai.sources import record_start

    private = tmp_path / "alice_private" / "lab_runs"  # folder names pack must not publish
    private.mkdir(parents=True)
    (private / "start.pt").write_bytes(b"starting weights")
    older = {"weights": str(private / "older" / "first.pt"),  # recorded by path, as datalists did before
             "provenance": {"first": {"license": "CC0-1.0"}}}
    (private / "datalist.json").write_text(json.dumps({"provenance": {"theirs": {"license": "CC0-1.0"}},
                                                       "started_from": older}))
    bundle = _bundle(tmp_path / "b")
    record_start({"training": [], "provenance": {"mine": {"license": "Apache-2.0"}}}, bundle / "models",
                 str(private / "start.pt"))
    text = (bundle / "models" / "datalist.json").read_text()
    # the path, and the folder names in it that are no common word (pytest's tmp_path: /tmp/pytest-of-<user>/...)
    secrets = [str(private), "alice_private", "lab_runs", tmp_path.name, tmp_path.parents[1].name]
    assert [part for part in secrets if part in text] == []
    started = json.loads(text)["started_from"]
    # sha256sum of a file holding b"starting weights"
    assert started["sha256"] == "c2135702ceec0ba5213bc243183dc48f4b0b4e7f646b9bd9cac0095ab243abfa"
    assert started["weights"] == "start.pt" and started["started_from"]["weights"] == "first.pt"
    assert list(packaging._provenance(bundle)) == ["mine", "theirs (through start.pt, sha256 c2135702ceec)",
                                                   "first (through first.pt)"]
    assert packaging.local_paths(bundle) == {}
    with zipfile.ZipFile(pack(bundle, tmp_path / "b.zip")) as zf:
        leaks = [(info.filename, part) for info in zf.infolist() for part in secrets
                 if part.encode() in zf.read(info)]
    assert leaks == []


def test_a_received_datalist_of_any_shape_beside_the_starting_weights_is_read_or_named_never_a_crash(tmp_path,
                                                                                                       caplog):
    from nucleiseg_monai.sources import MAX_STARTS, record_start

    weights = tmp_path / "received" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"w")
    # deeper than Python's JSON reader goes (and its writer: so built as text)
    deep = '{"weights": "/home/bob/model.pt", "started_from": ' * 2000 + '{"weights": "C:first.pt"}' + "}" * 2000
    bundle = _bundle(tmp_path / "b")
    for text, why in (("{not json", "Expecting property name"), ("[1, 2]", "a JSON list"),
                      (deep, "maximum recursion depth")):
        (weights.parent / "datalist.json").write_text(text)
        caplog.clear()
        with caplog.at_level("WARNING", logger="nucleiseg_monai.sources"):
            record_start({"training": []}, bundle / "models", str(weights))
        assert f"{weights.parent / 'datalist.json'}, beside the pretrained weights, is no datalist" in caplog.text
        assert why in caplog.text
        assert json.loads((bundle / "models" / "datalist.json").read_text())["started_from"]["provenance"] is None
    (bundle / "models" / "datalist.json").write_text(deep)
    assert packaging.local_paths(bundle) == {} and packaging.non_commercial_sources(bundle) == []

    chain = {"weights": "C:first.pt", "provenance": {"theirs": {"license": "CC0-1.0"}}}
    for level in range(3):  # inherited: each level keeps only its file's name, a drive's letter gone too
        chain = {"weights": f"/home/bob/run{level}/model.pt", "provenance": {}, "started_from": chain}
    (weights.parent / "datalist.json").write_text(json.dumps({"provenance": {}, "started_from": chain}))
    record_start({"training": []}, bundle / "models", str(weights))
    assert packaging.local_paths(bundle) == {}
    names, start = [], json.loads((bundle / "models" / "datalist.json").read_text())["started_from"]
    while start is not None:
        names.append(start["weights"])
        start = start.get("started_from")
    assert names == ["model.pt"] * 4 + ["first.pt"]
    long = {"weights": "w.pt", "provenance": {}}
    for _ in range(MAX_STARTS + 10):
        long = {"weights": "w.pt", "provenance": {}, "started_from": long}
    (weights.parent / "datalist.json").write_text(json.dumps({"provenance": {}, "started_from": long}))
    record_start({"training": []}, bundle / "models", str(weights))  # kept to the levels provenance_chain reads
    start, depth = json.loads((bundle / "models" / "datalist.json").read_text())["started_from"], 0
    while start is not None:
        depth, start = depth + 1, start.get("started_from")
    assert depth == MAX_STARTS


def test_pack_names_the_local_folders_a_datalist_would_publish(tmp_path, caplog):
    bundle = _bundle(tmp_path / "b")
    datalist = {
        "sources": {"mine": {"root": "/home/alice/hospital_x"}, "shared": {"root": "cryonuseg"},
                    "win": {"root": "D:\\scans"}},
        "training": [{"image": "/data/case_17/tile.png", "label": "labels/tile.png"}, "not a record"],
        "validation": [{"image": "images/v.png", "label": "~/labels/v.png"}],
        # written before weights were named by bundle and digest: the old start still shows, at any depth
        "started_from": {"weights": "Shipped U-Net 1.2",
                         "started_from": {"weights": "/home/alice/runs/first/model.pt"}},
    }
    (bundle / "models" / "datalist.json").write_text(json.dumps(datalist))
    # the sources file a bundle trained on one's own registry keeps beside its configs names the same root
    (bundle / "configs" / "sources.json").write_text(json.dumps({"mine": {"root": "/home/alice/hospital_x"},
                                                                 "shared": {"root": "cryonuseg"}}))
    local = ["/home/alice/hospital_x", "D:\\scans", "/data/case_17/tile.png", "~/labels/v.png",
             "/home/alice/runs/first/model.pt"]
    assert packaging.local_paths(bundle) == {"models/datalist.json": local,
                                             "configs/sources.json": ["/home/alice/hospital_x"]}
    with caplog.at_level("WARNING", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    assert f"{bundle / 'models' / 'datalist.json'} names folders of this machine that the zip will publish: " \
        "/home/alice/hospital_x, D:\\scans, /data/case_17/tile.png and 2 more" in caplog.text
    assert f"{bundle / 'configs' / 'sources.json'} names folders of this machine that the zip will publish: " \
        "/home/alice/hospital_x; if they should stay private" in caplog.text
    assert "in both models/datalist.json and the sources file, which must agree" in caplog.text
    (bundle / "configs" / "sources.json").unlink()
    # a config's own settings written as paths of this machine; its expressions name none as written
    config = json.loads((bundle / "configs" / "train.json").read_text())
    (bundle / "configs" / "train.json").write_text(json.dumps({
        **config, "sources_file": "/tmp/own/sources.json", "pretrained": "~/runs/a/model.pt", "amp_dtype": "auto",
        "data_root": "$@bundle_root + '/../data'", "stats_file": "@ckpt_dir"}))
    assert packaging.local_paths(bundle)["configs/train.json"] == ["/tmp/own/sources.json", "~/runs/a/model.pt"]
    with caplog.at_level("WARNING", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    assert "\"$@bundle_root + '/configs/sources.json'\", or left for the command line" in caplog.text
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    (bundle / "models" / "datalist.json").write_text(json.dumps({"sources": {"s": {"root": "s"}}, "training": []}))
    assert packaging.local_paths(bundle) == {}
    (bundle / "models" / "datalist.json").write_text("[1, 2]")  # not a datalist: nothing to name, no crash
    assert packaging.local_paths(bundle) == {}


def test_pack_names_a_copy_that_still_presents_itself_as_the_bundle_its_weights_started_from(tmp_path, caplog):
    bundle = _bundle(tmp_path / "b")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    shipped = f"{meta['name']} {meta['version']}"
    (bundle / "models" / "datalist.json").write_text(json.dumps({"started_from": {"weights": shipped}}))
    assert packaging.claims_its_start(bundle) == shipped
    with caplog.at_level("WARNING", logger="nucleiseg_monai.packaging"):
        pack(bundle, tmp_path / "b.zip")
    assert f"still names the bundle {shipped}, whose weights these were trained from" in caplog.text
    meta["version"] = "0.1.0"  # its own version: nothing to say
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert packaging.claims_its_start(bundle) is None
    (bundle / "models" / "datalist.json").write_text(json.dumps({"started_from": "model.pt"}))  # no mapping
    assert packaging.claims_its_start(bundle) is None


@pytest.mark.parametrize("path, local", [
    ("/home/a/x", True), ("\\\\server\\share\\x", True), ("//server/share", True), ("c:/x", True),
    ("C:relative", True), ("D:scans\\t.png", True), ("~/data", True), ("~alice/data", True),
    ("../../home/alice/data", True), ("images\\..\\..\\x.png", True),
    ("images/t.png", False), ("cryonuseg", False), ("~$lock.png", False), ("s3://bucket/t.png", False),
    ("a..b.png", False), (None, False),
])
def test_local_paths_are_those_that_name_folders_of_the_machine(path, local):
    from nucleiseg_monai.sources import is_local_path

    assert is_local_path(path) is local


def test_pack_warns_without_a_license_and_writes_into_a_folder_it_is_given(tmp_path, caplog):
    bundle = _bundle(tmp_path / "b")
    (bundle / "LICENSE").unlink()
    (tmp_path / "out").mkdir()
    with caplog.at_level("WARNING", logger="nucleiseg_monai.packaging"):
        assert pack(bundle, tmp_path / "out") == tmp_path / "out" / "b.zip"
    assert "has no LICENSE: receivers cannot know the terms of its weights" in caplog.text
    (bundle / "models" / "datalist.json").write_text(json.dumps({"provenance": {"mine": {"license": "CC BY 4.0"}}}))
    assert packaging.unstated_licenses(bundle) == ["CC BY 4.0 (mine)"]  # no LICENSE names none of them


def test_refusals_list_each_problem_on_one_line_and_code_in_any_case_is_code(tmp_path):
    bundle = _bundle(tmp_path / "b")
    (bundle / "tifffile.PY").write_text("print('imported where names ignore case')\n")
    (bundle / "numpy").mkdir()
    with pytest.raises(ValueError, match=r"tifffile\.PY: not a bundle file"):
        pack(bundle, tmp_path / "b.zip")
    err = BundleIntegrityError("b.zip", ["numpy/: folder not in manifest.json", "tifffile.PY: not a bundle file"],
                               "Refusing it.")
    assert str(err) == ("b.zip failed verification (2 problem(s)): numpy/: folder not in manifest.json; "
                        "tifffile.PY: not a bundle file. Refusing it.")


def test_unpack_round_trip(packed, tmp_path):
    bundle, zip_path = packed
    dest = unpack(zip_path, tmp_path / "installed" / "tiny", sha256=sha256_file(zip_path))
    assert dest == tmp_path / "installed" / "tiny"
    assert verify(dest) == []
    check_bundle(dest)
    for relpath in PACKED:
        assert filecmp.cmp(bundle / relpath, dest / relpath, shallow=False), relpath
    assert packaging.bundle_files(dest) == sorted(PACKED)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]  # the temporary folder was renamed away
    assert dest.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_unpack_refuses_a_zip_with_a_changed_config(packed, tmp_path):
    _, zip_path = packed
    with zipfile.ZipFile(zip_path) as zf:
        config = bytearray(zf.read("tiny_bundle/configs/train.json"))
    config[10] ^= 0x01
    tampered = tmp_path / "tampered.zip"
    _rewrite_zip(zip_path, tampered, {"tiny_bundle/configs/train.json": bytes(config)})

    assert [p.split(":")[0] for p in verify(tampered)] == ["configs/train.json"]
    dest = tmp_path / "installed" / "tiny"
    with pytest.raises(BundleIntegrityError, match="configs/train.json") as err:
        unpack(tampered, dest)
    assert [p.split(":")[0] for p in err.value.problems] == ["configs/train.json"]
    assert not dest.exists()
    assert not (tmp_path / "installed").exists()  # nothing half-extracted, and no folder made for it left either


def test_unpack_refuses_a_wrong_published_digest(packed, tmp_path):
    _, zip_path = packed
    with pytest.raises(BundleIntegrityError, match="sha256"):
        unpack(zip_path, tmp_path / "tiny", sha256="0" * 64)
    assert not (tmp_path / "tiny").exists()


def test_verify_lists_changed_added_and_missing_files_but_not_outputs(packed, tmp_path):
    _, zip_path = packed
    dest = unpack(zip_path, tmp_path / "tiny")
    # what training and evaluation write does not matter
    (dest / "models" / "checkpoint_last.pt").write_bytes(b"new optimizer state")
    (dest / "runs").mkdir()
    (dest / "runs" / "events").write_bytes(b"log")
    (dest / "eval").mkdir()
    (dest / "eval" / "report.csv").write_text("aji\n")
    (dest / "models" / "model.ts").write_bytes(b"TorchScript made by ckpt_export")  # derived from model.pt
    assert verify(dest) == []

    train = dest / "configs" / "train.json"
    train.write_bytes(train.read_bytes().replace(b" ", b"\t", 1))  # same size, other content
    (dest / "configs" / ".hidden.json").write_text("{}")  # configs are code: even hidden files count
    (dest / "models" / "extra.pt").write_bytes(b"unlisted weights")
    (dest / "docs" / "README.md").unlink()
    problems = verify(dest)
    assert sorted(p.split(":")[0] for p in problems) == [
        "configs/.hidden.json",
        "configs/train.json",
        "docs/README.md",
        "models/extra.pt",
    ]
    assert "docs/README.md: missing" in problems
    with pytest.raises(BundleIntegrityError, match="configs/train.json"):
        check_bundle(dest)

    # a deliberate change is sealed again
    (dest / "configs" / ".hidden.json").unlink()
    packaging.write_manifest(dest)
    assert verify(dest) == []
    check_bundle(dest)


@pytest.mark.parametrize(
    "evil", ["../evil.json", "tiny_bundle/../../evil.json", "/tmp/evil.json", "tiny_bundle\\..\\evil"]
)
def test_unpack_refuses_paths_that_escape(packed, tmp_path, evil):
    _, zip_path = packed
    bad = tmp_path / "bad.zip"
    shutil.copy(zip_path, bad)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr(zipfile.ZipInfo(evil), b'{"_target_": "os.system"}')
    dest = tmp_path / "a" / "b" / "tiny"
    with pytest.raises(BundleIntegrityError, match="unsafe path"):
        unpack(bad, dest)
    assert not dest.exists()
    assert not list(tmp_path.rglob("evil*"))
    assert any("unsafe path" in p for p in verify(bad))


def test_unpack_refuses_a_symlink_member(packed, tmp_path):
    _, zip_path = packed
    bad = tmp_path / "bad.zip"
    shutil.copy(zip_path, bad)
    link = zipfile.ZipInfo("tiny_bundle/configs/link.json")
    link.external_attr = (0o120777 << 16)  # S_IFLNK
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(BundleIntegrityError, match="symbolic link"):
        unpack(bad, tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists()


def test_missing_manifest_is_a_clear_error(packed, tmp_path):
    bundle, zip_path = packed
    stripped = tmp_path / "stripped.zip"
    _rewrite_zip(zip_path, stripped, {"tiny_bundle/manifest.json": None})
    with pytest.raises(FileNotFoundError, match="no tiny_bundle/manifest.json"):
        unpack(stripped, tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists()
    with pytest.raises(FileNotFoundError, match="no tiny_bundle/manifest.json"):
        verify(stripped)
    with pytest.raises(FileNotFoundError, match=r"manifest.json is missing.*write_manifest"):
        verify(bundle)
    check_bundle(bundle)  # a working copy without a manifest is not checked


def test_manifest_cannot_list_paths_outside_the_bundle(packed, tmp_path):
    _, zip_path = packed
    with zipfile.ZipFile(zip_path) as zf:
        manifest = json.loads(zf.read("tiny_bundle/manifest.json"))
    evil = copy.deepcopy(manifest)
    evil["files"]["../../outside.json"] = "0" * 64
    forged = tmp_path / "forged.zip"
    _rewrite_zip(zip_path, forged, {"tiny_bundle/manifest.json": json.dumps(evil).encode()})
    with pytest.raises(ValueError, match="unsafe or malformed"):
        unpack(forged, tmp_path / "tiny")
    assert not (tmp_path / "tiny").exists()


def test_pack_needs_metadata_and_weights(tmp_path):
    bundle = _bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        pack(bundle, tmp_path / "b.zip")
    torch.save({}, bundle / "models" / "model.pt")
    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        pack(bundle, tmp_path / "b.zip")
    assert not (tmp_path / "b.zip").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


class _Payload:
    """Unpickling this runs code (it touches a file): what a checkpoint from an unknown source could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_weights_refuses_a_checkpoint_that_carries_objects(tmp_path):
    net = UNet(features=(4, 8))
    marker = tmp_path / "code_ran"
    torch.save({"network": net.state_dict(), "extra": _Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError, match="holds pickled objects besides tensors") as refused:
        load_weights(UNet(features=(4, 8)), tmp_path / "model.pt")
    assert not marker.exists()
    assert "weights_only set to False will likely succeed" not in str(refused.value)  # torch's advice, not ours

    torch.save({"network": net.state_dict()}, tmp_path / "plain.pt")  # the same weights as data load fine
    loaded = load_weights(UNet(features=(4, 8)), tmp_path / "plain.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_unpack_into_an_existing_folder_creates_the_bundle_folder_in_it(packed, tmp_path):
    _, zip_path = packed
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    dest = unpack(zip_path, bundles)
    assert dest == bundles / "tiny_bundle" and verify(dest) == []
    (dest / "runs").mkdir()
    (dest / "runs" / "old_run").write_text("log")

    with pytest.raises(FileExistsError, match=r"tiny_bundle already exists.*--overwrite"):
        unpack(zip_path, bundles)
    assert unpack(zip_path, bundles, overwrite=True) == dest
    assert verify(dest) == [] and not (dest / "runs").exists()  # replaced whole
    assert unpack(zip_path, dest, overwrite=True) == dest  # a bundle folder as --dest is the target, not a parent
    assert sorted(p.name for p in bundles.iterdir()) == ["tiny_bundle"]
    assert unpack(zip_path, f"{tmp_path / 'new'}/") == tmp_path / "new" / "tiny_bundle"  # "into", said by the "/"

    other = tmp_path / "home"
    (other / "tiny_bundle").mkdir(parents=True)
    (other / "tiny_bundle" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a bundle folder"):
        unpack(zip_path, other, overwrite=True)  # --overwrite replaces bundles only
    assert (other / "tiny_bundle" / "notes.txt").read_text() == "mine"


def test_cli_pack_prints_the_sha256_that_unpack_takes(packed, tmp_path, capsys):
    from nucleiseg_monai.cli import main

    bundle, _ = packed
    zip_path = tmp_path / "out" / "tiny.zip"
    assert main(["pack", "--bundle", str(bundle), "--output", str(zip_path)]) == 0
    printed = capsys.readouterr().out
    digest = sha256_file(zip_path)
    assert f"sha256 {digest}" in printed and f"--sha256 {digest}" in printed
    assert main(["pack", "--bundle", str(bundle), "--output", str(zip_path)]) == 2  # a published zip stays
    assert sha256_file(zip_path) == digest
    # pasted as sha256sum prints it, digest and file name
    assert main(["unpack", "--zip", str(zip_path), "--dest", str(tmp_path), "--sha256", f"{digest}  tiny.zip"]) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == f"unpacked and verified: {tmp_path / 'tiny_bundle'}"
    assert second.startswith("intact, which is not trusted")
    assert main(["unpack", "--zip", str(zip_path), "--dest", str(tmp_path / "b" / "c"), "--sha256", "0" * 64]) == 2
    assert not (tmp_path / "b").exists()
    assert main(["unpack", "--zip", str(zip_path), "--dest", str(tmp_path / "d"), "--sha256", "abc"]) == 2
    assert not (tmp_path / "d").exists()


def test_cli_verify_of_a_working_copy_says_what_it_checked(tmp_path, capsys):
    from nucleiseg_monai.cli import main

    bundle = _bundle(tmp_path / "tiny_bundle")
    assert main(["verify", "--bundle", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert "no manifest.json" in printed and "working copy" in printed
    assert f"nucleiseg pack --bundle {bundle} --output tiny_bundle.zip" in printed

    (bundle / "imageio").mkdir()
    (bundle / "imageio" / "__init__.py").write_text("")
    (bundle / "models" / "model.pt").unlink()
    assert main(["verify", "--bundle", str(bundle)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("model.pt is missing: a bundle ships its trained weights; train it first")
    assert lines[1].startswith("imageio/: folder not in manifest.json")
    assert lines[2] == "2 problem(s): fix them before packing this working copy"


def test_share_commands_have_help_text():
    from nucleiseg_monai.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    for name in ("pack", "verify", "unpack"):
        assert helps[name], name
        assert all(a.help for a in sub.choices[name]._actions), name


def test_readme_sharing_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Every `nucleiseg` line of the README's "Sharing a bundle" block, in order, on a copy of the small bundle."""
    import shlex

    from nucleiseg_monai.cli import main

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Sharing a bundle", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("nucleiseg ")]
    assert [c.split()[1] for c in commands][:2] == ["pack", "unpack"]
    shutil.copytree(SOURCE, tmp_path / "bundles" / SOURCE.name, ignore=shutil.ignore_patterns(
        *packaging.OUTPUT_FOLDERS, "__pycache__", "checkpoint_*", ".*"))
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    assert "working copy" in capsys.readouterr().out
    assert verify(tmp_path / "received" / SOURCE.name) == []
