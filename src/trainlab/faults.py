"""What ends a run early but cleanly: stop signals (preemption, Ctrl-C), non-finite steps, running out of memory."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Iterator

import torch

from trainlab.layer_stats import global_norm

log = logging.getLogger("trainlab")

# SIGTERM is what schedulers send before preempting or cancelling a job; SLURM can send SIGUSR1 ahead of time.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, getattr(signal, "SIGUSR1", signal.SIGTERM): 143}
NONFINITE_POLICIES = ("stop", "skip")
NONFINITE_CHECKS = ("auto", "step", "interval")


class Interrupted(Exception):
    """A stop signal arrived and the run saved last.pt: it ends with status interrupted."""

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        super().__init__(f"{signal_name(signum)} at {where}")

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODES.get(self.signum, 143)


def signal_name(signum: int) -> str:
    return "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name


class Diverged(Exception):
    """The loss or the gradient norm became NaN or infinite; no checkpoint holds the non-finite weights."""


class StopSignals:
    """While entered, SIGINT, SIGTERM and SIGUSR1 are handled here; the previous handlers come back on exit.

    Before `defer` is set (start-up: data, model) a signal raises Interrupted at once: there is nothing to
    save. Once training starts, a signal only records itself and the loop looks after every step, so a
    second signal, even one arriving while last.pt or summary.json is written, interrupts nothing.
    Outside the main thread (where Python cannot install handlers) this does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.defer = False  # False until training starts: a signal during start-up ends the run at once
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: object) -> None:
        if not self.defer:
            raise Interrupted(signum, "start-up, before training began")
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class NonfiniteGuard:
    """Checks each step's loss and global gradient norm after backward, before the optimizer step.

    check="step" reads the verdict every step (a host sync, free on a CPU): a bad step is skipped or
    the run stops before the optimizer touches the weights. check="interval" keeps the verdict on the
    device (no sync) and the run reads it with `raise_if_diverged` at each logging interval, at the end
    of each epoch and before every checkpoint, so it stops there, naming the first bad step; weights
    updated by a bad step are never saved. Gradients are not checked under fp16 loss scaling: the
    scaler skips steps with inf gradients itself, which is normal.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], device: torch.device, *, check: str, policy: str,
                 max_skips: int, check_grads: bool):
        self.params = list(params)
        self.check, self.policy, self.max_skips, self.check_grads = check, policy, max_skips, check_grads
        self.epoch, self.skipped = 0, 0
        self._recorded: list[tuple[int, torch.Tensor]] = []  # interval mode: (step, loss) not yet read
        self._found, self._one = torch.zeros((), device=device), torch.ones((), device=device)  # step mode

    def __call__(self, loss: torch.Tensor, step: int) -> bool:
        """True: take the optimizer step. False: skip it (policy skip). Raises Diverged to stop."""
        if self.check == "interval":  # no device work at all: the losses and the weights are read later, at once
            self._recorded.append((step, loss.detach()))
            return True
        value = loss.detach().float().item()  # the per-step sync of check=step (free on a CPU)
        grads = [p.grad for p in self.params if p.grad is not None] if self.check_grads else []
        if math.isfinite(value) and not (grads and self._any_nonfinite(grads)):
            return True
        norm = global_norm(grads).item() if grads else None  # only for the message
        what = f"loss {value}" + (f", gradient norm {norm}" if norm is not None else "")
        where = f"epoch {self.epoch}, step {step}"
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning(f"non-finite step skipped ({what}) at {where}: {self.skipped} of at most "
                        f"trainer.max_nonfinite_skips={self.max_skips}")
            return False
        budget = (f" after skipping {self.skipped} (trainer.max_nonfinite_skips={self.max_skips})"
                  if self.policy == "skip" else "")
        raise Diverged(f"{what} at {where}, stopped before its optimizer step{budget}")

    def _any_nonfinite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether any element of `tensors` is NaN or infinite: one fused pass (the kernel GradScaler uses)."""
        self._found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, self._found, self._one)
        return bool(self._found.item())

    def raise_if_diverged(self) -> None:
        """Interval mode: read the losses recorded since the last call and the weights' norm (one sync); stop at
        the first non-finite loss, or when a non-finite gradient already reached the weights."""
        if self.check != "interval" or not self._recorded:
            return
        steps = [step for step, _ in self._recorded]
        parts = [torch.stack([loss.float() for _, loss in self._recorded])]
        if self.check_grads and self.params:  # an inf gradient with a finite loss shows in the weights it touched
            parts.append(global_norm(self.params).view(1))
        values = torch.cat(parts).tolist()
        self._recorded.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise Diverged(f"loss {value} at epoch {self.epoch}, step {step} (trainer.nonfinite_check=interval "
                               "reads the losses once per logging interval; no checkpoint holds the weights after it)")
        if len(values) > len(steps) and not math.isfinite(values[-1]):
            raise Diverged(f"non-finite weights after step {steps[-1]} of epoch {self.epoch}: a non-finite gradient "
                           f"in steps {steps[0]}-{steps[-1]} (trainer.nonfinite_check=interval)")


def check_mode(check: str, policy: str, device: torch.device) -> str:
    """auto: step on the CPU, where a sync costs nothing; interval on a GPU. skip needs step (a sync per step)."""
    if policy == "skip" or check == "step":
        return "step"
    if check == "interval":
        return "interval"
    return "step" if device.type == "cpu" else "interval"


@contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """trainer.deterministic: PyTorch's deterministic algorithms (an op without one raises), restored after."""
    if not enabled:
        yield
        return
    if not torch.cuda.is_initialized():  # cuBLAS reads this once, when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[1], previous[2]


def nondeterministic_op(error: BaseException) -> str | None:
    """The message of an op refused by deterministic mode, or None for any other error."""
    text = str(error)
    return text.splitlines()[0] if "does not have a deterministic implementation" in text else None


def out_of_memory_message(batch_size: int, device: torch.device) -> str:
    """What to tell the user when the device ran out of memory: batch size, peak memory, the override to try."""
    peak = ""
    if device.type == "cuda":
        gib = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = f", peak {gib:.2f} GiB allocated of {total:.1f} GiB"
    return (f"out of memory on {device} at data.batch_size={batch_size}{peak}; try data.batch_size={max(1, batch_size // 2)}"
            " (or trainer.precision=bf16, a smaller model, or data.eval_batch_size lower if it failed in evaluation)")
