"""Pure gradient measurements: which modules are layers, and fused norms over their gradients.

Nothing here touches a trainer; every function takes modules or tensors and returns tensors on
the gradients' device, so a caller decides when (and how rarely) to copy them to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Layer:
    """A module that owns parameters directly (``parameters(recurse=False)``).

    Attributes:
        name: module path inside the root module (the root's class name for the root itself).
        type: the module's class name.
        numel: number of trainable elements it owns.
        params: indices of its parameters in the flat list returned by :func:`find_layers`.
    """

    name: str
    type: str
    numel: int
    params: tuple[int, ...]


def find_layers(root: nn.Module) -> tuple[list[Layer], list[nn.Parameter]]:
    """List the layers of ``root`` in module (definition) order, and their trainable parameters.

    A parameter shared by several modules belongs to the first one that owns it.

    Args:
        root: any module (a LightningModule included).

    Returns:
        ``(layers, params)``: the layers, and the flat parameter list their ``params`` index.
    """
    seen: set[int] = set()
    layers: list[Layer] = []
    params: list[nn.Parameter] = []
    for name, module in root.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        if not own:
            continue
        index = []
        for p in own:
            seen.add(id(p))
            index.append(len(params))
            params.append(p)
        layers.append(Layer(name or type(root).__name__, type(module).__name__,
                            sum(p.numel() for p in own), tuple(index)))
    return layers, params


def find_frozen(root: nn.Module) -> list[Layer]:
    """The modules of ``root`` whose own parameters all have ``requires_grad=False`` (frozen on purpose).

    Args:
        root: any module.

    Returns:
        One :class:`Layer` per such module, in module order (``params`` empty: not monitored).
    """
    out = []
    for name, module in root.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            out.append(Layer(name or type(root).__name__, type(module).__name__, sum(p.numel() for p in own), ()))
    return out


def find_band_conv(root: nn.Module, name: str | None = None) -> tuple[str, nn.Conv2d] | None:
    """The convolution whose weight gradient tells how much each input band is used.

    Args:
        root: the model.
        name: module path of the convolution; None takes the first ``nn.Conv2d`` in module order
            (the stem of ResNets and of geobp's models).

    Returns:
        ``(name, conv)``, or None when ``name`` is None and the model has no ungrouped
        ``nn.Conv2d`` with trainable weights.

    Raises:
        KeyError: ``name`` is given but is not an ``nn.Conv2d`` of ``root`` (the message lists
            the candidates).
    """
    convs = [(n, m) for n, m in root.named_modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.requires_grad]
    if name is None:
        return convs[0] if convs else None
    for n, m in convs:
        if n == name:
            return n, m
    shown = ", ".join(n for n, _ in convs[:8]) + (" ..." if len(convs) > 8 else "")
    raise KeyError(f"{name!r} is not an ungrouped, trainable nn.Conv2d of the model (candidates: {shown or 'none'})")


def grad_norms(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm of each gradient, fused (``torch._foreach_norm``), as one float32 vector.

    Args:
        grads: gradient tensors, all on one device.

    Returns:
        ``[len(grads)]`` float32 on that device (empty on CPU for no gradients).
    """
    if not grads:
        return torch.zeros(0)
    return torch.stack(torch._foreach_norm(list(grads))).float()


def grad_max_abs(grads: Sequence[Tensor]) -> Tensor:
    """Largest absolute value of each gradient, as one float32 vector (NaN where a NaN is present).

    On CUDA this is one fused ``torch._foreach_norm(ord=inf)``; on CPU, where that kernel is slow
    next to an L2 norm, one ``aminmax`` per tensor is used instead, over the tensor's memory in
    storage order (a strided reduction over a channels-last gradient is slower; timings in
    BENCHMARKS.md, section 2).

    Args:
        grads: gradient tensors, all on one device.

    Returns:
        ``[len(grads)]`` float32 on that device.
    """
    if not grads:
        return torch.zeros(0)
    if grads[0].is_cuda:
        return torch.stack(torch._foreach_norm(list(grads), float("inf"))).float()
    # max(|min|, |max|); aminmax ignores NaN in neither direction, so NaN propagates.
    ends = torch.stack([torch.stack(torch.aminmax(memory_order(g))) for g in grads]).float().abs()
    return ends.amax(dim=1)


def memory_order(t: Tensor) -> Tensor:
    """``t`` flattened in the order of its memory: a view when ``t`` is dense (e.g. channels-last).

    For reductions whose result does not depend on the order (max, min, sums up to rounding).
    """
    if t.is_contiguous():
        return t.view(-1)
    dims = sorted(range(t.ndim), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    permuted = t.permute(dims)
    return permuted.view(-1) if permuted.is_contiguous() else t.reshape(-1)


def layer_reduce(param_norms: Tensor, param_max: Tensor, layer_of_param: Tensor,
                 num_layers: int) -> tuple[Tensor, Tensor]:
    """Combine per-parameter statistics into per-layer ones.

    Args:
        param_norms: ``[P]`` L2 norms.
        param_max: ``[P]`` max absolute values.
        layer_of_param: ``[P]`` int64 layer index of each parameter.
        num_layers: number of layers ``L``.

    Returns:
        ``(norm, max_abs)``, each ``[L]``: the L2 norm over each layer's parameters and the largest
        absolute value (0 for layers without parameters in ``P``; NaN/Inf propagate).
    """
    device = param_norms.device
    sq = torch.zeros(num_layers, device=device).index_add_(0, layer_of_param, param_norms.square())
    mx = torch.zeros(num_layers, device=device).scatter_reduce_(0, layer_of_param, param_max, "amax")
    return sq.sqrt(), mx


def band_norms(weight_grad: Tensor) -> Tensor:
    """L2 norm of a convolution's weight gradient per input channel (``weight.grad[:, b]``).

    Args:
        weight_grad: ``[out, in, *kernel]``.

    Returns:
        ``[in]`` float32.
    """
    dims = [0, *range(2, weight_grad.ndim)]
    return torch.linalg.vector_norm(weight_grad, dim=dims, dtype=torch.float32)


def input_max_abs(images: Tensor) -> Tensor:
    """Largest absolute value of each tile's bands, ``[B, C]`` float32 on the images' device (NaN propagates).

    Args:
        images: ``[B, C, *spatial]``.
    """
    flat = images.detach().flatten(2)
    return torch.maximum(flat.amax(dim=2), flat.amin(dim=2).neg()).float()


def weight_snapshot(params: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Copies of the parameters (one fused kernel) and their L2 norms, before an optimizer step.

    Returns:
        ``(copies, norms)``: the detached copies and ``[P]`` float32 norms, on the parameters' device.
    """
    with torch.no_grad():
        copies = torch._foreach_mul([p.detach() for p in params], 1.0)
        norms = torch.stack(torch._foreach_norm(copies)).float()
    return copies, norms


def update_ratios(params: Sequence[Tensor], copies: list[Tensor], norms: Tensor, layer_of_param: Tensor,
                  num_layers: int) -> Tensor:
    """Per layer, ``||w_after - w_before|| / ||w_before||`` after an optimizer step.

    Args:
        params: the parameters, now updated.
        copies, norms: from :func:`weight_snapshot` before the step (``copies`` is overwritten).
        layer_of_param: ``[P]`` int64 layer index of each parameter.
        num_layers: number of layers ``L``.

    Returns:
        ``[L]`` float32; NaN where a layer's weights were all zero (no ratio defined).
    """
    with torch.no_grad():
        torch._foreach_sub_(copies, [p.detach() for p in params])
        diff = torch.stack(torch._foreach_norm(copies)).float()
    device = diff.device
    before = torch.zeros(num_layers, device=device).index_add_(0, layer_of_param, norms.square()).sqrt()
    change = torch.zeros(num_layers, device=device).index_add_(0, layer_of_param, diff.square()).sqrt()
    return torch.where(before > 0, change / before, torch.nan)
