"""The benchmark harness runs at tiny sizes and writes its tables (timings are never asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_run(tmp_path: Path, sections: str) -> str:
    """``python -m benchmarks run --quick --only SECTIONS`` into ``tmp_path``; the BENCHMARKS.md it wrote."""
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", sections, "--out", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out.read_text()


@pytest.mark.slow
def test_quick_run_writes_loading_and_training_tables(tmp_path: Path) -> None:
    text = quick_run(tmp_path, "loading,training")
    assert "Quick mode" in text
    assert "## Machine" in text and "geobp commit" in text
    # One table row per loader, each with a number of tiles per second.
    for row in ("geobp `GeoTiffDataModule`", "torchgeo `RasterDataset`", "bare rasterio loop", "torchgeo `GridGeoSampler`"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row}"))
        assert re.search(r"\| [\d,.]+ \|", line), line
    for row in ("hand-written PyTorch loop", "Lightning `Trainer.fit(SegmentationTask)`"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row}"))
        assert re.search(r"\| [\d,.]+ \|", line), line
    assert re.search(r"\| loading: geobp / torchgeo, random tiles/s \| [\d.]+x \| >= 15 \| (PASS|\*\*MISS\*\*) \|", text)
    assert "training: Lightning step / hand-written step (median step, median of rounds)" in text
    assert "gradient-flow monitor overhead, every" in text  # the monitored fits ran in the same rounds
    assert "Not measured yet" in text  # inference and gpu were not run
    stored = json.loads((tmp_path / "results" / "loading.json").read_text())
    assert set(stored["metrics"]["tiles_per_s"]) >= {"geobp", "torchgeo", "bare", "geobp_grid", "torchgeo_grid"}
    assert all(v > 0 for v in stored["metrics"]["tiles_per_s"].values())


def gpu_dry_run(tmp_path: Path, blocked: tuple[str, ...] = ()) -> dict:
    """``benchmarks/gpu.py --dry-run`` with the modules ``blocked`` unimportable; its result file."""
    out = tmp_path / "gpu.json"
    code = (
        "import sys, runpy\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # importing them now fails\n"
        f"sys.argv = ['gpu.py', '--dry-run', '--out', {str(out)!r}, '--work', {str(tmp_path)!r}]\n"
        "runpy.run_path('benchmarks/gpu.py', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_script_dry_run_measures_every_part(tmp_path: Path) -> None:
    result = gpu_dry_run(tmp_path)
    assert result["dry_run"] is True and result["skipped"] == {}
    assert result["commit"] and result["device"]["name"] == "CPU (dry run)"
    r = result["results"]
    assert r["forward_gflop_per_image"] > 0 and r["train_gflop_per_image"] > r["forward_gflop_per_image"]
    for key in ("train_images_per_s", "train_share", "infer_images_per_s", "bare_train_images_per_s",
                "pipeline_images_per_s", "pipeline_over_forward", "decode_limit_images_per_s",
                "decode_one_core_images_per_s"):
        assert r[key] > 0, key
    variants = r["train_variants"]
    assert set(variants) == {"eager", "fused", "compile", "compile+fused"}
    assert r["train_config"] in variants and r["train_images_per_s"] == max(v["images_per_s"] for v in variants.values())
    for name, v in variants.items():
        assert v["fused_adamw"] is name.endswith("fused"), name
        assert v["recordings"] > 0  # the gradient-flow monitor was on
        if name.startswith("compile"):  # compiled steps, and the monitor's recording steps run eagerly
            assert v["compiled_calls"] > 0 and v["eager_calls"] > 0
        assert v["profile"]["top_ops_ms"]
    assert r["decode_limit_images_per_s"] == pytest.approx(r["decode_one_core_images_per_s"] * r["cores"])
    assert r["pipeline_tiles"] == (256 // 32) ** 2
    profile = (tmp_path / "gpu_profile.txt").read_text()
    assert profile.count("=====") == 2 * len(variants) and "aten::" in profile


@pytest.mark.slow
def test_gpu_script_dry_run_without_rasterio_or_lightning_keeps_the_torch_parts(tmp_path: Path) -> None:
    result = gpu_dry_run(tmp_path, ("rasterio", "lightning", "torchgeo"))
    r = result["results"]
    assert 0 < r["bare_train_share"] and 0 < r["infer_share"] and r["infer_images_per_s"] > 0
    assert "train_images_per_s" not in r and "pipeline_images_per_s" not in r
    assert set(result["skipped"]) == {"train:eager", "train:fused", "train:compile", "train:compile+fused", "pipeline"}
    assert all("not importable" in why for why in result["skipped"].values())


def test_report_renders_gpu_result_and_marks_missing_sections(tmp_path: Path) -> None:
    from benchmarks.report import render

    gpu = {
        "date": "2025-01-01T00:00:00+00:00", "command": "python benchmarks/gpu.py --out x.json",
        "device": {"name": "NVIDIA H100", "memory_gib": 80.0, "cuda": "12.4", "torch": "2.5"},
        "model": "U-Net resnet34", "batch": 16, "steps": 20, "repeats": 3, "dry_run": False,
        "results": {"matmul_tflops": 700.0, "matmul_n": 8192, "train_images_per_s": 100.0, "infer_images_per_s": 300.0,
                    "forward_gflop_per_image": 60.0, "train_gflop_per_image": 180.0, "train_tflops": 18.0,
                    "infer_tflops": 18.0, "train_share": 18 / 700, "infer_share": 18 / 700},
    }
    text = render({"gpu": gpu})
    assert "**NVIDIA H100**" in text and "| training step (fwd + bwd + clip + AdamW) | 100 | 18.0 | 3% |" in text
    assert "Not measured yet: run `.venv/bin/python -m benchmarks run --only loading`" in text


def test_robust_mean_counts_periodic_work_and_ignores_bursts() -> None:
    from benchmarks.training import robust_mean

    steps = [0.2] * 75
    for i in (20, 45, 70):  # with 5 warm-up steps, the recordings of every 25 steps
        steps[i] = 1.0
    assert robust_mean(steps, 25, 5) == pytest.approx(sum(steps) / len(steps))
    burst = steps[:30] + [5.0] * 10 + steps[40:]  # other work on the machine for ten steps
    assert robust_mean(burst, 25, 5) == pytest.approx(sum(steps) / len(steps))
    assert robust_mean(burst, None, 5) == pytest.approx(0.2)


@pytest.mark.slow
def test_quick_run_writes_the_labels_section(tmp_path: Path) -> None:
    text = quick_run(tmp_path, "labels")
    for row in ("geobp, labels aligned into the cache", "geobp, same-grid masks", "bare rasterio loop: geobp's windows",
                "torchgeo `RasterDataset` & `RasterDataset`"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row}"))
        assert re.search(r"\| [\d,.]+ \|", line), line
    assert re.search(r"\| labels: geobp / torchgeo, labels on another grid, tiles/s \| [\d.]+x \| >= 3 \| (PASS|\*\*MISS\*\*) \|", text)
    assert re.search(r"\| labels: alignment / band statistics, seconds per scene \| [\d.]+ s / [\d.]+ s \| <= 1 \|", text)
    stored = json.loads((tmp_path / "results" / "labels.json").read_text())
    assert set(stored["metrics"]["tiles_per_s"]) == {"geobp_aligned", "geobp_same_grid", "bare_aligned", "torchgeo"}
def test_rare_scenes_have_one_class_on_about_one_percent(tmp_path: Path) -> None:
    import numpy as np
    import rasterio

    from benchmarks.balance import write_rare_scenes

    write_rare_scenes(tmp_path, scenes=2, size=128, bands=4, seed=0)
    for path in sorted((tmp_path / "masks").glob("*.tif")):
        with rasterio.open(path) as src:
            mask = src.read(1)
        counts = np.bincount(mask.ravel(), minlength=4)
        assert 0.005 < counts[3] / mask.size < 0.015 and (counts[:3] > 0.03 * mask.size).all()


@pytest.mark.slow
def test_quick_readers_section_compares_both_readers_with_the_decode_limit(tmp_path: Path) -> None:
    text = quick_run(tmp_path, "readers")
    for row in ("bare decode loop, one core", "decode limit: one core x", "`threads` reader", "`processes` reader"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {row}"))
        assert re.search(r"\| [\d,.]+ \|", line), line
    stored = json.loads((tmp_path / "results" / "readers.json").read_text())["metrics"]
    assert stored["decode_limit_tiles_per_s"] > 0 and {"threads_1", "processes_1"} <= set(stored["alone_tiles_per_s"])
    assert all(v > 0 for runs in stored["fed_tiles_per_s"].values() for v in runs)


@pytest.mark.slow
def test_quick_run_writes_the_startup_table(tmp_path: Path) -> None:
    text = quick_run(tmp_path, "startup")
    assert "## 1b. Start-up before the first training step" in text
    for way in ("full pass (every pixel decoded)", "sampled statistics, nodata rejected at read"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {way}"))
        assert re.search(r"\| [\d,.]+ \|", line), line
    stored = json.loads((tmp_path / "results" / "startup.json").read_text())
    assert stored["metrics"]["scenes"] == [2, 8] and all(v > 0 for v in stored["metrics"]["growth"].values())


def test_report_renders_the_issue_15_gpu_keys(tmp_path: Path) -> None:
    from benchmarks.report import render

    gpu = {
        "date": "2026-12-01T00:00:00+00:00", "command": "python benchmarks/gpu.py --out x.json", "commit": "abc1234",
        "device": {"name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0", "torch": "2.11"},
        "model": "U-Net resnet34", "batch": 16, "steps": 20, "repeats": 3, "dry_run": False,
        "skipped": {"train:compile+fused": "time budget"},
        "results": {"matmul_tflops": 800.0, "matmul_n": 8192, "forward_gflop_per_image": 60.0,
                    "train_gflop_per_image": 200.0, "bare_train_images_per_s": 500.0, "infer_images_per_s": 1500.0,
                    "infer_tflops": 90.0, "infer_share": 90 / 800,
                    "train_variants": {"eager": {"images_per_s": 400.0, "monitor_every_n_steps": 25},
                                       "compile": {"images_per_s": 1000.0, "monitor_every_n_steps": 25}},
                    "train_images_per_s": 1000.0, "train_config": "compile", "train_tflops": 200.0, "train_share": 0.25,
                    "pipeline_images_per_s": 900.0, "pipeline_over_forward": 0.6, "pipeline_over_decode_limit": 0.9,
                    "raster": "16384 x 16384 px", "cores": 16, "decode_limit_images_per_s": 1000.0,
                    "host_syncs_per_step": 3.0},
    }
    text = render({"gpu": gpu})
    assert "| hand-written training step (fwd + bwd + clip + AdamW) | 500 | 100 | 12% |" in text
    assert "monitor every 25 steps: compile | 1,000 | 200 | 25% |" in text
    assert "`geobp infer` over 16384 x 16384 px" in text and "0.60 of the forward rate" in text
    assert "Fastest training configuration: **compile**" in text and "train:compile+fused (time budget)" in text
    assert "commit abc1234" in text and "per training step" in text


@pytest.mark.slow
def test_quick_tta_section_times_each_mode_and_scores_footprints_by_strips(tmp_path: Path) -> None:
    text = quick_run(tmp_path, "tta")
    assert "## 3c. Test-time augmentation: cost, and accuracy on a real scene" in text
    assert "Accuracy on a generated stand-in (quick mode): building footprints, 3-fold cross-validation" in text
    for mode in ("none", "flips", "d4"):
        rows = [ln for ln in text.splitlines() if ln.startswith(f"| {mode} |")]
        assert len(rows) == 2 and all(re.search(r"\| [\d.]+ \|", row) for row in rows), rows  # cost and accuracy
    assert re.search(r"\| tta: flips / none, predict_raster seconds \| [\d.]+x \| <= 4.5 \| (PASS|\*\*MISS\*\*) \|", text)
    stored = json.loads((tmp_path / "results" / "tta.json").read_text())["metrics"]
    assert set(stored["ratio"]) == {"none", "flips", "d4"} and all(v > 0 for v in stored["ratio"].values())
    modes = stored["accuracy"]["modes"]
    assert set(modes) == {"none", "flips", "d4"} and modes["none"]["changed_share"] == 0
    for scores in modes.values():  # every pixel of the chip predicted once, over the three strips
        assert np.asarray(scores["confusion"]).sum() == 384 * 384 and len(scores["fold_building_iou"]) == 3


def test_fold_strips_partition_the_chip_and_burn_every_footprint(tmp_path: Path) -> None:
    import pyogrio
    import rasterio
    from rasterio.features import rasterize

    from benchmarks.tta import fold_crops, write_footprint_chip

    image, labels = write_footprint_chip(tmp_path / "chip", size=100)
    folds = fold_crops(image, labels, tmp_path / "work", 3)
    with rasterio.open(image) as src:
        full, transform = src.read(1), src.transform
    whole = rasterize(pyogrio.read_dataframe(labels).geometry, out_shape=full.shape, transform=transform, dtype="uint8")
    assert whole.any()
    assert np.array_equal(np.concatenate([truth for _, _, truth in folds], axis=1), whole)
    for k, (train, test, _) in enumerate(folds):
        with rasterio.open(test) as t:
            strip = t.read(1)
            col0 = round((t.transform.c - transform.c) / transform.a)
        assert np.array_equal(strip, full[:, col0:col0 + strip.shape[1]])
        widths = []
        for p in train:
            with rasterio.open(p) as crop:
                widths.append(crop.width)
        assert sum(widths) + strip.shape[1] == 100 and len(train) == (1 if k in (0, 2) else 2)


def test_real_data_members_are_checked_against_their_pinned_sha256(tmp_path: Path) -> None:
    import hashlib
    import zipfile

    from benchmarks.realdata import RealDataUnavailable, extract

    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/data/a.tif", b"image bytes")
    good = {"pkg/data/a.tif": ("a.tif", hashlib.sha256(b"image bytes").hexdigest())}
    assert extract(wheel, tmp_path / "out", good)["a.tif"].read_bytes() == b"image bytes"
    with pytest.raises(RealDataUnavailable, match="does not match its pinned sha256"):
        extract(wheel, tmp_path / "bad", {"pkg/data/a.tif": ("a.tif", "0" * 64)})
    assert not list((tmp_path / "bad").iterdir())  # nothing half-written
    with pytest.raises(RealDataUnavailable, match="has no pkg/data/b.tif"):
        extract(wheel, tmp_path / "missing", {"pkg/data/b.tif": ("b.tif", "0" * 64)})


def test_imagery_section_runs_quick(tmp_path: Path) -> None:
    from benchmarks.common import Config
    from benchmarks.imagery import run

    result = run(Config.quick_config(cache_dir=str(tmp_path), tiles=32, warmup_tiles=16))
    assert set(result["metrics"]["tiles_per_s"]) == {f"{k}_{w}" for k in ("sources", "stacked", "bare") for w in (0, 2)}
    assert all(v > 0 for v in result["metrics"]["tiles_per_s"].values())
    assert [t["name"] for t in result["targets"]] == [
        f"imagery: several sources / pre-stacked file, data module tiles/s, {w} workers" for w in (0, 2)]


@pytest.mark.slow
def test_remote_section_runs_quick(tmp_path: Path) -> None:
    from benchmarks.common import Config
    from benchmarks.remote import run

    result = run(Config.quick_config(cache_dir=str(tmp_path), tiles=32, warmup_tiles=16))
    reads = result["metrics"]["reads"]
    assert set(reads) == {"train_0", "train_2", "infer"}
    for r in reads.values():
        assert r["bytes"] > 0 and r["requests"] > 0 and r["needed"] > 0, r
    # the quick scene's files are one block each: one epoch reads every block, as inference does
    assert reads["train_0"]["needed"] == reads["infer"]["needed"]
    assert result["metrics"]["tiles_per_s"]["slow"] > 0 and result["metrics"]["tiles_per_s"]["local"] > 0
    assert len(result["targets"]) == 4


def test_bounded_vectorize_map_is_the_same_whatever_the_strips_and_the_map_size() -> None:
    from benchmarks.vectorize import fields

    whole = fields(0, 768, 768)
    strips = np.concatenate([fields(row, min(300, 768 - row), 768) for row in range(0, 768, 300)])
    assert np.array_equal(whole, strips)
    assert np.array_equal(fields(0, 256, 1536)[:, :768], whole[:256])  # a smaller map is a larger one's corner
    assert set(np.unique(whole)) == set(range(6))


@pytest.mark.slow
def test_quick_vectorize_section_puts_the_memory_target_on_the_bounded_map(tmp_path: Path) -> None:
    text = quick_run(tmp_path, "vectorize")
    assert "## 3e. Polygons of a class map" in text
    assert "**Peak memory writing a GeoPackage: bounded regions (the target) against spanning ones**" in text
    assert re.search(r"\| peak memory 1024\^2 / 512\^2 \(gpkg\), bounded regions \| [^|]+ \| <= 1.2 \| (PASS|\*\*MISS\*\*) \|", text)
    assert "Worst case, regions spanning the map" in text
    stored = json.loads((tmp_path / "results" / "vectorize.json").read_text())["metrics"]
    assert set(stored["bounded_runs"]) == {"512", "1024"} and stored["memory_ratio_spanning"] > 0
