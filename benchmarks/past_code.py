"""A module of the package as it was at a past commit, imported beside today's: the "before" of a benchmark that
measures a change against the code it replaced."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_at(commit: str, module: str) -> types.ModuleType:
    """``nucleiseg_monai/<module>.py`` as of ``commit`` (read with ``git show``), imported as
    ``nucleiseg_monai.<module>_<commit[:7]>`` so that its relative imports reach today's package."""
    path = f"nucleiseg_monai/{module}.py"
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    past = types.ModuleType(f"nucleiseg_monai.{module}_{commit[:7]}")
    past.__package__ = "nucleiseg_monai"
    sys.modules[past.__name__] = past  # dataclasses look their module up here
    exec(compile(source, f"{commit[:7]}:{path}", "exec"), past.__dict__)
    return past
