"""Small text files written whole or not at all (summary.json): no torch import, so the sweep launcher can use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: setting it to read it is not thread-safe


def as_if_created(fd: int) -> None:
    """Give a mkstemp file (0600) the permissions open() would have given it under the umask (0644 under 0022), so a
    run's files can be read by whoever can read the directory."""
    os.fchmod(fd, 0o666 & ~UMASK)


def write_text_atomic(path: Path, text: str, newline: str | None = None) -> None:
    """`text` into a temporary file beside `path`, flushed and fsynced, then renamed over it: a kill or a full disk
    mid-write leaves the previous file (or none), never a truncated one that readers choke on."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_if_created(fd)
        with os.fdopen(fd, "w", newline=newline) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
