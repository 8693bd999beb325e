import hashlib
import io
import json
import os
import time

import numpy as np
import pytest

from nucleiseg_monai import atomic


def test_json_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "report.json"
    assert atomic.write_json_atomic({"aji": np.float32(0.5), "n": 3}, path, default=float) == path
    assert path.read_text() == '{\n  "aji": 0.5,\n  "n": 3\n}\n'

    with pytest.raises(TypeError):  # not serialisable: the old file stays and no temporary is left
        atomic.write_json_atomic({"aji": object()}, path)
    assert json.loads(path.read_text()) == {"aji": 0.5, "n": 3}
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_streamed_copies_are_hashed_and_stop_at_the_limit(tmp_path):
    src, dst = io.BytesIO(b"x" * 10), io.BytesIO()
    with pytest.raises(atomic.StreamTooLong, match="more than 4 bytes"):
        atomic.copy_hashed(src, dst, 4)
    assert dst.getvalue() == b"xxxx"
    assert atomic.copy_hashed(io.BytesIO(b"abcd"), None, 4) == (hashlib.sha256(b"abcd").hexdigest(), 4)

    data = bytes(range(256)) * 5000  # more than one read
    dst = io.BytesIO()
    assert atomic.copy_hashed(io.BytesIO(data), dst) == (hashlib.sha256(data).hexdigest(), len(data))
    assert dst.getvalue() == data
    (tmp_path / "f").write_bytes(data)
    assert atomic.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_files_are_written_and_stale_ones_found_without_posix_only_calls(tmp_path, monkeypatch):
    """Windows has no os.getuid, and Python 3.11-3.12 no os.fchmod there: every write went through both."""
    monkeypatch.delattr(os, "fchmod")
    monkeypatch.delattr(os, "getuid")
    path = atomic.write_json_atomic({"n": 1}, tmp_path / "a.json")
    assert json.loads(path.read_text()) == {"n": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    stale = tmp_path / f".b.json.pid{2**22 + 1}@{atomic.host_name()}-abcd1234.tmp.json"
    stale.write_bytes(b"")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert atomic.remove_stale(tmp_path) == [stale]


def test_a_replace_windows_refuses_for_a_moment_is_tried_again_and_nowhere_else(tmp_path, monkeypatch):
    """An antivirus scanner holding a new file: Windows refuses the replace (WinError 32) until it lets go."""
    real_replace, refusals, waits = os.replace, [], []

    def held_twice(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", held_twice)
    monkeypatch.setattr(atomic.time, "sleep", waits.append)
    monkeypatch.setattr(atomic, "REPLACE_WAITS_S", (0.05, 0.1, 0.25, 0.5, 1.0))  # Windows'
    path = atomic.write_json_atomic({"n": 1}, tmp_path / "a.json")
    assert json.loads(path.read_text()) == {"n": 1} and waits == [0.05, 0.1]
    refusals.clear()
    monkeypatch.setattr(atomic, "REPLACE_WAITS_S", ())  # elsewhere a refusal is no passing hold: raised at once
    with pytest.raises(PermissionError):
        atomic.write_json_atomic({"n": 2}, tmp_path / "a.json")
    assert waits == [0.05, 0.1] and json.loads(path.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left
