"""ResNetEncoder: feature contract, N-band stem adaptation, local weight loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from geobp.errors import ConfigError
from geobp.models import ResNetEncoder, adapt_first_conv, create_model


@pytest.mark.parametrize(("name", "channels", "block"), [
    ("resnet18", [64, 64, 128, 256, 512], BasicBlock),
    ("resnet34", [64, 64, 128, 256, 512], BasicBlock),
    ("resnet50", [64, 256, 512, 1024, 2048], Bottleneck),
])
def test_features_follow_the_documented_contract(
    name: str, channels: list[int], block: type
) -> None:
    encoder = ResNetEncoder(name, in_channels=5)
    features = encoder(torch.randn(1, 5, 64, 64))
    assert encoder.out_channels == channels
    assert [f.shape[1] for f in features] == channels
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    blocks = [m for m in encoder.modules() if isinstance(m, block)]
    assert len(blocks) == sum(len(getattr(encoder, f"layer{i}")) for i in range(1, 5))
    assert not hasattr(encoder, "fc") and not hasattr(encoder, "avgpool")
    assert encoder.conv1.in_channels == 5


def test_feature_sources_name_the_modules_producing_each_feature() -> None:
    encoder = ResNetEncoder("resnet18", in_channels=3)
    seen: dict[str, torch.Tensor] = {}
    for source in encoder.feature_sources:
        encoder.get_submodule(source).register_forward_hook(
            lambda _m, _i, out, source=source: seen.__setitem__(source, out))
    features = encoder(torch.randn(1, 3, 64, 64))
    for source, feature in zip(encoder.feature_sources, features):
        assert seen[source] is feature


def test_adapt_first_conv_repeats_and_rescales() -> None:
    weight = torch.randn(8, 3, 7, 7)
    six = adapt_first_conv(weight, 6)
    torch.testing.assert_close(six, torch.cat([weight, weight], dim=1) * 0.5)
    torch.testing.assert_close(six.sum(dim=1), weight.sum(dim=1))  # magnitude preserved
    four = adapt_first_conv(weight, 4)
    torch.testing.assert_close(four, weight[:, [0, 1, 2, 0]] * 0.75)
    torch.testing.assert_close(adapt_first_conv(weight, 1), weight.sum(dim=1, keepdim=True))
    assert torch.equal(adapt_first_conv(weight, 3), weight)


def test_adapt_first_conv_rejects_zero_channels() -> None:
    with pytest.raises(ConfigError, match=r"in_channels must be >= 1 \(found 0\)"):
        adapt_first_conv(torch.randn(8, 3, 7, 7), 0)


def _save_resnet(path: Path, name: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None)
    torch.save(net.state_dict(), path)
    return net


@pytest.mark.parametrize("bands", [4, 3])
def test_loads_local_torchvision_weights(tmp_path: Path, bands: int) -> None:
    path = tmp_path / "resnet18.pth"
    saved = _save_resnet(path)
    encoder = ResNetEncoder("resnet18", in_channels=bands, weights=str(path))
    torch.testing.assert_close(encoder.conv1.weight, adapt_first_conv(saved.conv1.weight, bands))
    assert encoder.conv1.weight.shape[1] == bands
    saved_state = saved.state_dict()
    for key, value in encoder.layer1.state_dict().items():
        assert torch.equal(value, saved_state[f"layer1.{key}"]), key
    assert torch.equal(encoder.bn1.running_var, saved.bn1.running_var)


def test_missing_weights_file_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    pattern = re.escape(f"{path}: encoder weights file not found")
    with pytest.raises(ConfigError, match=pattern) as info:
        ResNetEncoder("resnet18", in_channels=4, weights=str(path))
    assert "or set weights: null" in str(info.value)


def test_weights_of_another_architecture_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    _save_resnet(path)
    pattern = re.escape(f"{path}: weights do not fit a resnet50 encoder (") + r".*missing keys.*"
    with pytest.raises(ConfigError, match=pattern) as info:
        ResNetEncoder("resnet50", in_channels=4, weights=str(path))
    assert "torchvision.models.resnet50()" in str(info.value)


def test_unreadable_weights_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read encoder weights")):
        ResNetEncoder("resnet18", in_channels=4, weights=str(path))


def test_unknown_encoder_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=re.escape("['resnet18', 'resnet34', 'resnet50']")):
        ResNetEncoder("resnet101", in_channels=3)  # type: ignore[arg-type]


def test_files_without_num_batches_tracked_still_load(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    saved = _save_resnet(tmp_path / "new.pth")
    old = {k: v for k, v in saved.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, path)
    encoder = ResNetEncoder("resnet18", in_channels=3, weights=str(path))
    assert torch.equal(encoder.layer4[1].conv2.weight, saved.layer4[1].conv2.weight)


def test_a_file_that_is_not_a_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not a state dict (expected a dict")):
        ResNetEncoder("resnet18", in_channels=3, weights=str(path))


def test_create_model_passes_weights_to_the_encoder(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    saved = _save_resnet(path)
    model = create_model("unet", encoder="resnet18", in_channels=6, num_classes=2,
                         weights=str(path))
    torch.testing.assert_close(model.encoder.conv1.weight, adapt_first_conv(saved.conv1.weight, 6))
