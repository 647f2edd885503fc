"""Layers, fused norms and per-band gradients: pure functions checked against plain torch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from geobp.callbacks.measure import (
    band_norms,
    find_band_conv,
    find_layers,
    grad_max_abs,
    grad_norms,
    layer_reduce,
    memory_order,
)


def test_layers_are_modules_owning_trainable_parameters_in_module_order() -> None:
    shared = nn.Linear(3, 3)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), shared, shared)
    net[2].weight.requires_grad_(False)
    layers, params = find_layers(net)
    assert [(x.name, x.type, x.numel) for x in layers] == [("0", "Conv2d", 2 * 4 * 9 + 4), ("2", "BatchNorm2d", 4),
                                                          ("3", "Linear", 12)]
    assert [len(x.params) for x in layers] == [2, 1, 2]
    assert len(params) == 5 and params[2] is net[2].bias
    # The root's own parameters are a layer named after its class.
    root = nn.Module()
    root.scale = nn.Parameter(torch.ones(2))
    assert [x.name for x in find_layers(root)[0]] == ["Module"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=6), min_size=1, max_size=5))
def test_fused_norms_match_plain_torch(values: list[list[float]]) -> None:
    grads = [torch.tensor(v) for v in values]
    assert torch.allclose(grad_norms(grads), torch.stack([g.norm() for g in grads]), rtol=1e-5)
    assert torch.equal(grad_max_abs(grads), torch.stack([g.abs().max() for g in grads]))


def test_non_finite_values_propagate() -> None:
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf"), 2.0]), torch.tensor([3.0, -4.0])]
    norms, maxabs = grad_norms(grads), grad_max_abs(grads)
    assert norms[0].isnan() and norms[1].isinf() and norms[2] == 5.0
    assert maxabs[0].isnan() and maxabs[1].isinf() and maxabs[2] == 4.0
    layer_norm, layer_max = layer_reduce(norms, maxabs, torch.tensor([0, 1, 1]), 3)
    assert layer_norm[0].isnan() and layer_norm[1].isinf() and layer_norm[2] == 0.0
    assert layer_max[1].isinf()


def test_layer_reduce_combines_parameters() -> None:
    norm, mx = layer_reduce(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0.5, 2.0, 1.0]), torch.tensor([0, 0, 1]), 2)
    assert norm.tolist() == [5.0, 1.0] and mx.tolist() == [2.0, 1.0]


def test_band_norms_are_per_input_channel() -> None:
    grad = torch.randn(5, 3, 3, 3)
    grad[:, 1] = 0
    expected = torch.stack([grad[:, b].norm() for b in range(3)])
    assert torch.allclose(band_norms(grad), expected)
    assert band_norms(grad)[1] == 0


def test_band_conv_is_the_first_ungrouped_conv2d_or_the_named_one() -> None:
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    assert find_band_conv(net) == ("1", net[1])
    assert find_band_conv(net, "2") == ("2", net[2])
    assert find_band_conv(nn.Linear(2, 2)) is None
    with pytest.raises(KeyError, match=r"'0' is not an ungrouped, trainable nn.Conv2d .*candidates: 1, 2"):
        find_band_conv(net, "0")


def test_max_abs_reads_channels_last_gradients_in_memory_order() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last),
             torch.randn(5, 7, generator=g).t(), torch.randn(6, generator=g)]
    grads[0][3, 1, 2, 0] = -40.0
    assert torch.equal(grad_max_abs(grads), torch.stack([x.abs().max() for x in grads]))
    assert grad_max_abs(grads)[0] == 40.0
    for x in grads:  # views, not copies
        flat = memory_order(x)
        assert flat.data_ptr() == x.data_ptr() and flat.shape == (x.numel(),)
        assert torch.equal(flat.sort().values, x.reshape(-1).sort().values)
    strided = torch.randn(4, 6, generator=g)[:, ::2]  # not dense: copied
    assert torch.equal(memory_order(strided), strided.reshape(-1))
