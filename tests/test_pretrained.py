"""torchgeo weights metadata: names, band matching, normalisation, the hub-cache file."""

import pytest
import torch
from torchgeo.models import get_weight

from geobp.errors import ConfigError, DataNotFoundError
from geobp.bands import canonical_band
from geobp.pretrained import (
    compose_normalize,
    is_pretrained_name,
    list_pretrained,
    match_bands,
    resolve_pretrained,
)
from tests.pretrained_helpers import fake_torchgeo_weights

S2 = "ResNet18_Weights.SENTINEL2_ALL_MOCO"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_names_and_paths_are_told_apart(tmp_path):
    assert is_pretrained_name(S2) and is_pretrained_name("ResNet50_Weights.LANDSAT_OLI_SR_MOCO")
    assert not is_pretrained_name(str(tmp_path / "resnet18.pth")) and not is_pretrained_name(None)
    local = tmp_path / "ResNet18_Weights.SENTINEL2_ALL_MOCO"  # a file of that name is a file
    local.write_bytes(b"")
    assert not is_pretrained_name(str(local))


def test_resolve_reads_torchgeo_metadata(torch_home):
    w = resolve_pretrained(S2)
    member = get_weight(S2)
    assert w.encoder == "resnet18" and w.bands == tuple(member.meta["bands"]) and len(w.bands) == 13
    assert w.mean == (0.0,) * 13 and w.std == (10000.0,) * 13  # SSL4EO-S12: division by 10000
    assert w.cache_path == torch_home / "hub" / "checkpoints" / member.url.rsplit("/", 1)[1]
    assert resolve_pretrained("ResNet50_Weights.LANDSAT_OLI_SR_MOCO").encoder == "resnet50"


@pytest.mark.parametrize("name", ["ResNet18_Weights.SENTINEL2_RGB_SECO", "ResNet50_Weights.SENTINEL2_MI_MS_SATLAS",
                                  "ResNet50_Weights.SENTINEL1_ALL_MOCO", "ResNet50_Weights.SENTINEL1_GRD_CLOSP"])
def test_composed_normalisation_equals_torchgeo_transforms(name):
    member = get_weight(name)
    n = member.meta["in_chans"]
    mean, std = compose_normalize(member.transforms, n, name)
    x = torch.rand(n, 224, 224, dtype=torch.float64) * 3000
    expected = x.clone()
    modules = member.transforms if isinstance(member.transforms, torch.nn.Sequential) else [member.transforms]
    for m in modules:
        if type(m).__name__ in ("Normalize", "Identity"):
            expected = m(expected)
    mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    got = (x - mean_t[:, None, None]) / std_t[:, None, None]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_band_names_compare_case_and_leading_zeros():
    assert canonical_band("B8A") == canonical_band("b8a") == canonical_band("B08A") == "b8a"
    assert canonical_band("B10") == "b10" and canonical_band("SR_B01") == "sr_b1"
    w = resolve_pretrained(S2)
    assert match_bands(["B04", "b3", "B8A", "B10"], w) == [3, 2, 8, 10]
    assert match_bands(["B4", "B3", "water_index"], w) == [3, 2, None]
    # a scene of several sources names its bands <source>:<band>: the source is not part of the name
    assert match_bands(["s2:B04", "s2:B03", "s1:VV"], w) == [3, 2, None]


def test_too_few_matched_bands_list_both_lists():
    w = resolve_pretrained(S2)
    with pytest.raises(ConfigError, match=r"only 1 of the data's 3 bands are in ResNet18_Weights.SENTINEL2_ALL_MOCO "
                                          r"\(data bands \['B4', 'red', 'nir'\]; weights bands \['B1', 'B2'"):
        match_bands(["B4", "red", "nir"], w)


def test_unknown_names_and_unusable_weights_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"unknown torchgeo weights 'ResNet18_Weights.SENTINEL2_ALL_MOKO'.*"
                                          r"did you mean ResNet18_Weights.SENTINEL2_ALL_MOCO"):
        resolve_pretrained("ResNet18_Weights.SENTINEL2_ALL_MOKO")
    with pytest.raises(ConfigError, match="has no band list"):
        resolve_pretrained("ResNet50_Weights.FMOW_RGB_GASSL")
    with pytest.raises(ConfigError, match=r"weights for another architecture.*ResNet18_Weights or ResNet50_Weights"):
        resolve_pretrained("ResNet152_Weights.SENTINEL2_MI_MS_SATLAS")


def test_missing_file_names_path_and_url(torch_home):
    w = resolve_pretrained(S2)
    with pytest.raises(DataNotFoundError) as info:
        w.state_dict()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{w.cache_path}: pretrained weights {S2} not found")
    assert f"Fix: fetch {w.url} on a machine with internet and copy it to that path" in message
    assert not w.cache_path.exists()  # nothing was downloaded


def test_state_dict_loads_through_torchgeo(torch_home):
    path, written = fake_torchgeo_weights(torch_home, S2)
    state = resolve_pretrained(S2).state_dict()
    assert path.parent == torch_home / "hub" / "checkpoints"
    assert state.keys() == written.keys()
    assert all(torch.equal(state[k], v) for k, v in written.items())
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"{path.name}: cannot read pretrained weights {S2}.*Fix: delete the file"):
        resolve_pretrained(S2).state_dict()


def test_state_dict_refuses_pickled_objects(torch_home):
    path, _ = fake_torchgeo_weights(torch_home, S2)
    torch.save({"conv1.weight": torch.zeros(1), "evil": ConfigError("x")}, path)  # not weights-only data
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        resolve_pretrained(S2).state_dict()


def test_listing_covers_resnet18_and_resnet50_weights():
    names = {w.name for w in list_pretrained()}
    assert {S2, "ResNet50_Weights.SENTINEL2_ALL_DINO", "ResNet50_Weights.LANDSAT_OLI_SR_MOCO"} <= names
    assert "ResNet50_Weights.FMOW_RGB_GASSL" not in names  # no band list
    assert all(n.startswith(("ResNet18_Weights.", "ResNet50_Weights.")) for n in names)
