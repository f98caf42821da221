"""Checkpoint files: atomic writes, loads that never unpickle arbitrary objects, and finding what to resume."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omegaconf import DictConfig, OmegaConf

from trainlab.config import CONF_DIR, ConfigError
from trainlab.files import as_if_created, write_text_atomic

log = logging.getLogger("trainlab")

FORMAT_VERSION = 2  # 2: mid-epoch position (in_epoch), the previous last.pt kept as last.prev.pt
TMP_SUFFIX = ".tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (read-only directory, full disk, ...): the run must stop."""


def save_atomic(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: never a half-written file.

    keep_previous: first hard-link the current file as <stem>.prev<suffix> (no copy), so a fallback
    survives even if the file system later loses the new one. Failures raise CheckpointWriteError.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        as_if_created(fd)
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.is_file():
            _replace_with_link(path, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        raise CheckpointWriteError(error.errno, f"could not write checkpoint {path}: {error.strerror or error}; "
                                   "the run stops rather than continue unsaved (check free space and "
                                   "permissions of the run directory)") from error
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink(missing_ok=True)


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _replace_with_link(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` atomically (a hard link; a copy where links are unsupported)."""
    staging = target.with_name(f".{target.name}.{os.getpid()}{TMP_SUFFIX}")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:
        shutil.copy2(source, staging)
    os.replace(staging, target)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without it a power cut may bring back the old directory entry."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `directory`; returns what was removed."""
    stale = sorted(p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning(f"removed {len(stale)} incomplete checkpoint file(s) left by an interrupted write: "
                    + ", ".join(p.name for p in stale))
    return stale


def load(path: str | Path, absent_fix: str = "") -> dict:
    """A trainlab checkpoint, loaded with weights_only=True; clear errors for missing or damaged files (`absent_fix`
    ends the message for a path that is no file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"checkpoint {path} {what}{absent_fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found is None:  # not a pickle at all: a text file, a truncated legacy file
            raise ConfigError(f"checkpoint {path} is corrupted or not a checkpoint (torch cannot read it)") from None
        raise ConfigError(f"checkpoint {path} holds objects that are not plain tensors, numbers or strings "
                          f"(pickled {found.group(1)}); refusing to unpickle it, since that could run code. "
                          "trainlab's own checkpoints hold none; load only files you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"checkpoint {path} is corrupted or incomplete ({detail})") from None
    except Exception:  # noqa: BLE001 - a text file can reach the unpickler's internals (KeyError, IndexError)
        raise ConfigError(f"checkpoint {path} is corrupted or not a checkpoint (torch cannot read it)") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise ConfigError(f"checkpoint {path} is not a trainlab checkpoint (no format_version)")
    return state


def rng_state() -> dict:
    """Every global random state the run uses, as tensors and plain numbers (loadable with weights_only)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if len(state["cuda"]) > 0 and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples that a round trip through a checkpoint may turn into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- resuming -----------------------------------------------------------------------------------


def find_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """checkpoint.resume as (path, loaded state); auto: the newest loadable last.pt of `ckpt_dir`, None to start
    fresh."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()  # best.pt holds weights only: a run continues from its last.pt
        return path, load(path, "; pass the path of a run's last.pt, e.g. checkpoint.resume=outputs/runs/<run>/"
                                "checkpoints/last.pt, or checkpoint.resume=auto with hydra.run.dir=<run directory>")
    last = ckpt_dir / "last.pt"
    damaged = []
    for path in (last, previous_path(last)):  # newest first: last.prev.pt is the one before
        if path.is_file():
            try:
                return path, load(path)
            except ConfigError as error:
                log.warning(f"checkpoint.resume=auto: skipping {path}: {error}")
                damaged.append(path.name)
    if damaged:  # a fresh start would overwrite the run's best.pt, metrics.csv and summary.json with nothing to show
        raise ConfigError(f"checkpoint.resume=auto: {' and '.join(damaged)} in {ckpt_dir} cannot be loaded, so the run "
                          "cannot continue; nothing was changed. Resume from another checkpoint by its path, or start "
                          "a new run in a new directory (leave out hydra.run.dir)")
    log.info(f"checkpoint.resume=auto: no last.pt in {ckpt_dir}; starting fresh")
    return None


def model_mismatch(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], show: int = 6) -> str | None:
    """The missing, unexpected and shape-mismatched keys between two state dicts, or None when they fit."""

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:show]) + (f" and {len(keys) - show} more" if len(keys) > show else "")

    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    mismatched = [f"{k} (checkpoint {list(saved[k].shape)}, model {list(v.shape)})"
                  for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    parts = [f"{name}: {listed(keys)}" for name, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("size mismatch", mismatched)) if keys]
    return "; ".join(parts) if parts else None


def _saved_group(config_yaml: str | None, group: str) -> dict[str, Any] | None:
    """A group of a checkpoint's embedded config as plain data (never instantiated, not to be changed: it is shared);
    None when it cannot be read."""
    config = _saved_config(config_yaml)
    node = config.get(group, {}) if isinstance(config, dict) else None
    return node if isinstance(node, dict) else None


@functools.lru_cache(maxsize=2)
def _saved_config(config_yaml: str | None) -> Any:
    """A checkpoint's embedded config as plain data, parsed once for the resume's checks and hints; None when it
    cannot be read."""
    try:
        return OmegaConf.to_container(OmegaConf.create(config_yaml), resolve=False)
    except Exception:  # noqa: BLE001 - hints and checks only: a damaged config must not hide the real error
        return None


def override(key: str, value: Any) -> str:
    """`key=value` as it can be typed after `train` (lists without spaces, so no quotes are needed)."""
    return f"{key}={shown(value)}"


def shown(value: Any) -> str:
    """A config value as an override writes it: null, true, [0.9,0.999]."""
    if isinstance(value, (list, dict, bool)) or value is None:
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def saved_options(config_yaml: str | None, group: str) -> str:
    """A group of a checkpoint's embedded config (model, optimizer) as overrides: the option file(s) of the group
    with its _target_ and keys (optimizer=sgd; where several fit, optimizer=a|b), then every key."""
    node = _saved_group(config_yaml, group)
    if node is None:
        return "(the config saved in the checkpoint cannot be read)"
    target = node.get("_target_")
    files = {path.stem: OmegaConf.load(path) for path in (CONF_DIR / group).glob("*.yaml")}
    options = sorted(name for name, option in files.items() if target is not None and option.get("_target_") == target)
    # of those, the ones with exactly the saved keys (sgd, not momentum or nesterov, for a plain SGD)
    options = [name for name in options if set(files[name]) == set(node)] or options
    keys = [override(f"{group}.{k}", v) for k, v in node.items() if k not in ("_target_", "_partial_")]
    return " ".join(([f"{group}={'|'.join(options)}"] if options else []) + keys)


def changed_options(config_yaml: str | None, cfg: DictConfig, group: str, keys: tuple[str, ...] | None = None,
                    ignore: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> list[str]:
    """`group.key=saved (here: value)` for each key of a group (or only `keys`, less `ignore`) whose value in a
    checkpoint's embedded config differs from `cfg`'s. A key the saved config lacks came after the checkpoint, whose
    run had its default: compared with `defaults` (the group's schema defaults) where given, else left out. None
    when the saved config cannot be read."""
    saved = _saved_group(config_yaml, group)
    if saved is None:
        return []
    here = OmegaConf.to_container(cfg[group], resolve=True)
    if defaults is not None:
        saved = {**{key: value for key, value in defaults.items() if key in here}, **saved}
    names = [key for key in (keys if keys is not None else sorted(saved)) if key in saved and key not in ignore]
    return [f"{override(f'{group}.{key}', saved[key])} (here: {shown(here[key]) if key in here else 'unset'})"
            for key in names if saved[key] != here.get(key, ...)]


def class_name(obj: object) -> str:
    return type(obj).__name__


def saved_optimizer_class(state: dict[str, Any]) -> str | None:
    """The name of the optimizer class a last.pt was trained with (Adam, UncorrectedAdam, SGD, ...). A last.pt from
    before it was saved: the last part of its config's optimizer._target_. None when neither can be read."""
    if "optimizer_class" in state:
        return str(state["optimizer_class"])
    target = (_saved_group(state.get("config"), "optimizer") or {}).get("_target_")
    return str(target).rsplit(".", 1)[-1] if target is not None else None


# --- snapshots (checkpoint.snapshots=cycles) -------------------------------------------------------

SNAPSHOT_NAME = re.compile(r"^snapshot_(\d+)\.pt$")


def snapshot_name(epoch: int) -> str:
    """The file name of the snapshot taken at the end of `epoch`."""
    return f"snapshot_{epoch}.pt"


def snapshots(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every snapshot in a checkpoints directory, by epoch."""
    found = [(int(m.group(1)), p) for p in directory.glob("snapshot_*.pt") if (m := SNAPSHOT_NAME.match(p.name))]
    return sorted(found)


def keep_snapshots_up_to(directory: Path, epoch: int) -> list[Path]:
    """Delete the snapshots taken after `epoch` (a resumed run takes them again); returns what was removed."""
    removed = [path for e, path in snapshots(directory) if e > epoch]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        _fsync_dir(directory)
        log.info(f"removed snapshot(s) of epochs after {epoch}, which this run takes again: "
                 + ", ".join(p.name for p in removed))
    return removed


def keep_metrics_up_to(path: Path, epoch: int) -> None:
    """Drop metrics.csv rows after `epoch`: a resumed run writes them again."""
    if not path.is_file():
        return
    kept, dropped = metrics_up_to(path, epoch)
    if dropped:  # written whole or not at all: a kill here must not lose the rows kept
        write_text_atomic(path, kept, newline="")


def metrics_up_to(path: Path, epoch: int) -> tuple[str, int]:
    """The text of metrics.csv with its header and rows up to `epoch`, and the number of rows after it."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epoch]
    text = io.StringIO()
    csv.writer(text).writerows(kept)
    return text.getvalue(), len(rows) - len(kept)
