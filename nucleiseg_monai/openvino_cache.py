"""OpenVINO models kept on disk between processes.

Making a network into an OpenVINO model (``torch.export``, conversion, and for int8 NNCF's quantisation) takes
seconds to tens of seconds on a CPU, where loading the model it made takes a fraction of a second. Every
``nucleiseg predict``, every cohort worker and every new predictor in a fresh process paid it again. The models
are kept in ``$NUCLEISEG_CACHE_DIR/openvino`` (default ``$XDG_CACHE_HOME/nucleiseg_monai``, else
``~/.cache/nucleiseg_monai``; ``NUCLEISEG_CACHE_DIR=off`` keeps nothing), one folder per key. The key names
everything the model depends on: the network's structure and weights, the precision, the calibration inputs, the
shapes the graph was exported for, and the versions of torch, OpenVINO and NNCF that made it. Nothing is ever
updated in place: a folder is written under a temporary name and renamed (``atomic.staging_folder``), so that
processes sharing the cache see either a whole model or none, and what a killed writer left is removed by the
next one (``atomic.remove_stale``). Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from .atomic import remove_stale, staging_folder

logger = logging.getLogger(__name__)

ENV = "NUCLEISEG_CACHE_DIR"
OFF = ("off", "0", "none", "false")
MODEL = "model.xml"  # OpenVINO's IR: the graph, with its weights beside it in model.bin


def cache_dir() -> Path | None:
    """Where OpenVINO models are kept, or None where ``NUCLEISEG_CACHE_DIR`` turns the cache off."""
    root = os.environ.get(ENV, "").strip()
    if root.lower() in OFF:
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nucleiseg_monai")
    return Path(root) / "openvino"


RUNTIME_LIBRARIES = ("torch", "openvino", "nncf")  # what makes a network into what runs


def library_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def model_key(*parts: str) -> str:
    """A key for the model made from ``parts`` (the caller's description of network, precision and inputs) and
    the versions of the libraries that make it."""
    digest = hashlib.sha256()
    for part in (*parts, *(f"{p}={library_version(p)}" for p in RUNTIME_LIBRARIES)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def load_or_build(key: str | Callable[[], str], build: Callable[[], object]):
    """The OpenVINO model kept under ``key``, else ``build()``'s, which is then kept for the next process.
    ``key`` may be a function that makes it (hashing weights takes time), called only when the cache is on.

    A cache that cannot be read or written costs only the time: the model is built, and one warning says why.
    """
    import openvino as ov

    root = cache_dir()
    if root is None:
        return build()
    folder = root / (key() if callable(key) else key)
    if (folder / MODEL).is_file():
        try:
            return ov.Core().read_model(folder / MODEL)
        except Exception as err:  # a damaged or foreign file: build again and replace it
            logger.warning("could not read the cached OpenVINO model %s (%s); building it again", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    model = build()
    try:
        remove_stale(root)  # what writers killed mid-save left (cohort workers do get killed)
        staging = staging_folder(folder)
        try:
            # compress_to_fp16 would round float32 weights: the kept model must compute what the built one does
            ov.save_model(model, staging / MODEL, compress_to_fp16=False)
            os.rename(staging, folder)
        except (OSError, RuntimeError):  # RuntimeError: OpenVINO's own failure to write
            if not (folder / MODEL).is_file():  # not a process that kept the same model first: a real failure
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, RuntimeError) as err:
        logger.warning("could not keep the OpenVINO model in %s (%s); set %s to a writable folder, or to 'off'",
                       root, err, ENV)
    return model
