"""geobp: land-cover segmentation of multi-band GeoTIFFs with PyTorch Lightning."""

__version__ = "0.1.0"
