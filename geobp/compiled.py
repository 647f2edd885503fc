"""``model.compile``: the model's forward through ``torch.compile``, the model itself left as it is.

The compiled callable is kept beside the model, not in its place: the module tree, the layer
names (``model.encoder.layer1.0.conv1``), the ``state_dict`` keys (no ``_orig_mod.`` prefix) and
every hook a callback registers stay those of the plain model. A forward pass through a model
that carries hooks (the gradient-flow monitor arms them on its recording steps) runs eagerly, so
the hooks fire as written and the compiled graphs stay valid for the other steps.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from geobp.errors import ConfigError, format_error

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: torch.compile backend. Tests set ``"aot_eager"`` (the same graph capture and autograd split,
#: no code generation) to stay fast; nothing else should change it.
BACKEND = "inductor"


def compile_mode(value: bool | str | None) -> str | None:
    """The ``torch.compile`` mode of a ``model.compile`` value: None (off), or a mode name.

    Raises:
        ConfigError: an unknown mode.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise ConfigError(format_error(
            None, f"model.compile: unknown mode {value!r}",
            f"set model.compile to false, true or one of {', '.join(COMPILE_MODES)}"))
    return str(value)


def has_hooks(model: nn.Module) -> bool:
    """Whether a forward or backward module hook is registered on ``model``, any of its modules,
    or globally (for all modules)."""
    glob = nn.modules.module
    if (glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks
            or glob._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


class CompiledForward:
    """Calls ``model`` through ``torch.compile(model, mode=mode)``, built at the first call, and
    eagerly while the model carries hooks.

    Not an ``nn.Module``: assigned to a module's attribute it is no child, so it adds nothing to
    ``state_dict``, ``named_modules`` or ``parameters``. Pickling (``ddp_spawn``) drops the
    compiled callable; it is built again at the next call.

    Attributes:
        compiled_calls: forward passes that went through the compiled model.
        eager_calls: forward passes run eagerly because the model carried hooks.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.model = model
        self.mode = mode
        self.compiled_calls = 0
        self.eager_calls = 0
        self._fn: Any = None

    def __call__(self, x: Tensor) -> Tensor:
        if has_hooks(self.model):
            self.eager_calls += 1
            return self.model(x)
        if self._fn is None:
            # a mode is inductor's setting; another backend takes none
            self._fn = (torch.compile(self.model, mode=self.mode) if BACKEND == "inductor"
                        else torch.compile(self.model, backend=BACKEND))
        self.compiled_calls += 1
        return self._fn(x)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fn"] = None
        return state
