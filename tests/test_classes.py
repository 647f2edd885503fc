"""One definition per rule: class names, class and band counts, valid mask values."""

import numpy as np
import pytest

from geobp.classes import check_in_channels, check_num_classes, class_names_for, invalid_labels, mask_dtype
from geobp.errors import ConfigError


def test_invalid_labels_is_the_rule_of_fit_and_check():
    values = np.array([-1, 0, 2, 3, 254, 255, 300])
    assert invalid_labels(values, 3, 255).tolist() == [True, False, False, True, True, False, True]
    # a negative ignore index (e.g. -1 in the files) is allowed when it is the ignore index
    assert invalid_labels(np.array([-1, 0, 5]), 3, -1).tolist() == [False, False, True]


def test_class_names_and_counts():
    assert class_names_for(None, 3) == ["class_0", "class_1", "class_2"]
    assert class_names_for(["a", "b"], 2) == ["a", "b"]
    with pytest.raises(ConfigError, match="class_names has 1 entries for 2 classes"):
        class_names_for(["a"], 2)
    with pytest.raises(ConfigError, match=r"num_classes must be >= 2 \(found 1\).*background"):
        check_num_classes(1)
    with pytest.raises(ConfigError, match=r"in_channels must be >= 1 \(found 0\)"):
        check_in_channels(0)
    assert mask_dtype(5, 255) == np.uint8 and mask_dtype(300, 255) == np.int16


def test_check_and_fit_agree_on_negative_mask_values(make_scene, tmp_path):
    """`geobp check` used to pass a mask with -1 that `geobp fit`'s loader rejects."""
    import rasterio

    from geobp.data.dataset import TileDataset, TileSpec
    from geobp.data.preprocessing import Preprocessing
    from geobp.data.scenes import find_scenes
    from geobp.data.scenes import check_dataset
    from geobp.errors import LabelError

    _, mask_path = make_scene("neg", size=(32, 32))
    with rasterio.open(mask_path) as src:
        profile, m = src.profile, src.read(1).astype("int16")
    m[0, 0] = -1
    profile.update(dtype="int16")
    with rasterio.open(mask_path, "w", **profile) as dst:
        dst.write(m, 1)
    report = check_dataset(tmp_path / "data", num_classes=3, ignore_index=255, full=True)[0]
    assert report.fatal and any("mask values [-1]" in p.message for p in report.problems)
    scenes = find_scenes(tmp_path / "data")
    pre = Preprocessing(bands=[1, 2, 3], mean=[0.0] * 3, std=[1.0] * 3)
    ds = TileDataset([str(s.image.path) for s in scenes], [str(s.mask.path) for s in scenes], [s.name for s in scenes],
                     pre, tile_size=32, num_classes=3)
    with pytest.raises(LabelError, match=r"mask values \[-1\]"):
        ds[TileSpec(0, 0, 0, 32, 32)]
