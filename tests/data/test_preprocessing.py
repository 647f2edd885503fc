import numpy as np
import pytest
import torch

from geobp.data.preprocessing import Preprocessing

STATS = dict(mean=[10.0, 50.0, 99.0, 3.3], std=[3.0, 40.0, 7.1, 0.3], low=[5.0, 20.0, 1.0, 0.0], high=[150.0, 120.0, 180.0, 17.0])


# normalize_tensor runs numpy tile by tile on the CPU; _normalize_torch is its path on GPUs
@pytest.mark.parametrize("path", ["normalize_tensor", "_normalize_torch"])
@pytest.mark.parametrize("method", ["meanstd", "percentile"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_normalize_tensor_equals_the_numpy_preprocessing(path, method, dtype):
    """The on-device normalisation gives the numbers the loader workers used to compute."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 200, (3, 4, 20, 12)).astype(dtype)
    raw[:, :, :3] = 7  # nodata rows (every band)
    raw[0, 1, 5] = 7  # nodata in one band only: still a valid pixel
    if dtype == "float32":
        raw[1, 2, 7, 3] = np.nan
        raw[2, 0, 9, 4] = -np.inf
    original = raw.copy()
    pre = Preprocessing(bands=[1, 2, 3, 4], nodata=7, method=method, **STATS)
    tensor = torch.from_numpy(raw)
    image, valid = getattr(pre, path)(tensor)
    expected = [pre(r) for r in raw]
    assert image.dtype == torch.float32 and valid.shape == (3, 20, 12)
    np.testing.assert_array_equal(valid.numpy(), np.stack([v for _, v in expected]))
    np.testing.assert_allclose(image.numpy(), np.stack([x for x, _ in expected]), rtol=1e-6, atol=1e-6)
    assert (image[:, :, :3] == 0).all() and (image[0, :, 5] != 0).any()
    np.testing.assert_array_equal(tensor.numpy(), original)  # the input is left alone
    single, _ = getattr(pre, path)(tensor[0])  # [C, H, W] works too
    assert torch.equal(single, image[0])


@pytest.mark.parametrize("path", ["normalize_tensor", "_normalize_torch"])
def test_normalize_tensor_without_nodata_keeps_zeros(path):
    pre = Preprocessing(bands=[1], nodata=None, mean=[1.0], std=[2.0])
    image, valid = getattr(pre, path)(torch.zeros(1, 1, 2, 2, dtype=torch.uint16))
    assert valid.all() and torch.equal(image, torch.full((1, 1, 2, 2), -0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_tensor_on_cuda_equals_the_numpy_preprocessing():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 200, (2, 4, 16, 16)).astype("uint16")
    raw[:, :, :2] = 7
    pre = Preprocessing(bands=[1, 2, 3, 4], nodata=7, **STATS)
    image, valid = pre.normalize_tensor(torch.from_numpy(raw).cuda())
    assert image.device.type == "cuda"
    expected = [pre(r) for r in raw]
    np.testing.assert_array_equal(valid.cpu().numpy(), np.stack([v for _, v in expected]))
    np.testing.assert_allclose(image.cpu().numpy(), np.stack([x for x, _ in expected]), rtol=1e-6, atol=1e-6)


def test_device_constants_are_made_once_and_not_pickled():
    import pickle

    pre = Preprocessing(bands=[1, 2], nodata=0, mean=[1.0, 2.0], std=[3.0, 4.0])
    raw = torch.ones(2, 2, 4, 4, dtype=torch.uint16)
    pre._normalize_torch(raw)
    first = pre._device_constants(raw.device)
    pre._normalize_torch(raw)
    assert all(a is b for a, b in zip(pre._device_constants(raw.device), first))  # no copy per batch
    pre.mean = [5.0, 6.0]  # changed statistics are not served from the cache
    assert pre._device_constants(raw.device)[0].flatten().tolist() == [5.0, 6.0]
    clone = pickle.loads(pickle.dumps(pre))
    assert "_on_device" not in clone.__dict__ and clone == pre and clone.to_dict() == pre.to_dict()
