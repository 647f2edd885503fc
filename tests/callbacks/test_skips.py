"""Skip detection and the two-path gradient split, checked against autograd."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from geobp.callbacks.skips import SkipSpec, SkipTaps, find_skips, is_residual_block
from geobp.models import create_model


def _grad_at(tensors: list[Tensor], loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors, retain_graph=True))


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("block", [
    BasicBlock(8, 8),
    BasicBlock(8, 16, stride=2,
               downsample=nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))),
    Bottleneck(16, 4),
    Bottleneck(8, 4, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))),
], ids=["basic-identity", "basic-downsample", "bottleneck-identity", "bottleneck-downsample"])
def test_branch_plus_shortcut_is_the_input_gradient(block: nn.Module) -> None:
    torch.manual_seed(0)
    root = nn.Sequential(block)
    (spec,) = find_skips(root)
    assert spec == SkipSpec("0", "residual")
    x = torch.randn(2, block.conv1.in_channels, 8, 8, requires_grad=True)
    taps = SkipTaps(root, [spec])
    taps.arm()
    y = root(x)
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    taps.disarm()
    branch, shortcut = taps.collect()[0].tolist()

    # Reference: the same block written with separate leaves for its two paths.
    xb, xs = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    b = block.bn1(block.conv1(xb)).relu()
    if isinstance(block, Bottleneck):
        b = block.bn2(block.conv2(b)).relu()
        b = block.bn3(block.conv3(b))
    else:
        b = block.bn2(block.conv2(b))
    s = block.downsample(xs) if block.downsample is not None else xs
    g_branch, g_shortcut = _grad_at([xb, xs], ((b + s).relu() * weight).sum())
    assert branch == pytest.approx(float(g_branch.norm()), rel=1e-5)
    assert shortcut == pytest.approx(float(g_shortcut.norm()), rel=1e-5)
    # The two paths add up to the whole gradient at the block input.
    assert torch.allclose(g_branch + g_shortcut, x.grad, atol=1e-5)
    assert _hook_counts(root) == 0


def test_torchvision_resnets_are_found_by_block_type() -> None:
    r18 = find_skips(torchvision.models.resnet18())
    r50 = find_skips(torchvision.models.resnet50())
    assert len(r18) == 8 and len(r50) == 16
    assert all(s.kind == "residual" and s.paths == ("branch", "shortcut") for s in r18 + r50)
    assert r18[0].name == "layer1.0" and r50[-1].name == "layer4.2"


def test_blocks_of_other_libraries_are_found_by_name_and_shape() -> None:
    class BasicBlock(nn.Module):  # noqa: N801 - a look-alike of another library's block
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.downsample = None

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)

    assert is_residual_block(BasicBlock())
    assert not is_residual_block(Other())


def test_resnet18_taps_match_autograd_for_every_block() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    specs = find_skips(model)
    taps = SkipTaps(model, specs)
    inputs: dict[str, Tensor] = {}
    grabs = [getattr(model, s.name.split(".")[0])[int(s.name.split(".")[1])].register_forward_pre_hook(
        lambda m, a, name=s.name: inputs.__setitem__(name, a[0])) for s in specs]
    taps.arm()
    loss = model(torch.randn(2, 3, 64, 64)).square().sum()
    # One backward pass (the taps' hooks fire during autograd.grad too).
    totals = _grad_at([inputs[s.name] for s in specs], loss)
    taps.disarm()
    for g in grabs:
        g.remove()
    norms = taps.collect()
    for k, total in enumerate(totals):
        branch, shortcut = norms[k].tolist()
        # |b + s| <= |b| + |s| and, since b + s is the total, |total| is within the triangle.
        assert float(total.norm()) <= branch + shortcut + 1e-4
        assert min(branch, shortcut) > 0


def test_unet_skips_split_the_source_gradient_into_skip_and_deeper() -> None:
    torch.manual_seed(0)
    model = create_model("unet", encoder="resnet18", in_channels=4, num_classes=3)
    specs = find_skips(model)
    unet = [s for s in specs if s.kind == "unet"]
    assert [s.name for s in unet] == ["skips.layer3", "skips.layer2", "skips.layer1", "skips.stem"]
    assert [s.source for s in unet] == ["encoder.layer3", "encoder.layer2", "encoder.layer1", "encoder.relu"]
    assert sum(s.kind == "residual" for s in specs) == 8

    modules = dict(model.named_modules())
    # The deeper path starts at the module after each source (see the UNet docstring); a view
    # handed to that module receives the deeper path's gradient alone.
    deeper_entry = {"skips.layer3": "encoder.layer4", "skips.layer2": "encoder.layer3",
                    "skips.layer1": "encoder.layer2", "skips.stem": "encoder.maxpool"}
    outputs: dict[str, Tensor] = {}
    entries: dict[str, Tensor] = {}
    grabs = []
    for s in unet:
        grabs.append(modules[s.source].register_forward_hook(
            lambda m, a, out, name=s.name: outputs.__setitem__(name, out)))
        grabs.append(modules[deeper_entry[s.name]].register_forward_pre_hook(
            lambda m, a, name=s.name: (entries.setdefault(name, a[0].view_as(a[0])),)))
    taps = SkipTaps(model, unet)
    taps.arm()
    loss = model(torch.randn(2, 4, 64, 64)).square().mean()
    # One backward pass (the taps' hooks fire during autograd.grad too).
    grads = _grad_at([outputs[s.name] for s in unet] + [entries[s.name] for s in unet], loss)
    source_grads, deeper_grads = grads[: len(unet)], grads[len(unet):]
    taps.disarm()
    for g in grabs:
        g.remove()
    norms = taps.collect()
    for k, s in enumerate(unet):
        skip, deeper = norms[k].tolist()
        assert deeper == pytest.approx(float(deeper_grads[k].norm()), rel=1e-4), s.name
        skip_grad = source_grads[k] - deeper_grads[k]
        assert skip == pytest.approx(float(skip_grad.norm()), rel=1e-4), s.name
    assert _hook_counts(model) == 0


def test_pattern_finds_other_skip_carriers() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Linear(4, 4)
            self.bridge = nn.Identity()
            self.deep = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.down(x)
            return self.deep(h) + 3 * self.bridge(h)

    torch.manual_seed(0)
    net = Net()
    assert find_skips(net) == []
    (spec,) = find_skips(net, pattern=r"^bridge$")
    assert spec == SkipSpec("bridge", "pattern") and spec.paths == ("through", "elsewhere")
    taps = SkipTaps(net, [spec])
    taps.arm()
    net(torch.randn(5, 4)).sum().backward()
    taps.disarm()
    through, elsewhere = taps.collect()[0].tolist()
    assert through == pytest.approx(3 * 5 ** 0.5 * 2)  # d/dh of 3*sum(h) over 5x4 entries
    assert elsewhere == pytest.approx(float(net.deep.weight.sum(0).norm() * 5 ** 0.5), rel=1e-5)


def test_taps_stay_silent_without_gradients() -> None:
    model = torchvision.models.resnet18(num_classes=2).eval()
    taps = SkipTaps(model, find_skips(model))
    taps.arm()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    taps.disarm()
    assert taps.collect() is None
