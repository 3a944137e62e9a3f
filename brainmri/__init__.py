"""Shared code of the brain MRI classification and segmentation workflow."""

__version__ = "0.1.0"
