"""Skip connections: find them in a model, and split the gradient between their two paths.

Three kinds are found:

- ``residual``: torchvision-style ``BasicBlock``/``Bottleneck`` (``y = act(branch(x) + shortcut(x))``
  with the branch entering at ``conv1`` and the shortcut being ``downsample`` or the identity).
  The two paths are ``branch`` and ``shortcut``: the gradient reaching the block input ``x``
  through ``conv1`` and through the shortcut. They sum to the gradient at ``x`` due to the block.
- ``unet``: geobp's :class:`~geobp.models.unet.SkipConnection` modules. Paths ``skip`` (the
  gradient reaching the encoder feature through the decoder skip) and ``deeper`` (through every
  other consumer of that feature, i.e. the deeper encoder path). They sum to the gradient at the
  output of the skip's source module (``UNet.skip_sources``).
- ``pattern``: any module whose name matches a user regex, treated like a U-Net skip carrier:
  ``through`` (the gradient reaching the module's input through the module) and ``elsewhere``
  (through every other consumer of the same tensor).

:class:`SkipTaps` measures those paths with hooks that exist only while armed: a forward
pre-hook hands the module a view of its input (``x.view_as(x)``, free) and registers a tensor
hook on the view, which sees exactly the gradient that flows back through that use. No full
backward hook is used, so in-place operations (torchvision's ``out += identity; relu_``) are safe.
The one path not observable on its own (the identity shortcut, and the deeper U-Net path) is the
difference of two observed gradient tensors, kept only until the second one arrives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torchvision.models.resnet import BasicBlock, Bottleneck

from geobp.models.unet import SkipConnection

SkipKind = Literal["residual", "unet", "pattern"]

#: Names of the two paths of each kind, (observed first, the other).
PATHS: dict[str, tuple[str, str]] = {
    "residual": ("branch", "shortcut"),
    "unet": ("skip", "deeper"),
    "pattern": ("through", "elsewhere"),
}


@dataclass(frozen=True)
class SkipSpec:
    """One skip connection found in a model.

    Attributes:
        name: module path of the block (residual) or of the skip module (unet, pattern).
        kind: ``residual``, ``unet`` or ``pattern``.
        source: for ``unet`` skips, the module path whose output the skip carries, else None.
    """

    name: str
    kind: SkipKind
    source: str | None = None

    @property
    def paths(self) -> tuple[str, str]:
        """Names of the two paths, numerator first (the ratio is ``paths[0] / paths[1]``)."""
        return PATHS[self.kind]


def is_residual_block(module: nn.Module) -> bool:
    """Whether ``module`` is a torchvision-style residual block (by type, or by name and shape).

    Blocks of other libraries count when their class is called ``BasicBlock`` or ``Bottleneck``
    and they have a ``conv1`` module and a ``downsample`` attribute (module or None).
    """
    if isinstance(module, (BasicBlock, Bottleneck)):
        return True
    return (type(module).__name__ in ("BasicBlock", "Bottleneck")
            and isinstance(getattr(module, "conv1", None), nn.Module)
            and hasattr(module, "downsample")
            and (module.downsample is None or isinstance(module.downsample, nn.Module)))


def find_skips(root: nn.Module, pattern: str | None = None) -> list[SkipSpec]:
    """Find the skip connections of ``root``, in module order.

    Args:
        root: the model (any module).
        pattern: optional regular expression; modules whose path matches it (``re.search``) and
            that are not already found as residual or U-Net skips are added as ``pattern`` skips.

    Returns:
        The skips found.
    """
    sources: dict[str, str] = {}
    for name, module in root.named_modules():
        table = getattr(module, "skip_sources", None)
        if isinstance(table, dict) and isinstance(getattr(module, "skips", None), nn.ModuleDict):
            prefix = f"{name}." if name else ""
            sources.update({f"{prefix}skips.{k}": f"{prefix}{v}" for k, v in table.items()})
    regex = re.compile(pattern) if pattern else None
    found: list[SkipSpec] = []
    for name, module in root.named_modules():
        if not name:
            continue
        if is_residual_block(module):
            found.append(SkipSpec(name, "residual"))
        elif isinstance(module, SkipConnection):
            found.append(SkipSpec(name, "unet", sources.get(name)))
        elif regex is not None and regex.search(name):
            found.append(SkipSpec(name, "pattern"))
    return found


def _tap(x: Any, hook: Any) -> Tensor | None:
    """A view of ``x`` whose gradient goes to ``hook``, or None when no gradient will flow."""
    if not isinstance(x, Tensor) or not x.requires_grad or not torch.is_grad_enabled():
        return None
    view = x.view_as(x)
    view.register_hook(hook)
    return view


class SkipTaps:
    """Armed hooks measuring the gradient through both paths of each skip (see module doc).

    Norms accumulate as sums of squares over every backward while armed (several micro-batches
    under gradient accumulation give the root-sum-square of their norms), in float32, on the
    gradients' device; nothing is copied to the host here.

    Args:
        root: the model the specs were found in.
        specs: the skips to measure.
    """

    def __init__(self, root: nn.Module, specs: list[SkipSpec]) -> None:
        modules = dict(root.named_modules())
        self.specs = specs
        self._modules = [modules[s.name] for s in specs]
        self._handles: list[RemovableHandle] = []
        self._sumsq: list[list[Tensor | None]] = [[None, None] for _ in specs]
        self._pending: list[list[Tensor]] = [[] for _ in specs]

    @property
    def armed(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def arm(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for k, (spec, module) in enumerate(zip(self.specs, self._modules)):
            if spec.kind == "residual":
                self._handles.append(module.register_forward_pre_hook(partial(self._block_input, k)))
                self._handles.append(module.conv1.register_forward_pre_hook(partial(self._branch_input, k)))
                if module.downsample is not None:
                    self._handles.append(
                        module.downsample.register_forward_pre_hook(partial(self._shortcut_input, k)))
            else:
                self._handles.append(module.register_forward_pre_hook(partial(self._carrier_input, k)))

    def disarm(self) -> None:
        """Remove the hooks and drop any gradient still held (measurements are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for pending in self._pending:
            pending.clear()

    def collect(self) -> Tensor | None:
        """The measured norms as ``[K, 2]`` float32 (``-1`` where a path was not observed), and reset.

        Returns:
            The tensor on the gradients' device, or None when nothing was measured.
        """
        values = [v for pair in self._sumsq for v in pair if v is not None]
        if not values:
            self._sumsq = [[None, None] for _ in self.specs]
            return None
        device = values[0].device
        missing = torch.tensor(-1.0, device=device)
        out = torch.stack([v.sqrt() if v is not None else missing for pair in self._sumsq for v in pair])
        self._sumsq = [[None, None] for _ in self.specs]
        return out.view(len(self.specs), 2)

    # ----- hooks -----------------------------------------------------------------------------

    def _add(self, k: int, path: int, grad: Tensor) -> None:
        sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        prev = self._sumsq[k][path]
        self._sumsq[k][path] = sq if prev is None else prev + sq

    def _replace_input(self, args: tuple[Any, ...], hook: Any) -> tuple[Any, ...] | None:
        view = _tap(args[0] if args else None, hook)
        return None if view is None else (view, *args[1:])

    def _block_input(self, k: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return self._replace_input(args, partial(self._on_block_total, k))

    def _branch_input(self, k: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return self._replace_input(args, partial(self._on_branch, k))

    def _shortcut_input(self, k: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        return self._replace_input(args, partial(self._add, k, 1))

    def _carrier_input(self, k: int, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        view = _tap(x, partial(self._on_carrier, k))
        if view is None:
            return None
        # The original tensor's hook sees the gradient from all of its consumers.
        x.register_hook(partial(self._on_carrier_total, k))
        return (view, *args[1:])

    def _on_branch(self, k: int, grad: Tensor) -> None:
        self._add(k, 0, grad)
        if self._modules[k].downsample is None:
            self._pending[k].append(grad)  # the identity shortcut is the block total minus this

    def _on_block_total(self, k: int, grad: Tensor) -> None:
        if self._modules[k].downsample is None:
            branch = self._pending[k].pop() if self._pending[k] else None
            self._add(k, 1, grad if branch is None else grad - branch)

    def _on_carrier(self, k: int, grad: Tensor) -> None:
        self._add(k, 0, grad)
        self._pending[k].append(grad)

    def _on_carrier_total(self, k: int, grad: Tensor) -> None:
        through = self._pending[k].pop() if self._pending[k] else None
        self._add(k, 1, grad if through is None else grad - through)
