"""Test-time augmentation: equivariant models are unchanged, others get exactly the average over the
transforms, in the sliding-window inference, its shares and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from geobp.cli import main
from geobp.errors import ConfigError
from geobp.inference import predict_raster
from geobp.inference.options import PredictOptions
from geobp.inference.parts import remove_parts, share_rows, write_from_parts
from geobp.inference.predict import open_job, predict_share
from geobp.inference.sinks import OutputLayout, output_sinks
from geobp.inference.tta import TRANSFORMS, tta_forward
from tests.cli.test_infer_options import save_checkpoint
from tests.inference.test_predict import PRE, conv_model, make_image

K = 4


def symmetric_conv() -> torch.nn.Conv2d:
    """A 3x3 convolution whose kernels are unchanged by every flip and quarter turn: D4-equivariant."""
    conv = torch.nn.Conv2d(3, K, 3, padding=1)
    rng = np.random.default_rng(1)
    a, b, c = (torch.from_numpy(rng.normal(size=(K, 3, 1, 1)).astype(np.float32)) for _ in range(3))
    ring = torch.tensor([[2.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 2.0]])
    with torch.no_grad():  # centre a, edge-centres b, corners c
        conv.weight.copy_(a * (ring == 0) + b * (ring == 1) + c * (ring == 2))
        conv.bias.copy_(torch.from_numpy(rng.normal(size=K).astype(np.float32)))
    return conv.eval()


class Ramp(torch.nn.Module):
    """Not equivariant: an asymmetric 3x3 convolution plus a horizontal ramp added to class 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, K, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        ramp = torch.linspace(-3.0, 3.0, x.shape[-1], dtype=y.dtype)
        return torch.cat([y[:, :1] + ramp, y[:, 1:]], dim=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_np(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return softmax(model(torch.from_numpy(np.ascontiguousarray(x))).double().numpy())


def expected(model: torch.nn.Module, x: np.ndarray, mode: str) -> np.ndarray:
    """The average, written out with numpy: each view predicted and mapped back by hand."""
    h, w = (2, 3)
    if mode == "flips":
        views = [(lambda a: a, lambda a: a),
                 (lambda a: a[..., ::-1], lambda a: a[..., ::-1]),
                 (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
                 (lambda a: a[..., ::-1, ::-1], lambda a: a[..., ::-1, ::-1])]
    else:  # the 4 rotations of x and the 4 of its mirror image; back: rotate back, then un-mirror
        views = [(lambda a, k=k: np.rot90(a, k, (h, w)), lambda a, k=k: np.rot90(a, -k, (h, w))) for k in range(4)]
        views += [(lambda a, k=k: np.rot90(a[..., ::-1], k, (h, w)), lambda a, k=k: np.rot90(a, -k, (h, w))[..., ::-1])
                  for k in range(4)]
    return np.mean([back(predict_np(model, there(x))) for there, back in views], axis=0)


def probs_of(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).double().numpy()


def batch(size=(16, 16), seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(2, 3, *size)).astype(np.float32))


def test_the_transforms_are_the_flips_and_the_dihedral_group_each_undone_by_its_inverse():
    x = batch()
    for mode, count in (("none", 1), ("flips", 4), ("d4", 8)):
        views = [t.apply(x) for t in TRANSFORMS[mode]]
        assert len({v.numpy().tobytes() for v in views}) == count  # all different on an asymmetric tile
        for t, v in zip(TRANSFORMS[mode], views):
            assert torch.equal(t.invert(v), x)
    assert TRANSFORMS["d4"][0] == TRANSFORMS["flips"][0] == TRANSFORMS["none"][0]  # the identity first
    # every flip is an element of D4
    d4 = {t.apply(x).numpy().tobytes() for t in TRANSFORMS["d4"]}
    assert {t.apply(x).numpy().tobytes() for t in TRANSFORMS["flips"]} <= d4


def test_without_tta_the_model_output_is_handed_on_untouched():
    x, model = batch(), Ramp()
    out = object()
    assert tta_forward(lambda image: out, x, "none") is out
    with torch.no_grad():
        assert torch.equal(tta_forward(model, x), model(x))


@pytest.mark.parametrize("mode", ["flips", "d4"])
@pytest.mark.parametrize("make", [lambda: conv_model(1), symmetric_conv], ids=["1x1", "symmetric_3x3"])
def test_an_equivariant_model_gives_the_same_probabilities(mode, make):
    x, model = batch(), make()
    with torch.no_grad():
        plain = probs_of(model(x))
        augmented = probs_of(tta_forward(model, x, mode))
    np.testing.assert_allclose(augmented, plain, rtol=0, atol=2e-6)
    assert (augmented.argmax(1) == plain.argmax(1)).all()


@pytest.mark.parametrize("mode", ["flips", "d4"])
def test_a_model_that_is_not_equivariant_gets_the_average_of_the_probabilities(mode):
    x, model = batch(), Ramp()
    with torch.no_grad():
        out = tta_forward(model, x, mode)
        plain = probs_of(model(x))
    want = expected(model, x.numpy(), mode)
    assert out.dtype == torch.float32 and out.shape == (2, K, 16, 16)
    np.testing.assert_allclose(probs_of(out), want, rtol=0, atol=2e-6)
    assert np.abs(want - plain).max() > 0.1  # the model really is not equivariant
    # the average of probabilities, not of logits
    with torch.no_grad():
        logits = [t.invert(model(t.apply(x))) for t in TRANSFORMS[mode]]
    of_mean_logits = probs_of(torch.stack(logits).mean(0))
    assert np.abs(of_mean_logits - want).max() > 1e-3


def test_flips_work_on_any_tile_and_d4_needs_square_tiles():
    x, model = batch((16, 24)), Ramp()
    with torch.no_grad():
        np.testing.assert_allclose(probs_of(tta_forward(model, x, "flips")), expected(model, x.numpy(), "flips"), atol=2e-6)
        with pytest.raises(ConfigError, match=r"tta 'd4' turns the tiles by 90 degrees, which needs square tiles "
                                              r"\(found 16 x 24\)\. Fix: use square tiles, or tta 'flips'"):
            tta_forward(model, x, "d4")


def test_unknown_modes_and_outputs_of_another_size_are_refused():
    with pytest.raises(ConfigError, match=r"unknown tta 'd8' \(expected none, flips or d4\)"):
        tta_forward(Ramp(), batch(), "d8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown tta 'flip' \(expected none, flips or d4\)"):
        PredictOptions(tta="flip")  # type: ignore[arg-type]
    pooled = torch.nn.Sequential(conv_model(1), torch.nn.AvgPool2d(2))
    with torch.no_grad(), pytest.raises(ConfigError, match=r"model output has shape \[2, 4, 8, 8\] for input tiles "
                                                          r"\[2, 3, 16, 16\]: with tta 'flips' each prediction is flipped back"):
        tta_forward(pooled, batch(), "flips")


class Recorder(torch.nn.Module):
    """Records the memory format and dtype of what it is given and of what it computes in."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.seen.append((x.is_contiguous(memory_format=torch.channels_last), y.dtype))
        return y


def test_channels_last_inputs_stay_channels_last_and_autocast_outputs_are_averaged_in_float32():
    model = Recorder(Ramp().to(memory_format=torch.channels_last))
    x = batch().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = probs_of(tta_forward(model, x.contiguous(), "d4"))
        model.seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tta_forward(model, x, "d4")
    assert model.seen == [(True, torch.bfloat16)] * 8
    assert out.dtype == torch.float32
    np.testing.assert_allclose(probs_of(out), reference, atol=0.02)  # bf16 logits


def run(src, dst, model, **kw):
    return predict_raster(model, src, dst, PRE, tile_size=16, overlap=8, batch_size=3, progress=False, **kw)


class ExplicitAverage(torch.nn.Module):
    """The flips average written without geobp.inference.tta: log of the mean of the four softmaxes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [(), (-1,), (-2,), (-2, -1)]
        probs = [torch.softmax(self.inner(x.flip(d) if d else x), 1) for d in views]
        return torch.stack([p.flip(d) if d else p for p, d in zip(probs, views)]).mean(0).log()


def test_predict_raster_with_tta_blends_the_averaged_probabilities(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(40, 50))
    model = Ramp()
    tta = run(src, tmp_path / "tta" / "a_classes.tif", model, tta="flips", probabilities="probs")
    by_hand = run(src, tmp_path / "hand" / "a_classes.tif", ExplicitAverage(model), probabilities="probs")
    plain = run(src, tmp_path / "plain" / "a_classes.tif", model, probabilities="probs")
    with rasterio.open(tta) as a, rasterio.open(by_hand) as b, rasterio.open(plain) as c:
        np.testing.assert_array_equal(a.read(), b.read())
        assert (a.read() != c.read()).any()  # the augmentation changed the map
        assert a.crs == c.crs and a.transform == c.transform and a.nodata == 255
    with rasterio.open(tmp_path / "tta" / "a_probs.tif") as a, rasterio.open(tmp_path / "hand" / "a_probs.tif") as b:
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1  # within uint8 rounding


def test_an_equivariant_model_gives_the_same_class_map_with_tta(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(40, 50))
    model = symmetric_conv()
    outs = [run(src, tmp_path / mode / "a_classes.tif", model, tta=mode) for mode in ("none", "flips", "d4")]
    maps = [rasterio.open(p).read() for p in outs]
    np.testing.assert_array_equal(maps[1], maps[0])
    np.testing.assert_array_equal(maps[2], maps[0])


def test_tta_in_shares_gives_the_single_process_outputs(tmp_path):
    """Distributed inference (predict_share, part files) with d4: byte for byte the single-process files."""
    src = make_image(tmp_path / "in.tif", size=(70, 37))
    opts = PredictOptions(tile_size=16, overlap=4, batch_size=5, progress=False, tta="d4", probabilities="entropy")
    model = Ramp()
    one = predict_raster(model, src, tmp_path / "one" / "in_classes.tif", PRE, opts)
    job = open_job(src, PRE, opts)
    shares = share_rows(job.grid, 3)
    dst = tmp_path / "many" / "in_classes.tif"
    for share in shares:
        predict_share(model, job, share, output_sinks(dst, opts), opts)
    write_from_parts(output_sinks(dst, opts), job.grid, shares, OutputLayout(job.profile, [f"class_{i}" for i in range(K)]))
    remove_parts([dst, dst.with_name("in_entropy.tif")], 3)
    for name in ("in_classes.tif", "in_entropy.tif"):
        with rasterio.open(one.parent / name) as a, rasterio.open(dst.parent / name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
    assert sorted(p.name for p in dst.parent.iterdir()) == ["in_classes.tif", "in_entropy.tif"]


def test_geobp_infer_tta_flips_writes_a_class_map(tmp_path, make_scene, capsys):
    ckpt = save_checkpoint(tmp_path / "model.ckpt", None)
    img, _ = make_scene("a", size=(40, 40), nodata=0, nodata_rows=3)
    out = tmp_path / "out"
    code = main(["infer", str(img), "--ckpt", str(ckpt), "--out", str(out), "--accelerator", "cpu",
                 "--tta", "flips", "--probabilities", "entropy", "--tile_size", "32", "--batch_size", "2"])
    assert code == 0, capsys.readouterr()
    with rasterio.open(out / "a_classes.tif") as classes, rasterio.open(out / "a_entropy.tif") as entropy, \
            rasterio.open(img) as src:
        ids = classes.read(1)
        assert classes.crs == entropy.crs == src.crs and classes.transform == entropy.transform == src.transform
        assert (ids[:3] == 255).all() and (ids[3:] < 3).all()
        assert (entropy.read(1)[:3] == 255).all() and (entropy.read(1)[3:] <= 254).all()
    assert "1 raster(s) predicted, 0 failed" in capsys.readouterr().err


def test_the_tta_option_of_geobp_infer(capsys):
    from geobp.cli.infer import build_parser

    base = ["s.tif", "--ckpt", "c", "--out", "d"]
    p = build_parser()
    assert p.parse_args(base).tta == "none"
    assert p.parse_args([*base, "--tta", "d4"]).tta == "d4"
    with pytest.raises(SystemExit) as stop:
        p.parse_args([*base, "--tta", "d8"])
    assert stop.value.code == 2 and "invalid choice: 'd8'" in capsys.readouterr().err


def test_the_model_runs_once_per_transform_on_each_batch_read_once(tmp_path):
    src = make_image(tmp_path / "a.tif", size=(40, 50))
    calls = {}
    for mode in ("none", "flips", "d4"):
        model = Recorder(conv_model(1))
        run(src, tmp_path / mode / "a_classes.tif", model, tta=mode)
        calls[mode] = len(model.seen)
    assert calls["flips"] == 4 * calls["none"] and calls["d4"] == 8 * calls["none"]
