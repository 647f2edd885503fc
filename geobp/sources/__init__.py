"""Where pixels come from: local files, URLs on object storage, STAC items, several sources on one grid.

Each input form produces the same thing, a list of :class:`~geobp.sources.bandref.BandRef` per
scene (:mod:`~geobp.sources.urls` for URLs and object storage, :mod:`~geobp.sources.stac` for STAC
items), and :mod:`~geobp.sources.stack` reads such a list as a window on the reference scene's
grid. :mod:`~geobp.sources.locations` keeps local paths and URLs side by side for the rest of
geobp (GDAL paths, names without the query string, cache stamps and the local cache folder of
remote data). This package sits below :mod:`geobp.data` and :mod:`geobp.inference` and imports neither.
"""
