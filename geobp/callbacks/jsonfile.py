"""``gradflow.json`` on disk: atomic writes, and reading with a check of the schema and version.

The document itself (keys, shapes, encoding of non-finite numbers) is described in
:mod:`geobp.callbacks.series`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from geobp.atomic import atomic_write_text
from geobp.callbacks.series import SCHEMA, SCHEMA_VERSION
from geobp.errors import DataNotFoundError, format_error

#: Folder of the report under the run's log directory, and the data file's name in it.
REPORT_DIR = "gradflow"
JSON_NAME = "gradflow.json"


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write a gradflow document atomically (``allow_nan=False``: encode non-finite values first)."""
    path = Path(path)
    doc = dict(data)
    doc.setdefault("meta", {})
    doc["meta"] = {**doc["meta"], "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(path, json.dumps(doc, allow_nan=False, separators=(",", ":")))
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    """Read and check a ``gradflow.json``.

    Raises:
        DataNotFoundError: missing file, not JSON, or not a gradflow document of a known version.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(format_error(path, "gradflow data not found",
                                             "pass the gradflow.json written by GradientFlowMonitor"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataNotFoundError(format_error(path, f"cannot read the gradflow data ({err})",
                                             "re-run training, or pass an intact gradflow.json")) from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DataNotFoundError(format_error(
            path, f"not a gradflow document (expected schema {SCHEMA!r})",
            "pass the gradflow.json written by GradientFlowMonitor"))
    if data.get("version") != SCHEMA_VERSION:
        raise DataNotFoundError(format_error(
            path, f"unsupported gradflow version (expected {SCHEMA_VERSION}, found {data.get('version')!r})",
            "render it with the geobp version that wrote it"))
    return data
