"""The writer thread of inference: blends predicted tiles and writes finished strips while the model runs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch

from geobp.inference.blend import TileBlender
from geobp.inference.sinks import OutputLayout, OutputSink


class BlendWriter:
    """Writer thread: blends tiles and hands each sink its bands of every finished strip.

    The thread opens the sinks (:meth:`OutputSink.open`) before it takes the first item; the
    blender's encoders must be those of ``sinks``, in the same order (their bands follow one
    another in each strip). :meth:`finish` commits the sinks, :meth:`cancel` aborts them.
    """

    def __init__(self, blender: TileBlender, sinks: Sequence[OutputSink], layout: OutputLayout) -> None:
        if len(blender.encoders) != len(sinks):
            raise ValueError(f"{len(blender.encoders)} encoders for {len(sinks)} sinks")
        self.blender = blender
        self.sinks = list(sinks)
        self.layout = layout
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.abort = False
        self.thread = threading.Thread(target=self._run, name="geobp-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for sink in self.sinks:
                sink.open(self.layout)
            offsets = self.blender.band_offsets
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
                        for sink, b0, b1 in zip(self.sinks, offsets, offsets[1:]):
                            sink.write(row, strip[b0:b1])
        except BaseException as err:  # reported to the calling thread
            self.error = err

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
        """Flush everything and commit the sinks; raise the thread's error or an incomplete output
        (and then abort the sinks)."""
        self.put(None)
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            if not self.blender.done:
                raise RuntimeError("prediction ended before every tile was written")
            for sink in self.sinks:
                sink.commit()
        except BaseException:
            self._abort_sinks()
            raise

    def cancel(self) -> None:
        """Stop without finishing and abort the sinks (nothing of the outputs is left)."""
        self.abort = True
        while self.thread.is_alive():  # wake it if it waits for an item; it stops at the next one
            try:
                self.queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
        self._abort_sinks()

    def _abort_sinks(self) -> None:
        for sink in self.sinks:
            sink.abort()
