"""Data: scenes on disk, band statistics, tile datasets and samplers, the DataModule."""

from geobp.data.datamodule import GeoTiffDataModule
from geobp.data.dataset import TileDataset, TileSpec
from geobp.data.preprocessing import Preprocessing
from geobp.data.samplers import GridTileSampler, RandomTileSampler

__all__ = ["GeoTiffDataModule", "GridTileSampler", "Preprocessing", "RandomTileSampler", "TileDataset", "TileSpec"]
