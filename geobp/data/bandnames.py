"""The names of the selected bands, and the pretrained weights they are matched with.

Names come from ``data.band_names`` when given, else the files' band descriptions, else
``band_<i>``. Scenes that describe their bands differently are a warning, or an error when
pretrained weights match bands by name (the order would be wrong without it).
"""

from __future__ import annotations

import warnings

from geobp.bands import canonical_band, default_band_name
from geobp.data.scenes import Scene
from geobp.errors import BandMismatchError, ConfigError, format_error
from geobp.pretrained import PretrainedWeights, is_pretrained_name, match_bands, resolve_pretrained


def pretrained_for(weights: str | None) -> PretrainedWeights | None:
    """The torchgeo weights named by ``data.pretrained_weights`` (metadata only), or None for no
    name or a local file path."""
    return resolve_pretrained(weights) if is_pretrained_name(weights) else None  # type: ignore[arg-type]


def resolve_band_names(
    scenes: list[Scene], names: list[str] | None, bands: list[int], pretrained: PretrainedWeights | None = None
) -> list[str]:
    """One name per selected band, in the model's input order; checked against ``pretrained``.

    Args:
        scenes: the dataset's scenes (the first one's band count and descriptions lead).
        names: ``data.band_names``, one per band of the files; None uses the descriptions.
        bands: the selected 1-based band indices.
        pretrained: weights whose bands must be matched by name (before any statistics).

    Returns:
        The selected bands' names.

    Raises:
        ConfigError: ``names`` has not one name per band of the files, or too few bands in
            common with ``pretrained``.
        BandMismatchError: scenes describe their bands differently while ``pretrained`` is set.
    """
    first = scenes[0].image
    if names is not None:
        if len(names) != first.count:
            raise ConfigError(format_error(
                None, f"data.band_names has {len(names)} names for the {first.count} bands of the files",
                "give one name per band of the files, in file order (data.bands then selects from them)"))
        full = [str(n) for n in names]
    else:
        described = first.descriptions or (None,) * first.count
        full = [d or default_band_name(i) for i, d in enumerate(described, start=1)]
        for scene in scenes[1:]:
            other = scene.image.descriptions
            if [canonical_band(d or "") for d in other] == [canonical_band(d or "") for d in first.descriptions]:
                continue
            problem = f"band descriptions {list(other)} differ from {list(first.descriptions)} of {first.path}"
            fix = "write the same band order and descriptions into every image, or set data.band_names"
            if pretrained is not None:
                raise BandMismatchError(format_error(scene.image.path, problem, fix))
            warnings.warn(format_error(scene.image.path, problem, fix), UserWarning, stacklevel=3)
            break
    selected = [full[b - 1] for b in bands]
    if pretrained is not None:
        match_bands(selected, pretrained)  # too few bands in common: stop now, before statistics
    return selected
