"""ResNetEncoder from torchgeo weights: bands matched by name, filters copied exactly."""

import pytest
import torch

from geobp.errors import ConfigError, DataNotFoundError
from geobp.models import ResNetEncoder, adapt_first_conv, create_model
from tests.pretrained_helpers import fake_torchgeo_weights

S2 = "ResNet18_Weights.SENTINEL2_ALL_MOCO"
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8a", "B9", "B10", "B11", "B12"]


@pytest.fixture
def s2_state(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return fake_torchgeo_weights(tmp_path / "torch_home", S2)[1]


def assert_body_equal(encoder: ResNetEncoder, state: dict) -> None:
    """Every tensor but conv1 and fc is the weights' own."""
    own = encoder.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(("fc.", "conv1."))}
    assert body and set(body) == {k for k in own if k != "conv1.weight"}
    for k, v in body.items():
        assert torch.equal(own[k], v), k


def test_bands_in_weights_order_take_the_filters_as_they_are(s2_state):
    enc = ResNetEncoder("resnet18", 13, S2, S2_BANDS)
    assert torch.equal(enc.conv1.weight.detach(), s2_state["conv1.weight"])
    assert_body_equal(enc, s2_state)
    # no band names: the input is taken to have the weights' bands in their order
    assert torch.equal(ResNetEncoder("resnet18", 13, S2).conv1.weight.detach(), s2_state["conv1.weight"])


def test_bands_in_another_order_and_case_follow_the_data(s2_state):
    order = [12, 3, 2, 1, 7, 8, 0, 4, 5, 6, 9, 10, 11]
    names = [S2_BANDS[i].upper() if i % 2 else S2_BANDS[i].lower() for i in order]  # B8A, b4 ...
    names[names.index("B4")] = "B04"  # zero-padded, as Sentinel-2 product files name them
    enc = ResNetEncoder("resnet18", 13, S2, names)
    assert torch.equal(enc.conv1.weight.detach(), s2_state["conv1.weight"][:, order])
    assert_body_equal(enc, s2_state)


def test_bands_the_weights_lack_get_adapted_filters_and_a_warning(s2_state):
    names = ["B4", "B3", "B2", "ndvi"]
    with pytest.warns(UserWarning, match=r"bands \['ndvi'\] are not in ResNet18_Weights.SENTINEL2_ALL_MOCO"):
        enc = ResNetEncoder("resnet18", 4, S2, names)
    w = s2_state["conv1.weight"]
    got = enc.conv1.weight.detach()
    assert torch.equal(got[:, :3], w[:, [3, 2, 1]])
    assert torch.equal(got[:, 3], adapt_first_conv(w, 4)[:, 3])  # cyclic repeat of the stem, rescaled 13/4
    assert torch.allclose(got[:, 3], w[:, 3] * 13 / 4)


def test_too_few_common_bands_is_an_error(s2_state):
    with pytest.raises(ConfigError, match=r"only 1 of the data's 3 bands .*data bands \['red', 'B8', 'swir'\]; "
                                          r"weights bands \['B1', .*'B12'\]\).*Fix: name the bands"):
        ResNetEncoder("resnet18", 3, S2, ["red", "B8", "swir"])


def test_mismatched_encoder_or_band_count_is_an_error(s2_state):
    with pytest.raises(ConfigError, match=r"are resnet18 weights \(encoder is resnet34\).*set model.encoder: resnet18"):
        ResNetEncoder("resnet34", 13, S2, S2_BANDS)
    with pytest.raises(ConfigError, match=r"13 band names .* for 4 input bands"):
        ResNetEncoder("resnet18", 4, S2)


def test_missing_file_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    expected = tmp_path / "empty" / "hub" / "checkpoints" / "resnet18_sentinel2_all_moco-59bfdff9.pth"
    with pytest.raises(DataNotFoundError, match=rf"^{expected}: pretrained weights {S2} not found.*Fix: fetch "
                                                r"https://hf.co/torchgeo/resnet18_sentinel2_all_moco/.*\.pth"):
        create_model("unet", encoder="resnet18", in_channels=13, num_classes=2, weights=S2, band_names=S2_BANDS)


def test_file_of_other_shapes_is_an_error(s2_state, tmp_path):
    path = next((tmp_path / "torch_home").rglob("*.pth"))
    torch.save({**s2_state, "conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ConfigError, match=r"conv1.weight does not fit .*expected 13 input channels, found \(64, 3, 7, 7\)"):
        ResNetEncoder("resnet18", 13, S2, S2_BANDS)


def test_resnet50_landsat_weights_through_create_model(tmp_path, monkeypatch):
    name = "ResNet50_Weights.LANDSAT_OLI_SR_MOCO"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, state = fake_torchgeo_weights(tmp_path, name)
    model = create_model("unet", encoder="resnet50", in_channels=3, num_classes=2, weights=name,
                         band_names=["sr_b5", "SR_B4", "SR_B3"])
    assert torch.equal(model.encoder.conv1.weight.detach(), state["conv1.weight"][:, [4, 3, 2]])
    assert_body_equal(model.encoder, state)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)
