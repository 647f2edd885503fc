"""Where pixels come from: local files, URLs on object storage, STAC items, several sources on one grid.

Every input form becomes the same thing before the tile dataset, the statistics pass, ``geobp check``
and ``geobp infer`` see it: a list of :class:`~geobp.sources.bandref.BandRef` per scene, read as a
window on the reference scene's grid. This package sits below :mod:`geobp.data` and
:mod:`geobp.inference` and imports neither.
"""
