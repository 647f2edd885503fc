"""The writer thread of inference: blends predicted tiles and writes finished strips while the model runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

from geobp.inference.blend import TileBlender


class BlendWriter:
    """Writer thread: blends tiles and hands finished strips to a sink it opens itself.

    ``open_sink()`` runs in the thread and returns an object with ``write(row, strip)``,
    ``complete`` and ``close()``: the output files (:class:`_OutputSink`) or one process's
    share of them (:class:`geobp.inference.parts.PartSink`).
    """

    def __init__(self, blender: TileBlender, open_sink: Callable[[], Any]) -> None:
        self.blender = blender
        self.open_sink = open_sink
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.abort = False
        self.sink: Any = None
        self.thread = threading.Thread(target=self._run, name="geobp-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sink = self.open_sink()
            while True:
                item = self.queue.get()
                if item is None or self.abort:
                    break
                tiles, probs, valid = item
                for n, (i, j) in enumerate(tiles):
                    done = self.blender.add(i, j, probs[n], valid[n])
                    if done is not None:
                        row, strip = done
                        if isinstance(strip, torch.Tensor):
                            strip = strip.cpu().numpy()
                        self.sink.write(row, strip)
        except BaseException as err:  # reported to the calling thread
            self.error = err
        finally:
            if self.sink is not None:
                self.sink.close()

    def put(self, item: Any) -> None:
        """Queue an item, waiting while the queue is full; re-raise the thread's error."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():
                raise RuntimeError("writer thread stopped")
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Flush everything, close the files; raise the thread's error or an incomplete output."""
        self.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.sink is None or not (self.blender.done and self.sink.complete):
            raise RuntimeError("prediction ended before every tile was written")

    def cancel(self) -> None:
        """Stop without finishing (the outputs are discarded by the caller)."""
        self.abort = True
        while self.thread.is_alive():  # wake it if it waits for an item; it stops at the next one
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
