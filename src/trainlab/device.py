"""The device a run trains on and how fast it goes there: precision, backend flags, threads, memory format, compile."""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext

import torch
from omegaconf import DictConfig
from torch import nn

from trainlab.config import ConfigError

log = logging.getLogger("trainlab")



def select_device(name: str) -> torch.device:
    """auto: CUDA, then MPS, then CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"trainer.device={name}: no CUDA device is available here; use trainer.device=cpu "
                              "or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"trainer.device={name}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name}: MPS is not available here; use trainer.device=cpu or auto")
    return device


def select_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that supports it, else fp32 (the CPU default: autocast there is rarely faster)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision=bf16: this GPU has no bf16; use trainer.precision=fp16 or fp32")
    return name


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast to bf16 or fp16; for fp32 no context at all: entering a disabled torch.autocast still sets and
    restores its thread-local state, which measured 7 µs a step inside a small MLP's loop on a CPU (torch 2.14)."""
    if precision not in ("bf16", "fp16"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def switch(value: object) -> str:
    """A tri-state config value (auto | true | false; YAML booleans included) as one of those strings."""
    return str(value).lower()


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def configure_backends(trainer: DictConfig, device: torch.device) -> int:
    """Set the process-wide speed knobs of trainer (threads, TF32, cuDNN autotuning); returns the thread count.

    threads=null uses every available core, unless OMP_NUM_THREADS is set (a sweep launcher that
    splits cores between jobs sets it), which torch already honours.
    """
    if trainer.threads is not None:
        torch.set_num_threads(int(trainer.threads))
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(available_cores())
    if device.type == "cuda":
        # TF32 tensor cores for fp32 matmuls and convolutions: ~10 bits of mantissa, the usual trade on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = bool(trainer.tf32)
        torch.backends.cudnn.allow_tf32 = bool(trainer.tf32)
        # Autotuned convolution algorithms are fastest, but may differ from run to run.
        torch.backends.cudnn.benchmark = not trainer.deterministic
    return torch.get_num_threads()


def uses_channels_last(trainer: DictConfig, model: nn.Module) -> bool:
    """auto: channels_last for models with 2-D convolutions (NHWC is what tensor cores and oneDNN want)."""
    choice = switch(trainer.channels_last)
    if choice == "auto":
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    return choice == "true"


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile(model, mode) for mode default | reduce-overhead | max-autotune; the model itself for false.

    The compiled module shares the parameters of `model`, so state dicts are taken from `model` as usual.
    """
    mode = switch(mode)
    if mode == "false":
        return model
    mode = "default" if mode == "true" else mode
    return torch.compile(model, mode=mode)  # type: ignore[return-value]
