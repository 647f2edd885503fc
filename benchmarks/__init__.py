"""Side-by-side benchmarks of geobp, written to ``BENCHMARKS.md`` by one command.

``python -m benchmarks run`` runs every section (each in its own process), takes medians of
several repeats, and renders the Markdown report with the machine, the commands to reproduce,
the ratios and PASS/MISS against each target. Sections:

- ``loading``: training tiles per second of geobp against torchgeo and a bare rasterio loop;
- ``training``: Lightning step time against a hand-written loop, gradient-flow monitor overhead;
- ``inference``: ``predict_raster`` throughput against the bare model, and its peak memory;
- ``tta``: the cost of test-time augmentation, and its effect on accuracy on synthetic scenes;
- ``gpu``: absolute GPU numbers, measured by ``benchmarks/gpu.py`` on a CUDA machine.
"""
