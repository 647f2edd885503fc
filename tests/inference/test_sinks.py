"""The sink interface: a sink of one's own gets every pixel once, alone or in shares; the table of outputs."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import rasterio
import torch

from geobp.inference import predict_raster
from geobp.choices import Probabilities
from geobp.inference.options import PredictOptions
from geobp.inference.parts import PartSink, remove_parts, share_rows, write_from_parts
from geobp.inference.predict import open_job, predict_share
from geobp.inference.sinks import SINKS, OutputLayout, OutputSink, class_ids, output_paths, output_sinks
from tests.inference.test_parts import small_cnn
from tests.inference.test_predict import PRE, Exploding, conv_model, make_image


class ChecksumSink:
    """A format of one's own: the class ids and a count band, with a CRC per written block.

    It records what the interface promises: opened once before any write, blocks in row order,
    every pixel written exactly once, then committed (or aborted).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.events: list[str] = []
        self.crcs: list[int] = []

    def bands(self, layout: OutputLayout) -> int:
        return 2

    def open(self, layout: OutputLayout) -> None:
        self.events.append("open")
        self.count = np.zeros((layout.height, layout.width), np.int64)
        self.ids = np.zeros((layout.height, layout.width), np.uint8)
        self.next_row = 0

    def encode(self, probs, valid):
        ids = class_ids(probs, valid, 255)
        if isinstance(ids, torch.Tensor):
            return torch.cat([ids, torch.ones_like(ids)])
        return np.concatenate([ids, np.ones_like(ids)])

    def write(self, row: int, block: np.ndarray) -> None:
        assert self.events == ["open"] and row == self.next_row
        rows = block.shape[1]
        self.ids[row : row + rows] = block[0]
        self.count[row : row + rows] += block[1]
        self.crcs.append(zlib.crc32(np.ascontiguousarray(block[0]).tobytes()))
        self.next_row = row + rows

    def commit(self) -> None:
        self.events.append("commit")

    def abort(self) -> None:
        self.events.append("abort")


def test_a_sink_of_ones_own_gets_every_pixel_exactly_once(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(90, 70))
    sink = ChecksumSink(tmp_path / "a_checksum.bin")
    assert isinstance(sink, OutputSink)
    dst = predict_raster(conv_model(3), src, tmp_path / "a_classes.tif", PRE, tile_size=32, overlap=8, batch_size=3,
                         progress=False, probabilities="probs", extra_sinks=[sink])
    assert sink.events == ["open", "commit"]
    assert (sink.count == 1).all()
    with rasterio.open(dst) as ds:
        classes = ds.read(1)
    np.testing.assert_array_equal(sink.ids, classes)
    # the blocks, checksummed as they came, are the class map's tile-row strips in order
    grid = open_job(src, PRE, PredictOptions(tile_size=32, overlap=8)).grid
    edges = [*grid.row_offsets, grid.height]
    assert sink.crcs == [zlib.crc32(classes[a:b].tobytes()) for a, b in zip(edges, edges[1:])]
    assert not sink.path.exists()  # it writes no file of its own


def test_a_failed_prediction_aborts_every_sink(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(300, 70))
    sink = ChecksumSink(tmp_path / "a_checksum.bin")
    with pytest.raises(RuntimeError, match="boom in forward"):
        predict_raster(Exploding(after=3), src, tmp_path / "a_classes.tif", PRE, tile_size=16, overlap=8, batch_size=2,
                       progress=False, extra_sinks=[sink])
    assert sink.events == ["open", "abort"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


def test_an_existing_path_of_an_extra_sink_is_refused_before_any_work(tmp_path):
    from geobp.errors import OutputExistsError

    src = make_image(tmp_path / "a.tif")
    sink = ChecksumSink(tmp_path / "a_checksum.bin")
    sink.path.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=r"a_checksum\.bin: output exists"):
        predict_raster(conv_model(), src, tmp_path / "a_classes.tif", PRE, tile_size=16, progress=False, extra_sinks=[sink])
    assert sink.events == []


def test_a_sink_of_ones_own_works_in_shares(tmp_path):
    """Distributed inference wraps any sink in part files: the shares give it the single-process rows."""
    src = make_image(tmp_path / "in.tif", size=(100, 37))
    opts = PredictOptions(tile_size=16, overlap=4, batch_size=5, progress=False)
    model = small_cnn()
    one = ChecksumSink(tmp_path / "one" / "in_checksum.bin")
    predict_raster(model, src, tmp_path / "one" / "in_classes.tif", PRE, opts, extra_sinks=[one])

    job = open_job(src, PRE, opts)
    shares = share_rows(job.grid, 3)
    dst = tmp_path / "many" / "in_classes.tif"
    path = tmp_path / "many" / "in_checksum.bin"
    for share in shares:
        parts = predict_share(model, job, share, [*output_sinks(dst, opts), ChecksumSink(path)], opts)
        assert parts[-1] == PartSink(ChecksumSink(path), job.grid, share).path and parts[-1].exists()
    many = ChecksumSink(path)
    names = [f"class_{i}" for i in range(4)]
    write_from_parts([*output_sinks(dst, opts), many], job.grid, shares, OutputLayout(job.profile, names))
    remove_parts([dst, path], 3)
    assert many.events == ["open", "commit"] and (many.count == 1).all()
    np.testing.assert_array_equal(many.ids, one.ids)
    assert many.crcs == one.crcs  # the same blocks, in the same order
    assert sorted(p.name for p in dst.parent.iterdir()) == ["in_classes.tif"]


def test_every_output_name_has_a_sink_and_a_file_name():
    # a new format is one class and one entry in SINKS; the CLI offers the names of Probabilities
    assert set(SINKS) - {"classes"} == set(get_args(Probabilities)) - {"none"}
    for name in get_args(Probabilities):
        paths = output_paths("out/a_classes.tif", name)
        assert list(paths) == (["classes"] if name == "none" else ["classes", name])
        assert len({p.name for p in paths.values()}) == len(paths)
        sinks = output_sinks("out/a_classes.tif", PredictOptions(probabilities=name))
        assert [s.path for s in sinks] == list(paths.values())
        assert all(isinstance(s, OutputSink) for s in sinks)
    assert output_paths("out/a_classes.tif", "confidence")["confidence"] == Path("out/a_confidence.tif")


@pytest.mark.parametrize("name", sorted(SINKS))
def test_a_geotiff_sink_missing_rows_refuses_to_commit_and_leaves_nothing(tmp_path, name):
    import rasterio.transform

    profile = {"driver": "GTiff", "height": 300, "width": 20, "count": 3, "dtype": "uint16", "crs": "EPSG:32633",
               "transform": rasterio.transform.from_origin(500000.0, 5000000.0, 10.0, 10.0)}
    layout = OutputLayout(profile, ["a", "b", "c"])
    sink = SINKS[name].make(tmp_path / f"x_{name}.tif", PredictOptions(cog=True))
    sink.open(layout)
    rng = np.random.default_rng(0)
    probs = rng.random((3, 280, 20)).astype(np.float32)
    sink.write(0, sink.encode(probs / probs.sum(0), np.ones((280, 20), bool)))
    with pytest.raises(RuntimeError, match=rf"x_{name}\.tif: prediction ended before every row was written"):
        sink.commit()
    assert list(tmp_path.iterdir()) == []
    sink.abort()  # safe after the failure


def test_a_part_missing_rows_refuses_to_commit_and_is_deleted(tmp_path):
    src = make_image(tmp_path / "in.tif", size=(64, 40))
    job = open_job(src, PRE, PredictOptions(tile_size=16, overlap=4))
    share = share_rows(job.grid, 2)[1]
    part = PartSink(ChecksumSink(tmp_path / "out" / "x.bin"), job.grid, share)
    part.open(OutputLayout(job.profile, ["a", "b"]))
    first, _ = share.rows(job.grid)
    part.write(first, np.zeros((2, 4, 40), np.uint8))
    assert part.path.exists()
    with pytest.raises(RuntimeError, match=r"x\.rank1\.part\.npy: the share ended before every row was written"):
        part.commit()
    assert not part.path.exists()
