"""What ends a run early but cleanly: stop signals (preemption, Ctrl-C), non-finite steps, running out of memory."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Iterator

import torch

from trainlab.layer_stats import global_norm
from trainlab.loop import EpochTotals

log = logging.getLogger("trainlab")

# SIGTERM is what schedulers send before preempting or cancelling a job; SLURM can send SIGUSR1 ahead of time.
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, getattr(signal, "SIGUSR1", signal.SIGTERM): 143}
NONFINITE_POLICIES = ("stop", "skip")
NONFINITE_CHECKS = ("auto", "step", "interval")


class Interrupted(BaseException):
    """A stop signal arrived and the run saved last.pt (or, at start-up, had nothing to save): it ends with status
    interrupted. A BaseException, as KeyboardInterrupt: raised from a signal handler wherever start-up is, it must pass
    the `except Exception` of what it interrupts (a damaged cache's fallback took it for a bad file and trained on)."""

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

    what = "non-finite training step"


class DivergedInValidation(Diverged):
    """Training stayed finite but the model's validation loss did not: its outputs overflow (weights blown up by
    too high a learning rate, say). The epoch's weights are neither the best nor last.pt."""

    what = "non-finite validation loss"


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
    """Stops a run at its first non-finite step; never lets a checkpoint hold weights such a step touched.

    check="step": called after backward, before the optimizer step, it reads the loss and checks every gradient
    (a host sync per step): a bad step is skipped (policy skip) or the run stops before the optimizer touches
    the weights. check="interval": no work per step. The epoch's EpochTotals read each step's loss anyway, once
    per logging interval; `raise_if_diverged` looks at what they read and at the weights' norm (read in the same
    transfer at an interval, on its own at an epoch's end and before a checkpoint), and stops the run there,
    naming the first bad step. Gradients are not checked under fp16 loss scaling: the scaler skips steps with
    inf gradients itself, which is normal.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], device: torch.device, *, check: str, policy: str,
                 max_skips: int, check_grads: bool, agree: Callable[[bool], bool] | None = None):
        self.params = list(params)
        self.check, self.policy, self.max_skips, self.check_grads = check, policy, max_skips, check_grads
        self.agree = agree  # torchrun (step mode): True when every rank's step was finite, so all skip or stop alike
        self.epoch, self.skipped = 0, 0
        self._totals: EpochTotals | None = None  # interval mode: the running epoch's losses
        self._checked_step = 0  # interval mode: every step up to this one was finite
        self._found, self._one = torch.zeros((), device=device), torch.ones((), device=device)  # step mode

    def __call__(self, loss: torch.Tensor, step: int) -> bool:
        """Step mode. True: take the optimizer step. False: skip it (policy skip). Raises Diverged to stop."""
        value = loss.detach().float().item()  # the per-step sync of check=step
        grads = [p.grad for p in self.params if p.grad is not None] if self.check_grads else []
        finite = math.isfinite(value) and not (grads and self._any_nonfinite(grads))
        finite_everywhere = finite if self.agree is None else self.agree(finite)
        if finite_everywhere:
            return True
        norm = global_norm(grads).item() if grads else None  # only for the message
        what = f"loss {value}" + (f", gradient norm {norm}" if norm is not None else "")
        if finite:  # torchrun: this rank's step was finite, another's was not
            what = f"a non-finite step on another process ({what} here)"
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

    def watch(self, totals: EpochTotals) -> None:
        """Interval mode: the totals of the epoch that starts (or resumes)."""
        self._totals = totals

    def raise_if_diverged(self, weight_norm: float | None = None) -> None:
        """Interval mode: stop at the first non-finite loss the epoch's totals read, or when a non-finite gradient
        already reached the weights. `weight_norm` was read with a logging interval; without it, it is read here
        (one sync, only when steps were taken since the last check)."""
        totals = self._totals
        if self.check != "interval" or totals is None or totals.last_step == self._checked_step:
            return
        totals.fold()  # the steps since the last interval (nothing when an interval has just read them)
        if totals.nonfinite is not None:
            step, value = totals.nonfinite
            raise Diverged(f"loss {value} at epoch {self.epoch}, step {step} (trainer.nonfinite_check=interval "
                           "reads the losses once per logging interval; no checkpoint holds the weights after it)")
        if self.check_grads and self.params:  # an inf gradient with a finite loss shows in the weights it touched
            norm = weight_norm if weight_norm is not None else global_norm(self.params).item()
            if not math.isfinite(norm):
                raise Diverged(f"non-finite weights after step {totals.last_step} of epoch {self.epoch}: a "
                               f"non-finite gradient in steps {self._checked_step + 1}-{totals.last_step} "
                               "(trainer.nonfinite_check=interval)")
        self._checked_step = totals.last_step


def check_mode(check: str, policy: str) -> str:
    """auto: interval, unless on_nonfinite=skip, which needs step (a sync per step, to skip before the update).

    Step mode is not free on a CPU either: reading the loss and checking every gradient cost a small MLP 2-3 % of
    its step time, for a verdict that interval mode gives a few steps later with the same guarantee for the
    checkpoints."""
    if policy == "skip" or check == "step":
        return "step"
    return "interval"


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
    return (f"out of memory on {device} at data.batch_size={batch_size}{peak}; "
            f"try data.batch_size={max(1, batch_size // 2)}"
            " (or trainer.precision=bf16, a smaller model, or data.eval_batch_size lower if it failed in evaluation)")
