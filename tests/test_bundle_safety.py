"""A bundle holds no Python and cannot shadow installed modules; a sealed bundle is verified before its configs run;
hostile zips (bombs, lying sizes) are refused before anything is written."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from nucleiseg_monai import atomic, packaging
from nucleiseg_monai.bundle import guard
from nucleiseg_monai.packaging import BundleIntegrityError, pack, unpack, verify, write_manifest


def _bundle(root: Path, weights: bytes = b"weights", config: dict | None = None) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0"}))
    (root / "configs" / "inference.json").write_text(json.dumps(config or {"run": []}))
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(weights)
    (root / "LICENSE").write_text("Apache-2.0\n")
    return root


@pytest.fixture
def no_writes(monkeypatch):
    """Fails the test if unpack creates its temporary folder: hostile zips must be refused before any write."""

    def refuse(*args, **kwargs):
        raise AssertionError("unpack started writing")

    monkeypatch.setattr(packaging, "staging_folder", refuse)


# --- a bundle holds no code --------------------------------------------------------------------------------------


def test_verify_refuses_code_added_to_an_unpacked_bundle_naming_it(tmp_path):
    zip_path = pack(_bundle(tmp_path / "src" / "tiny"), tmp_path / "tiny.zip")
    dest = unpack(zip_path, tmp_path / "installed")
    assert dest == tmp_path / "installed"
    (dest / "runs").mkdir()  # outputs stay allowed
    (dest / "runs" / "events").write_bytes(b"log")
    (dest / "eval").mkdir()
    (dest / "predictions").mkdir()
    assert verify(dest) == []

    (dest / "imageio").mkdir()
    (dest / "imageio" / "__init__.py").write_text("import os; os.system('echo pwned')\n")
    (dest / "tifffile.py").write_text("")
    (dest / "models" / "helper.py").write_text("")
    (dest / "configs" / "__pycache__").mkdir()
    (dest / "empty_package").mkdir()  # a folder is importable even when empty (namespace package)
    problems = verify(dest)
    assert sorted(p.split(":")[0] for p in problems) == [
        "configs/__pycache__/",
        "empty_package/",
        "imageio/",
        "models/helper.py",
        "tifffile.py",
    ]
    with pytest.raises(BundleIntegrityError, match="imageio/"):
        packaging.check_bundle(dest)


def test_pack_refuses_code_and_a_manifest_cannot_list_it(tmp_path):
    bundle = _bundle(tmp_path / "tiny")
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "hook.py").write_text("print('hi')\n")
    with pytest.raises(ValueError, match="scripts/"):
        pack(bundle, tmp_path / "tiny.zip")
    assert packaging.working_copy_problems(bundle) == [
        "scripts/: folder not in manifest.json (a bundle holds no code: remove it)"
    ]

    # a forged zip whose manifest vouches for a module at the bundle's top
    (bundle / "scripts" / "hook.py").unlink()
    (bundle / "scripts").rmdir()
    zip_path = pack(bundle, tmp_path / "tiny.zip")
    code = b"print('pwned')\n"
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(zip_path) as zin, zipfile.ZipFile(forged, "w") as zout:
        manifest = json.loads(zin.read("tiny/manifest.json"))
        for name in ("imageio/__init__.py", "tifffile.py"):
            manifest["files"][name] = {"sha256": hashlib.sha256(code).hexdigest(), "size": len(code)}
            zout.writestr(f"tiny/{name}", code)
        for info in zin.infolist():
            data = json.dumps(manifest).encode() if info.filename == "tiny/manifest.json" else zin.read(info)
            zout.writestr(info, data)
    with pytest.raises(ValueError, match="unsafe or malformed.*imageio/__init__.py.*tifffile.py"):
        unpack(forged, tmp_path / "installed")
    assert not (tmp_path / "installed").exists()


# --- the guard: first expression of a config's initialize ---------------------------------------------------------


@pytest.fixture
def clean_import_state(monkeypatch):
    """ConfigWorkflow.run and guard change sys.path and sys.meta_path: each test gets copies."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))


def _config(marker: Path, guarded: bool, module: str | None = None) -> dict:
    """Imports, then (guarded) the guard first in initialize, then a run that writes ``marker``; with ``module``,
    the run imports that module and writes which file it came from."""
    what = f"__import__('{module}').__file__" if module else "'ran'"
    return {
        "imports": ["$import pathlib", "$import nucleiseg_monai", "$import nucleiseg_monai.bundle"],
        "initialize": ["$nucleiseg_monai.bundle.guard()"] if guarded else [],
        "run": [f"$pathlib.Path({str(marker)!r}).write_text({what})"],
    }


def _run_in_process(config_file: Path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["monai.bundle", "run", "--config_file", str(config_file)])
    workflow = ConfigWorkflow(config_file=str(config_file), workflow_type=None, logging_file=False)
    workflow.initialize()
    workflow.run()


def test_guard_refuses_an_edited_sealed_bundle_before_the_run(tmp_path, monkeypatch, clean_import_state):
    marker = tmp_path / "ran"
    bundle = _bundle(tmp_path / "tiny", config=_config(marker, guarded=True))
    write_manifest(bundle)
    # its run writes the marker through pathlib, which the guard names unless the sender is trusted
    with pytest.raises(SystemExit, match=r"its configs reach beyond what a bundle needs: .*pathlib"):
        _run_in_process(bundle / "configs" / "inference.json", monkeypatch)
    assert not marker.exists()
    monkeypatch.setenv(packaging.TRUST_ENV, "1")
    _run_in_process(bundle / "configs" / "inference.json", monkeypatch)
    assert marker.read_text() == "ran"  # sealed, unchanged and trusted: it runs
    marker.unlink()

    config = bundle / "configs" / "inference.json"
    config.write_text(config.read_text().replace("'ran'", "'edited'"))
    with pytest.raises(SystemExit) as refused:
        _run_in_process(config, monkeypatch)
    message = str(refused.value)
    assert "\n" not in message
    assert "configs/inference.json" in message and "write_manifest" in message
    assert not marker.exists()


def test_guard_keeps_the_bundle_folder_off_sys_path(tmp_path, monkeypatch, clean_import_state):
    module = "nucleiseg_test_shadow"
    marker = tmp_path / "imported_from"
    for guarded in (False, True):
        bundle = _bundle(tmp_path / f"guarded_{guarded}", config=_config(marker, guarded, module))
        (bundle / module).mkdir()
        (bundle / module / "__init__.py").write_text("")  # a working copy (no manifest): only the path matters
        monkeypatch.delitem(sys.modules, module, raising=False)
        try:
            _run_in_process(bundle / "configs" / "inference.json", monkeypatch)
        except RuntimeError as err:  # MONAI's wrapper of the failed expression
            assert isinstance(err.__cause__, ModuleNotFoundError) and guarded
        if guarded:
            assert not marker.exists()
            assert not any(Path(p or ".").resolve() == bundle for p in sys.path)
        else:  # what the guard prevents: MONAI put the bundle on sys.path and its module was imported
            assert Path(marker.read_text()) == bundle / module / "__init__.py"
            marker.unlink()
            sys.path.remove(str(bundle))
    monkeypatch.delitem(sys.modules, module, raising=False)


def test_guard_verifies_the_bundle_of_the_config_file_argument(tmp_path, clean_import_state):
    bundle = _bundle(tmp_path / "tiny")
    write_manifest(bundle)
    argv = ["monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", "x"]
    assert guard(argv) == [str(bundle)]
    assert guard(["nucleiseg", "predict"]) == []  # in-process runs: the caller verifies
    (bundle / "LICENSE").write_text("changed\n")
    with pytest.raises(SystemExit, match="LICENSE"):
        guard(argv)


def test_a_sealed_bundle_is_hashed_once_per_process_until_a_file_changes(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path / "tiny")
    write_manifest(bundle)
    hashed = []
    real_verify = packaging.verify
    monkeypatch.setattr(packaging, "verify", lambda root, *a, **k: hashed.append(root) or real_verify(root, *a, **k))
    packaging.check_bundle(bundle)
    packaging.check_bundle(bundle)
    assert len(hashed) == 2  # its files changed in the last seconds: a change of the same size could follow unseen
    monkeypatch.setattr(packaging, "RACY_S", -60.0)  # as if they had been written long ago
    for _ in range(3):  # a command reads the configs several times
        packaging.check_bundle(bundle)
    assert len(hashed) == 3
    weights = bundle / "models" / "model.pt"
    old = weights.stat()
    weights.write_bytes(b"WEIGHTS")  # as long as before, its modification time set back
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    with pytest.raises(BundleIntegrityError, match=r"failed verification \(1 problem\(s\)\): models/model.pt"):
        packaging.check_bundle(bundle)
    with pytest.raises(BundleIntegrityError):
        packaging.check_bundle(bundle)  # a refused bundle is refused every time
    assert len(hashed) == 5
    weights.write_bytes(b"weights")
    packaging.check_bundle(bundle)
    (bundle / "configs" / "extra.json").write_text("{}")  # a file added, the others untouched
    with pytest.raises(BundleIntegrityError, match="configs/extra.json: not in manifest.json"):
        packaging.check_bundle(bundle)
    assert len(hashed) == 7


def _monai_run(config_file: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config_file)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_monai_bundle_run_refuses_an_edited_sealed_bundle_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    bundle = _bundle(tmp_path / "tiny", config=_config(marker, guarded=True))
    write_manifest(bundle)
    config = bundle / "configs" / "inference.json"
    config.write_text(config.read_text().replace("'ran'", "'edited'"))
    result = _monai_run(config, tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{bundle} failed verification (1 problem(s)): configs/inference.json")
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_monai_bundle_run_does_not_import_from_the_bundle(tmp_path):
    module = "nucleiseg_test_shadow"
    marker = tmp_path / "imported_from"
    bundle = _bundle(tmp_path / "tiny", config=_config(marker, guarded=True, module=module))
    (bundle / module).mkdir()
    (bundle / module / "__init__.py").write_text("")
    result = _monai_run(bundle / "configs" / "inference.json", tmp_path)
    assert result.returncode != 0
    assert f"No module named '{module}'" in result.stderr
    assert not marker.exists()


# --- hostile zips -------------------------------------------------------------------------------------------------


def test_unpack_refuses_a_listed_member_that_compresses_like_a_bomb(tmp_path, no_writes):
    zeros = bytes(8 << 20)  # deflates about 1000:1
    zip_path = pack(_bundle(tmp_path / "tiny", weights=zeros), tmp_path / "tiny.zip")
    assert zip_path.stat().st_size < 100_000
    with pytest.raises(BundleIntegrityError, match=r"models/model.pt: compressed \d+:1, more than 100:1"):
        unpack(zip_path, tmp_path / "installed")
    assert any("zip bomb" in p for p in verify(zip_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.zip"]


def test_unpack_refuses_a_member_larger_than_its_manifest_says(tmp_path, no_writes):
    zip_path = pack(_bundle(tmp_path / "tiny"), tmp_path / "tiny.zip")
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(zip_path) as zin, zipfile.ZipFile(big, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, os.urandom(3 << 20) if info.filename == "tiny/models/model.pt" else zin.read(info))
    with pytest.raises(BundleIntegrityError, match=rf"models/model.pt: {3 << 20} bytes in the zip, manifest.json says 7"):
        unpack(big, tmp_path / "installed")
    assert not (tmp_path / "installed").exists()


def test_unpack_caps_the_total_size(tmp_path, monkeypatch):
    zip_path = pack(_bundle(tmp_path / "tiny", weights=os.urandom(3 << 20)), tmp_path / "tiny.zip")
    with monkeypatch.context() as m:
        m.setattr(packaging, "staging_folder", lambda *a, **k: pytest.fail("unpack started writing"))
        with pytest.raises(BundleIntegrityError, match="3 MiB in all, more than the cap of 2 MiB"):
            unpack(zip_path, tmp_path / "installed", max_bytes=2 << 20)
        assert any("cap" in p for p in verify(zip_path, max_bytes=2 << 20))
    assert unpack(zip_path, tmp_path / "installed") == tmp_path / "installed"  # the default cap is far larger


def test_unpack_stops_at_the_declared_size_when_the_zip_lies(tmp_path):
    """The central directory says 1000 bytes; the member holds 2 MiB. At most 1000 are read, then it is refused."""
    bundle = _bundle(tmp_path / "tiny", weights=os.urandom(2 << 20))
    manifest = json.loads(write_manifest(bundle).read_text())
    head = (bundle / "models" / "model.pt").read_bytes()[:1000]
    manifest["files"]["models/model.pt"] = {"sha256": hashlib.sha256(head).hexdigest(), "size": 1000}
    liar = tmp_path / "liar.zip"
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as zf:
        for relpath in packaging.bundle_files(bundle):
            zf.write(bundle / relpath, f"tiny/{relpath}")
        zf.writestr("tiny/manifest.json", json.dumps(manifest))
    data, name = bytearray(liar.read_bytes()), b"tiny/models/model.pt"
    central = data.find(b"PK\x01\x02")  # the central directory entry of model.pt: signature, 42 bytes, name
    while data[central + 46 : central + 46 + len(name)] != name:
        central = data.find(b"PK\x01\x02", central + 1)
    data[central + 24 : central + 28] = (1000).to_bytes(4, "little")  # its uncompressed size
    liar.write_bytes(bytes(data))
    with zipfile.ZipFile(liar) as zf:
        assert zf.getinfo("tiny/models/model.pt").file_size == 1000

    with pytest.raises(BundleIntegrityError, match="corrupt"):
        unpack(liar, tmp_path / "installed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liar.zip", "tiny"]


def test_an_interrupted_unpack_leaves_nothing(tmp_path, monkeypatch):
    zip_path = pack(_bundle(tmp_path / "tiny"), tmp_path / "tiny.zip")
    parent = tmp_path / "bundles"
    parent.mkdir()
    copies = []
    real_copy = packaging.copy_hashed

    def interrupted(src, dst, limit):
        copies.append(limit)
        if len(copies) == 2:
            raise KeyboardInterrupt
        return real_copy(src, dst, limit)

    with monkeypatch.context() as m:
        m.setattr(packaging, "copy_hashed", interrupted)
        with pytest.raises(KeyboardInterrupt):
            unpack(zip_path, parent)
    assert list(parent.iterdir()) == []

    # a kill -9 cannot clean up: the next unpack removes what dead unpacks left, and nothing of live ones
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host = atomic.host_name()
    dead = parent / f".tiny.pid{finished.pid}@{host}-abcdefgh.tmp"
    (dead / "configs").mkdir(parents=True)
    alive = parent / f".tiny.pid{os.getpid()}@{host}-efghijkl.tmp"
    alive.mkdir()
    unpack(zip_path, parent)
    assert sorted(p.name for p in parent.iterdir()) == [alive.name, "tiny"]


# --- a bundle says which release of the package it needs -----------------------------------------------------------


def test_a_bundle_for_a_newer_package_is_refused_in_one_line_before_its_configs(tmp_path, monkeypatch,
                                                                                 clean_import_state):
    import nucleiseg_monai

    marker = tmp_path / "ran"
    bundle = _bundle(tmp_path / "tiny", config=_config(marker, guarded=True))
    meta = bundle / "configs" / "metadata.json"
    meta.write_text(json.dumps({"version": "0.1.0", "required_packages_version": {"nucleiseg-monai": "0.3.0"}}))
    monkeypatch.setattr(nucleiseg_monai, "__version__", "0.2.0")
    with pytest.raises(SystemExit, match=r"needs nucleiseg-monai 0\.3\.0 or newer .* this is 0\.2\.0: pip install -U"):
        packaging.check_bundle(bundle)  # what nucleiseg predict, evaluate and tune call first
    with pytest.raises(SystemExit, match="needs nucleiseg-monai 0.3.0"):
        _run_in_process(bundle / "configs" / "inference.json", monkeypatch)  # python -m monai.bundle run
    assert not marker.exists()

    for installed in ("0.3.0", "0.10.1", "0+unknown"):  # the same or newer, or a source tree without a version
        monkeypatch.setattr(nucleiseg_monai, "__version__", installed)
        packaging.check_bundle(bundle)
