"""Nuclei instance segmentation of H&E histology with MONAI."""

__version__ = "0.1.0"
