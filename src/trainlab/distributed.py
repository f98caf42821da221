"""Several processes on one machine (torchrun): each takes an equal part of every batch, DDP averages the gradients.

Every rank runs the same loop on the same global batch order and makes the same decisions from the same numbers
(epoch totals, validation, the stop signal are summed across ranks first); only rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the GPU index on this machine

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Ranks:
    """The ranks torchrun sets in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def start(ranks: Ranks, device: str) -> None:
    """Join the process group: NCCL for CUDA, gloo for the CPU (trainer.device decides, as in one process)."""
    cuda = device != "cpu" and not device.startswith("mps") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not ranks.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not ranks.active:
        return [value]
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return values


def summed(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over the ranks (in place; one collective)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def mean_norm_statistics(module: nn.Module, world: int, keep: Iterable[nn.Module] = ()) -> None:
    """Make every batch norm's running mean and variance the ranks' mean (one collective per tensor), except the
    modules in `keep` (frozen ones, the same on every rank). Each rank's forward passes update them from its part of
    the batch, so without this each rank would evaluate a different model, and best.pt (rank 0's) none of them."""
    kept = set(map(id, keep))
    for norm in module.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None and id(norm) not in kept:
            for buffer in (norm.running_mean, norm.running_var):
                summed(buffer).div_(world)


def first_signal(received: int | None, device: torch.device) -> int | None:
    """The stop signal any rank received (the largest number when several did), the same on every rank."""
    flag = torch.tensor([received or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (one collective)."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


FAILURE_KEY = "trainlab/failure/{rank}"


def _store() -> Any:
    """The process group's key-value store (torchrun's, which outlives the workers); None without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=10))  # a failing run must not wait minutes on an unreachable store
    return store


def publish_failure(ranks: Ranks, failure: dict[str, Any]) -> None:
    """Leave this rank's failure (time, reason, traceback) in the store, where rank 0 reads it after this process is
    gone: rank 0 itself sees only its own collective fail ("Connection closed by peer")."""
    try:
        store = _store()
        if store is not None:
            store.set(FAILURE_KEY.format(rank=ranks.rank), json.dumps(failure))
    except Exception:  # noqa: BLE001 - best effort: the failure is in this rank's own log either way
        pass


def failures(ranks: Ranks) -> dict[int, dict[str, Any]]:
    """The failures the other ranks published, by rank."""
    found: dict[int, dict[str, Any]] = {}
    try:
        store = _store()
        for rank in range(ranks.world) if store is not None else ():
            key = FAILURE_KEY.format(rank=rank)
            if rank != ranks.rank and store.check([key]):
                found[rank] = json.loads(store.get(key))
    except Exception:  # noqa: BLE001 - an unreachable store: rank 0 reports what it saw itself
        pass
    return found
