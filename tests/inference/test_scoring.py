"""Scoring class maps against ground truth: `geobp infer --labels`, metrics.json, hand-computed confusion matrices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from geobp.cli import main
from geobp.inference.scoring import confusion_matrix, metrics_from_confusion
from geobp.task import SegmentationTask
from tests.conftest import write_tif

PRE = {"bands": [1, 2, 3], "nodata": 0, "method": "meanstd", "mean": [300.0] * 3, "std": [100.0] * 3, "low": [], "high": []}
NAMES = ["water", "forest", "urban"]


def test_confusion_and_metrics_on_a_hand_computed_example():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 0]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 255]], np.uint8)  # 255: nodata prediction
    conf = confusion_matrix(truth, pred, 3)
    # counted: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0); the ignore label and the nodata pixel count nowhere
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = metrics_from_confusion(conf, NAMES)
    assert m["pixels"] == 6 and m["overall_accuracy"] == pytest.approx(4 / 6)
    water = m["per_class"]["water"]  # tp 1, truth 2, predicted 2
    assert water == pytest.approx({"iou": 1 / 3, "f1": 0.5, "precision": 0.5, "recall": 0.5, "support": 2})
    forest = m["per_class"]["forest"]  # tp 2, truth 2, predicted 3
    assert forest == pytest.approx({"iou": 2 / 3, "f1": 0.8, "precision": 2 / 3, "recall": 1.0, "support": 2})
    assert m["per_class"]["urban"]["recall"] == pytest.approx(0.5) and m["per_class"]["urban"]["precision"] == 1.0
    assert m["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    task = SegmentationTask(encoder="resnet18", in_channels=3, num_classes=3, class_names=NAMES, preprocessing=PRE, tile_size=32)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def test_infer_labels_matches_a_hand_computed_confusion_matrix(tmp_path, make_scene, ckpt):
    img_a, _ = make_scene("a", size=(48, 40), nodata=0, nodata_rows=4)
    img_b, _ = make_scene("b", size=(32, 32), seed=1, transform=from_origin(600000.0, 5000000.0, 10.0, 10.0))
    # ground truth in raw codes (NLCD-style) on each image's grid: 11 water, 41 forest, 21 urban, 0 unlabelled
    rng = np.random.default_rng(3)
    raw = {}
    for img in (img_a, img_b):
        with rasterio.open(img) as src:
            codes = rng.choice(np.array([0, 11, 21, 41], np.uint8), size=src.shape)
            write_tif(tmp_path / "truth" / f"{img.stem}_lc.tif", codes, transform=src.transform)
        raw[img.stem] = codes
    out = tmp_path / "out"
    code = main(["infer", str(img_a), str(img_b), "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu",
                 "--labels", str(tmp_path / "truth"), "--label-map", "{0: 255, 11: 0, 41: 1, 21: 2}"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    lut = {0: None, 11: 0, 41: 1, 21: 2}
    total = [[0] * 3 for _ in range(3)]
    preds = {}
    for stem in ("a", "b"):
        with rasterio.open(out / f"{stem}_classes.tif") as src:
            pred = preds[stem] = src.read(1)
        hand = [[0] * 3 for _ in range(3)]
        for t_code, p in zip(raw[stem].ravel().tolist(), pred.ravel().tolist()):
            t = lut[t_code]
            if t is not None and p < 3:  # 255 in the class map: the image's nodata rows
                hand[t][p] += 1
                total[t][p] += 1
        entry = metrics["rasters"][str(tmp_path / "data" / "images" / f"{stem}.tif")]
        assert entry["confusion"] == hand
        assert entry["label_sources"] == [str(tmp_path / "truth" / f"{stem}_lc.tif")]
    assert (preds["a"][:4] == 255).all() and (preds["a"][4:] < 3).all()  # the nodata rows counted nowhere
    assert metrics["total"]["confusion"] == total
    t = np.array(total, float)
    for i, name in enumerate(NAMES):
        tp, fn, fp = t[i, i], t[i].sum() - t[i, i], t[:, i].sum() - t[i, i]
        assert metrics["total"]["per_class"][name]["iou"] == pytest.approx(tp / (tp + fp + fn))
        assert metrics["total"]["per_class"][name]["recall"] == pytest.approx(tp / (tp + fn))
    assert metrics["total"]["overall_accuracy"] == pytest.approx(np.trace(t) / t.sum())


def test_infer_labels_reports_unmapped_values_and_exits_1(tmp_path, make_scene, ckpt, capsys):
    img, _ = make_scene("a", size=(32, 32))
    write_tif(tmp_path / "lc.tif", np.full((32, 32), 11, np.uint8))
    code = main(["infer", str(img), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--labels", str(tmp_path / "lc.tif")])
    assert code == 1
    err = capsys.readouterr().err
    assert "NOT SCORED" in err and "lc.tif: label values [11] are neither in data.label_map" in " ".join(err.split())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["failed"]


def test_infer_labels_from_polygons_in_another_crs(tmp_path, make_scene, ckpt):
    """Scoring against a GeoPackage in EPSG:3857 with class names: the same counts as the labels drawn by hand."""
    geopandas = pytest.importorskip("geopandas")
    from shapely.geometry import box

    img, _ = make_scene("a", size=(32, 32))  # 500000..500320 E, 4999680..5000000 N, 10 m
    polys = [box(500000, 4999680, 500160, 5000000), box(500160, 4999840, 500320, 5000000)]  # left half, top right quarter
    frame = geopandas.GeoDataFrame({"cover": ["water", "urban"]}, geometry=polys, crs="EPSG:32633").to_crs("EPSG:3857")
    frame.to_file(tmp_path / "truth.gpkg", driver="GPKG")
    out = tmp_path / "out"
    assert main(["infer", str(img), "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu",
                 "--labels", str(tmp_path / "truth.gpkg"), "--label_field", "cover"]) == 0
    truth = np.full((32, 32), 255)
    truth[:, :16] = 0  # water
    truth[:16, 16:] = 2  # urban; the bottom right quarter is outside every polygon: ignored
    with rasterio.open(out / "a_classes.tif") as src:
        pred = src.read(1)
    hand = [[0] * 3 for _ in range(3)]
    for t, p in zip(truth.ravel().tolist(), pred.ravel().tolist()):
        if t != 255:
            hand[t][p] += 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["total"]["confusion"] == hand and metrics["total"]["pixels"] == 32 * 24
    assert metrics["rasters"][str(img)]["label_coverage"] == pytest.approx(0.75)


def test_score_predictions_takes_label_options_for_the_class_maps_classes(tmp_path):
    from geobp.data.labels import LabelOptions
    from geobp.errors import ConfigError
    from geobp.inference.scoring import score_predictions

    transform = from_origin(500000.0, 5000000.0, 10.0, 10.0)
    img = write_tif(tmp_path / "a.tif", np.ones((1, 4, 4), "uint16"), transform=transform)
    pred = np.array([[0, 1, 2, 255]] * 4, np.uint8)
    cmap = write_tif(tmp_path / "out" / "a_classes.tif", pred, transform=transform)
    with rasterio.open(cmap, "r+") as ds:
        ds.update_tags(CLASS_NAMES=",".join(NAMES))
    truth = write_tif(tmp_path / "truth" / "a.tif", np.array([[11, 11, 21, 11]] * 4, np.uint8), transform=transform)
    options = LabelOptions(3, class_names=NAMES, label_map={11: 0, 21: 2})
    summary = score_predictions([(img, cmap)], truth, options, out_dir=tmp_path / "out")
    # truth water, water, urban, water; predicted water, forest, urban, nodata: the nodata column counts nowhere
    assert summary.total.tolist() == [[4, 4, 0], [0, 0, 0], [0, 0, 4]] and not summary.failed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["total"]["pixels"] == 12
    with pytest.raises(ConfigError, match=r"a_classes\.tif: the label options are for other classes \(expected \['water', "
                                          r"'forest', 'urban'\], found 2 classes\)"):
        score_predictions([(img, cmap)], truth, LabelOptions(2))
    with pytest.raises(ConfigError, match="no class map to score"):
        score_predictions([], truth, options)
