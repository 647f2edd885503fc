"""Writing a run's report while it trains: the JSON at once, the page in a background thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geobp.callbacks.jsonfile import JSON_NAME, atomic_write_text, stamped, write_json
from geobp.callbacks.report import HTML_NAME, render_html


class ReportWriter:
    """Writes ``gradflow.json`` and ``report.html`` into one folder, each atomically.

    Rendering the page takes seconds (matplotlib), so a write during training may render it in a
    daemon thread from a snapshot of the data; an error there is raised by the next write.

    Args:
        folder: the report folder (``<trainer.log_dir>/gradflow``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.last_write = -float("inf")  # time.monotonic() of the latest write
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    @property
    def json_path(self) -> Path:
        return self.folder / JSON_NAME

    @property
    def html_path(self) -> Path:
        return self.folder / HTML_NAME

    def write(self, data: Mapping[str, Any], background: bool = False) -> tuple[Path, Path]:
        """Write the JSON now, and the page now or in the background.

        Args:
            data: the gradflow document.
            background: render the page in a thread from a snapshot of ``data``, so training
                goes on meanwhile; skipped while the previous rendering still runs.

        Returns:
            ``(json_path, html_path)``.

        Raises:
            Exception: the error of a previous background rendering, if any.
        """
        data = stamped(data)  # the page shows the same "updated" time as the JSON
        json_path = write_json(data, self.json_path, stamp=False)
        self.last_write = time.monotonic()
        if not background:
            self.wait()
            atomic_write_text(self.html_path, render_html(data))
        elif self._thread is None or not self._thread.is_alive():
            snapshot = json.loads(json_path.read_text(encoding="utf-8"))
            self._thread = threading.Thread(target=self._render, args=(snapshot,), name="gradflow-report",
                                            daemon=True)
            self._thread.start()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return json_path, self.html_path

    def _render(self, data: Mapping[str, Any]) -> None:
        try:
            atomic_write_text(self.html_path, render_html(data))
        except Exception as err:  # raised by the next write
            self._error = err

    def wait(self) -> None:
        """Wait for a page being rendered in the background, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
