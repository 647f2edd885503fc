"""The DataLoaders of the data module: resumable training loader, and one builder for every split."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from geobp.data.dataset import TileDataset, collate_tiles
from geobp.data.options import LoaderOptions
from geobp.data.samplers import GridTileSampler, RandomTileSampler
from geobp.processes import environment_initializer, start_context


class ResumableTileLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch by Lightning (``state_dict``/``load_state_dict``).

    Lightning stores ``state_dict()`` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
    and, when a run restarts inside an epoch, calls ``load_state_dict`` before iterating again. The
    state is the sampler's epoch and the number of batches handed out in that epoch; restored, the
    next iteration over the same epoch starts at the following tile of the (seed, epoch) draw, so the
    resumed run trains on exactly the batches the interrupted one had left. Without it a plain
    DataLoader restarts the epoch's iterator: Lightning's batch counter goes on while the batches
    are the epoch's first ones again.

    The count is exact because Lightning does not prefetch from loaders with a length, and a
    checkpoint is taken between batches (every N steps, on SIGTERM, at validation); only an
    interrupt inside a training step (Ctrl-C) makes that batch count as done.

    The sampler must be a :class:`RandomTileSampler`. Iteration is lazy: the underlying iterator
    (and its workers' first index requests) is made at the first ``next``, after Lightning's
    ``set_epoch``, so a run resumed in epoch ``e > 0`` with ``num_workers > 0`` draws epoch ``e``.

    Args:
        current_epoch: returns the trainer's ``current_epoch`` (None without a trainer); the epoch
            drawn is its value at the first batch. Lightning 2.6 calls ``set_epoch`` with its count
            of processed epochs, which after resuming from a checkpoint saved by an epoch-end
            validation runs one ahead of ``current_epoch`` (it replays that epoch's end, without
            batches): the resumed run would draw other tiles than an uninterrupted one.
    """

    def __init__(self, *args: Any, current_epoch: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch
        self._epoch = 0
        self._batches = 0
        self._restore: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        assert isinstance(sampler, RandomTileSampler)
        epoch = self.current_epoch() if self.current_epoch is not None else None
        if epoch is not None:
            sampler.set_epoch(epoch)
        self._epoch, self._batches = sampler.epoch, 0
        restore, self._restore = self._restore, None
        if restore is not None and restore["epoch"] == sampler.epoch:
            self._batches = restore["batches"]
            sampler.start = self._batches * int(self.batch_size or 1)
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and batches handed out in it (saved by Lightning in every checkpoint)."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the next iteration over ``state_dict["epoch"]`` after its first ``batches`` batches."""
        self._restore = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


def tile_loader(
    dataset: TileDataset,
    sampler: GridTileSampler | RandomTileSampler,
    options: LoaderOptions,
    *,
    pin_memory: bool,
    drop_last: bool,
    current_epoch: Callable[[], int | None] | None = None,
) -> DataLoader:
    """A DataLoader of compact tile batches: a :class:`ResumableTileLoader` for a random
    (training) sampler, a plain DataLoader for a grid sampler.

    Args:
        dataset: the tiles.
        sampler: which tiles this rank reads, in order.
        options: batch size, workers (kept alive between epochs), their prefetch and start method.
        pin_memory: put batches in pinned memory (when they go to a CUDA device).
        drop_last: drop a last, incomplete batch.
        current_epoch: the trainer's epoch, for the resumable loader.

    Returns:
        The DataLoader.
    """
    workers = options.num_workers
    kwargs: dict[str, Any] = dict(
        batch_size=options.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_tiles,
    )
    if workers > 0:
        # not forked from this process by default: it runs threads by now (geobp.processes)
        kwargs["multiprocessing_context"] = start_context(options.worker_start, preload=("geobp.data.dataset",))
        kwargs["worker_init_fn"] = environment_initializer()  # the fork server's may be older
    if workers > 0 and options.prefetch_factor is not None:
        kwargs["prefetch_factor"] = options.prefetch_factor
    if isinstance(sampler, RandomTileSampler):
        return ResumableTileLoader(dataset, current_epoch=current_epoch, **kwargs)  # type: ignore[arg-type]
    return DataLoader(dataset, **kwargs)  # type: ignore[arg-type]
