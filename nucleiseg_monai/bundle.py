"""Where a bundle lives, so its configs can run from any working directory.

``python -m monai.bundle run training --config_file bundles/X/configs/train.json`` does not tell the config its own
path, and model-zoo bundles assume the working directory is the bundle. Here ``bundle_root`` is read from the
``--config_file`` argument (the folder above ``configs/``), so outputs land in the bundle wherever it is run from.
``--bundle_root DIR`` on the command line overrides it, as in every MONAI bundle.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path


def _config_files(argv: list[str]) -> list[str]:
    for i, arg in enumerate(argv):
        if arg.startswith("--config_file"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
            return [str(p) for p in parsed] if isinstance(parsed, (list, tuple)) else [str(parsed)]
    return []


def bundle_root(argv: list[str] | None = None) -> str:
    """The bundle folder of the first ``--config_file`` given, else the working directory."""
    files = _config_files(sys.argv if argv is None else argv)
    if files:
        config_dir = Path(files[0]).expanduser().resolve().parent
        return str(config_dir.parent if config_dir.name == "configs" else config_dir)
    return os.getcwd()
