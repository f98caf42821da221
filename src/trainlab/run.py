"""One training run, start to end: validate, build, train with early stopping and checkpoints, test, summarise."""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import time
import traceback
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from trainlab import __version__, checkpoint
from trainlab.augment import build_augment
from trainlab.config import ConfigError, validate
from trainlab.data import DeviceLoader, batch_size_at, build_data, train_loader
from trainlab.early_stopping import EarlyStopping
from trainlab.initialization import initialize
from trainlab.loop import StepParts, evaluate, train_one_epoch
from trainlab.models import build_model
from trainlab.monitor import RunMonitor, final_table
from trainlab.optim import build_optimizer, decayed_parameters, needs_closure
from trainlab.regularization import ema_model, first_swa_epoch, gradient_clipper, penalty, swa_model
from trainlab.schedules import build_scheduler

log = logging.getLogger("trainlab")

EXIT_CODES = {"completed": 0, "stopped_early": 0, "failed": 1, "config_error": 2, "diverged": 3,
              "interrupted": 130}


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
            raise ConfigError(f"trainer.device={name}: no CUDA device is available here; use trainer.device=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"trainer.device={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name}: MPS is not available here; use trainer.device=cpu or auto")
    return device


def select_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import hydra
    import torchvision

    return {"trainlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "hydra": hydra.__version__}


def describe(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DictConfig, data: Any,
             device: torch.device, precision: str) -> None:
    """Announce once what was built."""
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"data: {data.name}  train {len(data.train)} / val {len(data.val)} / test {len(data.test)}  "
             f"input {list(data.input_shape)}  classes {data.num_classes}")
    log.info(f"model: {type(model).__name__} {_knobs(cfg.model)}  {n_params:,} parameters  "
             f"normalization={cfg.normalization.name}  initialization={cfg.initialization.name}")
    groups = ", ".join(f"{g.get('name', i)}: {sum(p.numel() for p in g['params']):,} params "
                       f"decoupled_wd {g.get('weight_decay_decoupled', 0.0):g}"
                       for i, g in enumerate(optimizer.param_groups))
    log.info(f"optimizer: {type(optimizer).__name__} lr {cfg.optimizer.lr:g}  groups [{groups}]")
    log.info(f"scheduler: {_knobs(cfg.scheduler)}   regularization: {_knobs(cfg.regularization)}   "
             f"augmentation: {_knobs(cfg.augmentation)}")
    log.info(f"device: {device}  precision: {precision}  max_epochs: {cfg.trainer.max_epochs}  "
             f"seed: {cfg.seed}")


def _knobs(node: DictConfig) -> str:
    items = OmegaConf.to_container(node, resolve=True)
    return " ".join(f"{k}={v}" for k, v in items.items() if k not in ("_target_", "_partial_"))


class Run:
    """Everything one run builds, and the loop that trains it."""

    def __init__(self, cfg: DictConfig, run_dir: Path, live: bool = False):
        self.cfg, self.run_dir, self.live = cfg, run_dir, live
        self.ckpt_dir = run_dir / "checkpoints"
        self.summary: dict[str, Any] = {"status": "failed", "stop_reason": None, "best_epoch": None,
                                        "epochs_run": 0, "best": None, "test": None}
        self.monitor: RunMonitor | None = None
        self.started = False  # True once training has begun (the run directory then holds a real run)

    def build(self) -> None:
        cfg = self.cfg
        validate(cfg)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # stored in every checkpoint
        seed_everything(cfg.seed)
        self.device = select_device(cfg.trainer.device)
        self.precision = select_precision(cfg.trainer.precision, self.device)
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision=bf16: this GPU has no bf16; use trainer.precision=fp16 or fp32")
        self.data = build_data(cfg.data)
        self.model = build_model(cfg, self.data.input_shape, self.data.num_classes)
        initialize(self.model, cfg.initialization, getattr(self.model, "activation", "relu"))
        self.model.to(self.device)
        d = self.data
        self.train_batches = train_loader(cfg, d, self.device, augment=build_augment(cfg.augmentation))
        self.val_batches = DeviceLoader(d.val, d.mean, d.std, cfg.data.eval_batch_size, self.device)
        self.test_batches = DeviceLoader(d.test, d.mean, d.std, cfg.data.eval_batch_size, self.device)
        steps_per_epoch = len(self.train_batches)
        self.optimizer = build_optimizer(cfg, self.model, steps_per_epoch=steps_per_epoch)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, steps_per_epoch, cfg.trainer.max_epochs,
                                         mode=cfg.early_stopping.mode)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast = autocast_for(self.device, self.precision)
        self.build_regularization()
        stop = cfg.early_stopping
        self.stopper = EarlyStopping(stop.monitor, stop.mode, stop.patience, stop.min_delta, stop.enabled)
        self.best_row: dict[str, float] = {}
        self.start_epoch, self.step = 1, 0
        if cfg.checkpoint.resume is not None:
            self.resume(cfg.checkpoint.resume)
        describe(self.model, self.optimizer, cfg, d, self.device, self.precision)

    def build_regularization(self) -> None:
        """Loss, penalties, clipping and weight averages of cfg.regularization, as parts of every step."""
        reg, model = self.cfg.regularization, self.model
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=reg.label_smoothing)
        decayed = decayed_parameters(self.optimizer)  # l1/l2 skip biases and norm parameters, like decay
        closure_step = needs_closure(self.optimizer)
        if closure_step and self.precision == "fp16":
            raise ConfigError(f"optimizer={type(self.optimizer).__name__} evaluates the loss several times per "
                              "step, which fp16 loss scaling cannot follow; use trainer.precision=bf16 or fp32")
        self.ema = ema_model(model, reg.ema_decay) if reg.ema_decay is not None else None
        self.swa = swa_model(model) if reg.swa_start is not None else None
        self.swa_first_epoch = (first_swa_epoch(reg.swa_start, self.cfg.trainer.max_epochs)
                                if reg.swa_start is not None else None)
        self.parts = StepParts(
            penalty=penalty(decayed, reg.l1, reg.l2),
            clip=gradient_clipper([p for g in self.optimizer.param_groups for p in g["params"]], self.optimizer,
                                  self.scaler, reg.grad_clip_norm, reg.grad_clip_value),
            after_step=(lambda: self.ema.update_parameters(self.model)) if self.ema is not None else None,
            closure_step=closure_step,
        )

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as best: the EMA average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # --- checkpoints -------------------------------------------------------------------------------
    def training_state(self, epoch: int, finished: bool) -> dict[str, Any]:
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "epoch": epoch,
            "step": self.step,
            "finished": finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "early_stopping": self.stopper.state_dict(),
            "best_row": self.best_row,
            "rng": checkpoint.rng_state(),
            "config": self.config_yaml,
        }

    def save_weights(self, name: str, model: nn.Module, epoch: int, **extra: Any) -> None:
        """checkpoints/<name>: one model's weights with the epoch and the run's config (best.pt, swa.pt)."""
        checkpoint.save_atomic({"format_version": checkpoint.FORMAT_VERSION, "epoch": epoch,
                                "model": model.state_dict(), "config": self.config_yaml, **extra},
                               self.ckpt_dir / name)

    def resume(self, path: str) -> None:
        state = checkpoint.load(path)
        if state.get("finished") or state["epoch"] >= self.cfg.trainer.max_epochs:
            raise ConfigError(f"checkpoint.resume={path}: that run already finished (epoch {state['epoch']}, "
                              f"trainer.max_epochs={self.cfg.trainer.max_epochs}); raise trainer.max_epochs to "
                              "train further, or drop checkpoint.resume to start fresh")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ConfigError(f"checkpoint.resume={path} holds a different model: {error}. Use the model options "
                              "that the checkpoint was trained with (its config is saved inside it).") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for name in ("ema", "swa"):
            average = getattr(self, name)
            if (average is None) != (state.get(name) is None):
                raise ConfigError(f"checkpoint.resume={path}: the checkpoint was trained "
                                  f"{'with' if state.get(name) is not None else 'without'} {name}; resume with the "
                                  "regularization options it was trained with")
            if average is not None:
                average.load_state_dict(state[name])
        self.stopper.load_state_dict(state["early_stopping"])
        self.best_row = dict(state.get("best_row", {}))
        checkpoint.set_rng_state(state["rng"])
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        best = Path(path).expanduser().parent / "best.pt"
        if best.is_file() and best.resolve() != (self.ckpt_dir / "best.pt").resolve():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best, self.ckpt_dir / "best.pt")
        log.info(f"resumed from {path} at epoch {self.start_epoch} (step {self.step})")

    # --- the loop -------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        max_epochs = cfg.trainer.max_epochs
        self.monitor = RunMonitor(self.run_dir, tensorboard=cfg.logger.tensorboard, live=self.live,
                                  max_epochs=max_epochs, steps_per_epoch=len(self.train_batches))
        self.started = True
        status, reason, epoch = "completed", f"reached trainer.max_epochs={max_epochs}", self.start_epoch - 1
        for epoch in range(self.start_epoch, max_epochs + 1):
            tic = time.perf_counter()
            self.train_batches.set_epoch(epoch)
            self.train_batches.set_batch_size(batch_size_at(epoch, cfg.data.batch_size, cfg.data.batch_size_schedule))
            self.monitor.start_epoch(epoch, self.step, len(self.train_batches))
            averaging = self.swa is not None and epoch >= self.swa_first_epoch
            if averaging:  # SWA epochs run at their own constant rate instead of the schedule
                for group in self.optimizer.param_groups:
                    group["lr"] = self.cfg.regularization.swa_lr
            lr = self.optimizer.param_groups[0]["lr"]
            result = train_one_epoch(self.model, self.train_batches, self.loss_fn, self.optimizer,
                                     NO_SCHEDULE if averaging else self.scheduler, self.scaler, self.autocast,
                                     self.step, cfg.logger.every_n_steps, self.monitor.train_interval, self.parts)
            self.step = result.step
            if not math.isfinite(result.loss):
                status, reason = "diverged", f"training loss became {result.loss} in epoch {epoch}"
                log.error(f"{reason}; checkpoints keep the last finite state")
                break
            if averaging:
                self.swa.update_parameters(self.model)
            val = evaluate(self.eval_model, self.val_batches, self.autocast)
            row = {"epoch": epoch, "step": self.step, "train/loss": result.loss, "train/acc": result.acc,
                   "val/loss": val["loss"], "val/acc": val["acc"], "lr": lr,
                   "epoch_time_s": time.perf_counter() - tic}
            self.scheduler.epoch_end(row[self.stopper.monitor])
            row["best"] = self.stopper.update(row[self.stopper.monitor], epoch)
            if row["best"]:
                self.best_row = {k: row[k] for k in ("val/loss", "val/acc")}
                self.save_weights("best.pt", self.eval_model, epoch,
                                  metric={self.stopper.monitor: row[self.stopper.monitor]})
            self.monitor.end_epoch(row)
            self.summary["epochs_run"] = epoch
            stop = self.stopper.should_stop
            finished = stop or epoch == max_epochs
            if finished or epoch % cfg.checkpoint.every_n_epochs == 0:
                checkpoint.save_atomic(self.training_state(epoch, finished), self.ckpt_dir / "last.pt")
            if stop:
                status, reason = "stopped_early", self.stopper.reason()
                break
        self.summary.update(status=status, stop_reason=reason)
        self.finish_swa()
        self.test()

    def finish_swa(self) -> None:
        """Recompute batch-norm statistics for the SWA average, evaluate it and save it as swa.pt."""
        if self.swa is None or int(self.swa.n_averaged) == 0:
            if self.swa is not None:
                log.warning("SWA averaged no epoch (the run ended before regularization.swa_start)")
            return
        self.train_batches.set_epoch(0)
        with self.autocast:
            torch.optim.swa_utils.update_bn(self.train_batches, self.swa)
        val = evaluate(self.swa.module, self.val_batches, self.autocast)
        self.summary["swa"] = {"epochs_averaged": int(self.swa.n_averaged), "val/loss": val["loss"],
                               "val/acc": val["acc"]}
        self.save_weights("swa.pt", self.swa.module, self.summary["epochs_run"])
        log.info(f"SWA over {int(self.swa.n_averaged)} epochs: val/loss {val['loss']:.4f}  val/acc {val['acc']:.4f}")

    def test(self) -> None:
        """Evaluate on the test split (used for nothing else): the SWA average when SWA ran, else best.pt."""
        swa = self.ckpt_dir / "swa.pt"
        weights = swa if self.summary.get("swa") else self.ckpt_dir / "best.pt"
        if not weights.is_file():
            log.warning("no best.pt (no epoch gave a finite monitored metric): nothing to test")
            return
        self.model.load_state_dict(checkpoint.load(weights)["model"])
        metrics = evaluate(self.model, self.test_batches, self.autocast)
        self.summary["test"] = {"test/loss": metrics["loss"], "test/acc": metrics["acc"]}
        self.summary["tested_weights"] = weights.name
        self.summary["best_epoch"] = self.stopper.best_epoch
        self.summary["best"] = {"epoch": self.stopper.best_epoch, self.stopper.monitor: self.stopper.best,
                                **self.best_row}
        if self.monitor is not None:
            self.monitor.test_metrics(self.summary["test"], self.step)
        log.info(f"test ({weights.name}, best epoch {self.stopper.best_epoch}): loss {metrics['loss']:.4f}  "
                 f"acc {metrics['acc']:.4f}")


class _NoSchedule:
    """Stands in for the scheduler while SWA holds the learning rate constant."""

    def step(self) -> None:
        pass


NO_SCHEDULE = _NoSchedule()


def execute(cfg: DictConfig, run_dir: Path, overrides: list[str], live: bool = False) -> tuple[str, int, Run]:
    """Run training in `run_dir` and write summary.json; returns (status, exit code, run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    run = Run(cfg, run_dir, live)
    code_key = None
    try:
        run.build()
        run.fit()
    except ConfigError as error:
        log.error(str(error))
        run.summary.update(status="failed", stop_reason="invalid config", error=str(error))
        code_key = "config_error"
    except KeyboardInterrupt:
        log.warning("interrupted: checkpoints/last.pt holds the last completed epoch")
        run.summary.update(status="interrupted", stop_reason="interrupted by the user (Ctrl-C)")
    except Exception as error:  # noqa: BLE001 - any failure is recorded in summary.json, then reported
        log.error("run failed:\n" + traceback.format_exc())
        run.summary.update(status="failed", stop_reason=f"error: {type(error).__name__}: {error}",
                           error=traceback.format_exc())
    finally:
        if run.monitor is not None:
            run.monitor.close()
    status = run.summary["status"]
    run.summary.update(
        wall_time_s=round(time.time() - tic, 3),
        device=str(getattr(run, "device", cfg.trainer.device)),
        precision=getattr(run, "precision", None),
        versions=versions(),
        overrides=list(overrides),
        run_dir=str(run_dir),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    (run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2, default=str) + "\n")
    if run.started:
        Console().print(final_table(run.summary))
    return status, EXIT_CODES[code_key or status], run
