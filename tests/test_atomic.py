import json

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
