"""Checkpoint files: atomic writes, and loads that never unpickle arbitrary objects."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainlab.config import ConfigError

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    """A trainlab checkpoint, loaded with weights_only=True; clear errors for missing or damaged files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass the path of a last.pt or best.pt, e.g. "
                          "checkpoint.resume=outputs/runs/<run>/checkpoints/last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(f"checkpoint {path} holds objects that are not plain tensors, numbers or strings; "
                          f"refusing to unpickle it ({str(error).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConfigError(f"checkpoint {path} is corrupted or incomplete ({error})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise ConfigError(f"checkpoint {path} is not a trainlab checkpoint (no format_version)")
    return state


def rng_state() -> dict:
    """Every random state the run uses, as tensors and plain numbers (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples that a round trip through a checkpoint may turn into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
