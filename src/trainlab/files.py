"""Small text files written whole or not at all (summary.json): no torch import, so the sweep launcher can use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into a temporary file beside `path`, flushed and fsynced, then renamed over it: a kill or a full disk
    mid-write leaves the previous file (or none), never a truncated one that readers choke on."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
