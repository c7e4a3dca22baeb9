"""ecif-ray: distributed ECIF influence scoring of image-text corpora on Ray."""

__version__ = "0.1.0"
