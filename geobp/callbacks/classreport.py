"""``ClassFrequencyReport``: the training class frequencies and what the sampler shows, at the start of fit."""

from __future__ import annotations

from typing import Any

import lightning as L
from rich.console import Console
from rich.table import Table


def class_table(summary: dict[str, list], weights: list[float] | None = None, title: str = "Training classes") -> Table:
    """A rich table of a class summary (``names``, ``pixels``, ``share`` and optionally ``uniform``
    and ``sampled``, as :meth:`GeoTiffDataModule.class_summary` returns), with loss weights if given."""
    table = Table(title=title)
    columns = [("class", "names", None), ("pixels", "pixels", "{:,}"), ("share", "share", "{:.2%}"),
               ("shown, uniform", "uniform", "{:.2%}"), ("shown, this run", "sampled", "{:.2%}")]
    present = [c for c in columns if c[1] in summary]
    for header, _, _ in present:
        table.add_column(header, justify="left" if header == "class" else "right")
    if weights is not None:
        table.add_column("loss weight", justify="right")
    for i in range(len(summary["names"])):
        row = [fmt.format(summary[key][i]) if fmt else str(summary[key][i]) for _, key, fmt in present]
        if weights is not None:
            row.append(f"{weights[i]:.3f}")
        table.add_row(*row)
    return table


class ClassFrequencyReport(L.Callback):
    """Print and log the class frequencies of the training split at the start of ``fit``.

    Needs a data module with ``class_summary()`` (:class:`~geobp.data.datamodule.GeoTiffDataModule`).
    The masks' class histograms are read only when the run needs them anyway
    (``data.sampling: balanced`` or ``model.class_weights: auto``) or with ``always``.

    Logged once, at step 0, per class name: ``classes/pixel_share/<name>`` (share of the labelled
    training pixels), ``classes/shown_share/<name>`` (expected share among the pixels of the
    training tiles under the run's sampling) and, when the loss has class weights,
    ``classes/loss_weight/<name>``.

    Args:
        always: read the masks for the report even when the run does not need them.
    """

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm: Any = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "class_summary"):
            return
        if not (self.always or dm.sampling_options.sampling == "balanced" or dm.cell_histograms_loaded):
            return
        summary = dm.class_summary()
        criterion = getattr(pl_module, "criterion", None)
        weight = getattr(criterion, "weight", None)
        weights = [float(w) for w in weight.tolist()] if weight is not None else None
        metrics: dict[str, float] = {}
        for i, name in enumerate(summary["names"]):
            metrics[f"classes/pixel_share/{name}"] = float(summary["share"][i])
            metrics[f"classes/shown_share/{name}"] = float(summary["sampled"][i])
            if weights is not None:
                metrics[f"classes/loss_weight/{name}"] = weights[i]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        if trainer.is_global_zero:
            sampling = dm.hparams.get("sampling", "uniform")
            Console(stderr=True).print(class_table(summary, weights, title=f"Training classes (sampling: {sampling})"))
