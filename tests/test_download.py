import hashlib
import json
import sys
import types
import zipfile
from pathlib import Path

import pytest

from nucleiseg_monai import download as dl
from nucleiseg_monai.synthetic import write_dataset

ANN1 = "Annotator 1 (biologist)"
ANN2 = "Annotator 2 (bioinformatician)"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("src"), n_tiles=3, size=32, n_nuclei=3, seed=2)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _files(root: Path, folder: str) -> dict[str, bytes]:
    return {f"{folder}/{p.name}": p.read_bytes() for p in sorted((root / folder).iterdir())}


def _archive(tmp_path: Path, source: Path, layout: str, name: str = "cryonuseg.zip") -> Path:
    """A zip shaped like a real CryoNuSeg download; other annotators' labels are decoys (not the truth)."""
    images = _files(source, "tissue images")
    labels = {**_files(source, "mask binary"), **_files(source, "label masks modify")}
    decoy = {k: b"not annotator 1" for k in labels}
    members: dict[str, bytes] = {}
    if layout == "flat":
        members = {**images, **labels, "README.txt": b"CryoNuSeg"}
    elif layout == "kaggle":  # the newer archive: images on top, labels per annotator
        members.update(images)
        members.update({f"{ANN1}/{k}": v for k, v in labels.items()})
        members.update({f"{ANN2}/{ANN2}/{k}": v for k, v in decoy.items()})
        members.update({f"{ANN1}/label masks/{Path(k).name}": v for k, v in labels.items() if k.endswith(".tif")})
    elif layout == "nested":  # everything inside the annotator folders, under an extra top folder
        members.update({f"archive/{ANN2}/{k}": v for k, v in {**images, **decoy}.items()})
        members.update({f"archive/{ANN1}/{k}": v for k, v in {**images, **labels}.items()})
    elif layout == "no_labels":
        members.update(images)
    return _zip(tmp_path / name, members)


def _same_as_source(dest: Path, source: Path) -> None:
    for folder in ("tissue images", "mask binary", "label masks modify"):
        assert _files(dest, folder) == _files(source, folder), folder


@pytest.mark.parametrize("layout", ["flat", "kaggle", "nested"])
def test_unpack_gives_flat_layout_with_annotator1_labels(tmp_path, source, layout):
    archive = _archive(tmp_path, source, layout)
    messages = []
    dest = dl.download(tmp_path / "data" / "cryonuseg", archive=archive, log=messages.append)
    assert sorted(p.name for p in dest.iterdir()) == [
        "download.json", "label masks modify", "mask binary", "tissue images"]
    _same_as_source(dest, source)
    assert dl.is_complete(dest)
    manifest = json.loads((dest / "download.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest() and manifest["images"] == 3
    assert "3 images" in messages[-1]
    assert [p.name for p in dest.parent.iterdir()] == ["cryonuseg"]  # no temporary folders left


def test_binary_only_archive(tmp_path):
    source = write_dataset(tmp_path / "src", n_tiles=2, size=32, n_nuclei=2, with_instances=False)
    archive = _zip(tmp_path / "a.zip", {**_files(source, "tissue images"), **_files(source, "mask binary")})
    dest = dl.unpack_archive(archive, tmp_path / "dest")
    assert sorted(p.name for p in dest.iterdir()) == ["download.json", "mask binary", "tissue images"]


def test_second_run_does_nothing(tmp_path, source):
    archive = _archive(tmp_path, source, "kaggle")
    dest = dl.download(tmp_path / "dest", archive=archive)
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    archive.unlink()  # not even read again
    messages = []
    assert dl.download(dest, archive=archive, log=messages.append) == dest
    assert "already holds a complete" in messages[0]
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before


def test_incomplete_archive_leaves_nothing(tmp_path, source):
    archive = _archive(tmp_path, source, "no_labels")
    with pytest.raises(ValueError, match="no 'mask binary' folder"):
        dl.download(tmp_path / "out" / "dest", archive=archive)
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_masks_are_refused(tmp_path, source):
    members = {**_files(source, "tissue images"), **_files(source, "mask binary")}
    members.pop(next(k for k in members if k.startswith("mask binary/")))
    with pytest.raises(ValueError, match="incomplete: 1 files missing"):
        dl.unpack_archive(_zip(tmp_path / "a.zip", members), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_existing_foreign_dest_needs_force(tmp_path, source):
    archive = _archive(tmp_path, source, "flat")
    dest = tmp_path / "dest"
    (dest / "tissue images").mkdir(parents=True)
    (dest / "tissue images" / "Human_Skin_01.tif").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a complete CryoNuSeg copy"):
        dl.download(dest, archive=archive)
    assert (dest / "tissue images" / "Human_Skin_01.tif").read_bytes() == b"x"
    dl.download(dest, archive=archive, force=True)
    _same_as_source(dest, source)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_not_a_zip_names_the_file(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(ValueError, match=r"broken\.zip is not a readable zip"):
        dl.download(tmp_path / "dest", archive=bad)
    assert not (tmp_path / "dest").exists()


def test_crc_failure_names_file_and_member(tmp_path):
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("tissue images/Human_Skin_01.tif", b"A" * 4096)
    data = bytearray(archive.read_bytes())
    data[data.index(b"A" * 64) + 10] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"damaged\.zip is corrupt: member 'tissue images/Human_Skin_01\.tif'"):
        dl.unpack_archive(archive, tmp_path / "dest")


def test_missing_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.zip not found"):
        dl.download(tmp_path / "dest", archive=tmp_path / "nope.zip")


@pytest.mark.parametrize(
    "name", ["../evil.tif", "tissue images/../../evil.tif", "/etc/evil", "C:\\evil.tif", "tissue images\\..\\..\\evil.tif"]
)
def test_path_traversal_refused(tmp_path, source, name):
    members = {**_files(source, "tissue images"), **_files(source, "mask binary"), name: b"evil"}
    archive = _zip(tmp_path / "evil.zip", members)
    with pytest.raises(ValueError, match="refusing to unpack member"):
        dl.unpack_archive(archive, tmp_path / "sub" / "dest")
    assert not (tmp_path / "sub").exists() and not (tmp_path / "evil.tif").exists()


def test_symlink_member_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("tissue images/link.tif")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        dl.verify_archive(archive)


def test_sha256_checked(tmp_path, source):
    archive = _archive(tmp_path, source, "flat")
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="has SHA-256 .* expected 0+"):
        dl.download(tmp_path / "dest", archive=archive, sha256="0" * 64)
    assert not (tmp_path / "dest").exists()
    dl.download(tmp_path / "dest", archive=archive, sha256=good.upper())
    assert dl.is_complete(tmp_path / "dest")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _assert_manual_steps(message: str) -> None:
    for step in ('pip install "nucleiseg-monai[kaggle]"', "Settings > API", "~/.kaggle/kaggle.json",
                 "chmod 600", dl.KAGGLE_URL, "nucleiseg download --dest DIR --archive PATH.zip"):
        assert step in message


def test_the_command_without_kaggle_says_what_to_do_in_lines_not_a_traceback(tmp_path, monkeypatch, no_credentials,
                                                                             capsys):
    from nucleiseg_monai.cli import main

    monkeypatch.setitem(sys.modules, "kaggle", None)
    assert main(["download", "--dest", str(tmp_path / "dest")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nucleiseg download: ") and "Traceback" not in err
    _assert_manual_steps(err)


def test_without_kaggle_or_credentials_explains_what_to_do(tmp_path, monkeypatch, no_credentials):
    monkeypatch.setitem(sys.modules, "kaggle", None)  # import kaggle -> ImportError
    with pytest.raises(dl.KaggleUnavailableError) as err:
        dl.download(tmp_path / "dest")
    assert "`kaggle` package is not installed" in str(err.value) and "no Kaggle API credentials" in str(err.value)
    _assert_manual_steps(str(err.value))
    assert not (tmp_path / "dest").exists()


def test_kaggle_installed_but_no_credentials(tmp_path, monkeypatch, no_credentials):
    monkeypatch.setitem(sys.modules, "kaggle", types.ModuleType("kaggle"))
    with pytest.raises(dl.KaggleUnavailableError) as err:
        dl.download(tmp_path / "dest")
    assert "not installed" not in str(err.value) and "no Kaggle API credentials" in str(err.value)
    _assert_manual_steps(str(err.value))


def test_credentials_found_in_token_file(tmp_path, no_credentials):
    token = tmp_path / "home" / ".kaggle" / "kaggle.json"
    token.parent.mkdir(parents=True)
    token.write_text('{"username": "u", "key": "k"}')
    assert dl.kaggle_credentials() == str(token)


def _fake_kaggle(monkeypatch, tmp_path, source, fail: bool = False) -> list:
    calls = []

    class Api:
        def dataset_download_files(self, dataset, path, unzip, quiet):
            calls.append((dataset, Path(path), unzip))
            if fail:
                raise OSError("403 Forbidden")
            _archive(Path(path), source, "kaggle", name="segmentation-of-nuclei-in-cryosectioned-he-images.zip")

    module = types.ModuleType("kaggle")
    module.api = Api()
    monkeypatch.setitem(sys.modules, "kaggle", module)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    return calls


def test_kaggle_download_end_to_end(tmp_path, monkeypatch, source, no_credentials):
    calls = _fake_kaggle(monkeypatch, tmp_path, source)
    dest = dl.download(tmp_path / "data" / "cryonuseg")
    assert calls[0][0] == "ipateam/segmentation-of-nuclei-in-cryosectioned-he-images" and calls[0][2] is False
    assert calls[0][1].parent == tmp_path / "data"  # downloaded beside dest, not into /tmp
    _same_as_source(dest, source)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cryonuseg"]
    dl.download(dest)  # complete: no second download
    assert len(calls) == 1


def test_kaggle_failure_keeps_dest_clean(tmp_path, monkeypatch, source, no_credentials):
    _fake_kaggle(monkeypatch, tmp_path, source, fail=True)
    with pytest.raises(RuntimeError, match="403 Forbidden") as err:
        dl.download(tmp_path / "data" / "cryonuseg")
    _assert_manual_steps(str(err.value))
    assert list((tmp_path / "data").iterdir()) == []
