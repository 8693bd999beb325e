"""Nuclei instance segmentation of H&E histology with MONAI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nucleiseg-monai")  # one version, pyproject.toml's
except PackageNotFoundError:  # a source tree used without `pip install -e .`
    __version__ = "0+unknown"
