"""Test-time augmentation: a model's class probabilities averaged over flips and quarter turns of its input.

Each tile batch is transformed (flipped, turned), the model predicts each transformed batch,
each prediction is transformed back onto the tile's pixels, and the softmax probabilities are
averaged. ``flips`` uses the four flips (identity, left-right, up-down, both); ``d4`` the eight
elements of the dihedral group (the quarter turns 0, 90, 180 and 270 degrees, each with and
without a left-right flip), which needs square tiles (geobp's tiles are square).

:func:`tta_forward` runs inside the sliding-window loop of :mod:`geobp.inference.predict`, on
the batch the readers delivered once: there is no extra pass over the file, and the blend, the
outputs and distributed inference are the same as without augmentation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from geobp.choices import TTA, check_choice
from geobp.errors import ConfigError, format_error


@dataclasses.dataclass(frozen=True)
class Transform:
    """One flip-and-turn of [..., H, W] tensors: flip first (``hflip`` reverses the columns,
    ``vflip`` the rows), then turn by ``turns`` quarter turns (``torch.rot90`` from the first
    spatial axis towards the second)."""

    turns: int = 0
    hflip: bool = False
    vflip: bool = False

    @property
    def dims(self) -> tuple[int, ...]:
        """The axes flipped."""
        return (*((-2,) if self.vflip else ()), *((-1,) if self.hflip else ()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` transformed (the input itself for the identity)."""
        if self.dims:
            x = torch.flip(x, self.dims)
        return torch.rot90(x, self.turns, (-2, -1)) if self.turns % 4 else x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """``y``, a prediction for a transformed input, put back on the input's pixels: the
        inverse transform (turn back, then the same flips: flips are their own inverses)."""
        if self.turns % 4:
            y = torch.rot90(y, -self.turns, (-2, -1))
        return torch.flip(y, self.dims) if self.dims else y


#: The transforms of each mode, the identity first.
TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "none": (Transform(),),
    "flips": (Transform(), Transform(hflip=True), Transform(vflip=True), Transform(hflip=True, vflip=True)),
    "d4": tuple(Transform(turns, hflip) for hflip in (False, True) for turns in range(4)),
}


def transforms(mode: TTA) -> tuple[Transform, ...]:
    """The transforms averaged by ``mode``.

    Raises:
        ConfigError: an unknown mode.
    """
    check_choice("tta", mode, TTA)
    return TRANSFORMS[mode]


def tta_forward(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, mode: TTA = "none") -> torch.Tensor:
    """The logits of ``model`` on ``image``, with the class probabilities averaged over the transforms of ``mode``.

    Without augmentation (``none``) this is ``model(image)``, untouched. With it, it is the
    float32 log of the averaged probabilities,
    ``log(mean over t of t.invert(softmax(model(t.apply(image)))))``: logits whose softmax is
    that average (it sums to 1, so softmax only renormalises, within float32 rounding). The
    caller's softmax and blend therefore run unchanged, and the class map (the argmax) and
    the probability outputs are those of the averaged probabilities, not of averaged logits
    (averaging logits would weight a confident transform more than an unsure one).

    The transformed batches keep the input's memory format (channels-last stays channels-last),
    and they run under whatever autocast the caller has entered; probabilities are computed and
    averaged in float32.

    Args:
        model: any callable from float [B, C, H, W] tiles to logits [B, K, H, W] (a module, a
            compiled or exported model's runner).
        image: the batch of tiles.
        mode: ``none``, ``flips`` (4 forward passes) or ``d4`` (8; needs H == W).

    Returns:
        [B, K, H, W] logits (float32 log-probabilities when augmented).

    Raises:
        ConfigError: an unknown mode, ``d4`` on non-square tiles, or a model whose output does
            not have the input's height and width (it cannot be transformed back).
    """
    chosen = transforms(mode)
    if len(chosen) == 1:
        return model(image)
    height, width = image.shape[-2:]
    if height != width and any(t.turns % 2 for t in chosen):
        raise ConfigError(format_error(
            None, f"tta {mode!r} turns the tiles by 90 degrees, which needs square tiles (found {height} x {width})",
            "use square tiles, or tta 'flips'"))
    fmt = torch.channels_last if image.dim() == 4 and image.is_contiguous(memory_format=torch.channels_last) \
        and not image.is_contiguous() else torch.contiguous_format
    total: torch.Tensor | None = None
    for t in chosen:
        x = t.apply(image)
        logits = model(x if x is image else x.contiguous(memory_format=fmt))
        del x
        if tuple(logits.shape[-2:]) != (height, width):
            raise ConfigError(format_error(
                None, f"model output has shape {list(logits.shape)} for input tiles {list(image.shape)}: with tta "
                f"{mode!r} each prediction is flipped back onto the tile, so it needs the tile's height and width",
                "use a model whose logits have the input's size, or tta 'none'"))
        probs = t.invert(torch.softmax(logits.float(), dim=1))
        del logits
        total = probs if total is None else total.add_(probs)
    assert total is not None
    # the mean's log: float32 rounding may leave the mean a few ulps off summing to 1, which the
    # caller's softmax renormalises; a class no transform gives any probability is log(0) = -inf,
    # and softmax maps it back to 0
    return total.div_(len(chosen)).log_()
