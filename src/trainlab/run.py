"""One training run, start to end: validate, build, train with early stopping and checkpoints, test, summarise."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import platform
import random
import shlex
import shutil
import time
import traceback
import types
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch import nn

from trainlab import __version__, checkpoint, distributed, ensemble, faults, finetune
from trainlab.config import (ConfigError, DataConfig, fresh_directory_problem, monitor_mode, schema_defaults,
                             shell_override, validate)
from trainlab.data import (build_data, class_weights, epoch_batch_sizes, epoch_steps, eval_loader, minority_classes,
                           train_loader)
from trainlab.device import (autocast_for, compiled, configure_backends, select_device, select_precision,
                             uses_channels_last)
from trainlab.early_stopping import EarlyStopping
from trainlab.files import write_text_atomic
from trainlab.initialization import initialize
from trainlab.loop import EpochTotals, Interval, StepParts, evaluate, train_one_epoch
from trainlab.models import TorchvisionModel, build_model
from trainlab.layer_stats import (LayerRecorder, dead_layers, first_layer_filters, global_norm, gradient_norm,
                                  vanishing_gradient)
from trainlab.monitor import (RunMonitor, SilentMonitor, config_tree, confusion_matrix, final_table, hyperparameters,
                              where_to_look, write_confusion_csv)
from trainlab.optim import build_optimizer, decayed_parameters, load_optimizer_state, needs_closure
from trainlab.regularization import ema_model, first_swa_epoch, gradient_clipper, penalty, swa_model
from trainlab.schedules import build_scheduler, snapshot_epochs

log = logging.getLogger("trainlab")

EXIT_CODES = {"completed": 0, "stopped_early": 0, "failed": 1, "config_error": 2, "diverged": 3,
              "interrupted": 130}  # interrupted by SIGTERM or SIGUSR1: 143 (faults.INTERRUPT_EXIT_CODES)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    """The versions summary.json records; torchvision's from its installed metadata, since importing it (which a run
    on an MLP or trainlab's CNN never does otherwise) costs 3 s, most of it torchvision.ops importing torch._dynamo."""
    import hydra

    return {"trainlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": importlib.metadata.version("torchvision"), "hydra": hydra.__version__}


def describe(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DictConfig, data: Any,
             device: torch.device, precision: str) -> None:
    """Announce once what was built: the resolved config as a tree, then one line per part."""
    Console().print(config_tree(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    normalized = any(isinstance(m, norms) for m in model.modules())
    absent = "" if normalized or cfg.normalization.name == "none" else " (no layer to normalize)"  # model.hidden=[]
    balance = f"  imbalance {cfg.data.imbalance:g}" if cfg.data.imbalance != 1 else ""
    if balance and cfg.data.imbalance_profile == "step":
        rare = minority_classes(data.num_classes, cfg.data.minority_fraction)
        balance += f" (step: the last {rare} of {data.num_classes} classes rare)"
    balance += f"  balance={cfg.data.balance}" if cfg.data.balance != "none" else ""
    log.info(f"data: {data.name}  {data.sizes}  input {list(data.input_shape)}  classes {data.num_classes}"
             + (f"{balance}  ({data.class_counts()})" if balance else ""))
    log.info(f"model: {type(model).__name__} {_knobs(cfg.model)}  {n_params:,} parameters  "
             f"normalization={cfg.normalization.name}{absent}  initialization={cfg.initialization.name}")
    scaled = any(g.get("lr_scale", 1.0) != 1.0 for g in optimizer.param_groups)  # finetune: the groups' own rates
    groups = ", ".join(f"{g.get('name', i)}: {sum(p.numel() for p in g['params']):,} params "
                       + (f"lr {g['lr']:g} " if scaled else "")
                       + f"decoupled_wd {g.get('weight_decay_decoupled', 0.0):g}"
                       for i, g in enumerate(optimizer.param_groups))
    log.info(f"optimizer: {type(optimizer).__name__} lr {cfg.optimizer.lr:g}  groups [{groups}]")
    log.info(f"scheduler: {_knobs(cfg.scheduler)}   regularization: {_knobs(cfg.regularization)}   "
             f"augmentation: {_knobs(cfg.augmentation)}")
    log.info(f"device: {device}  precision: {precision}  max_epochs: {cfg.trainer.max_epochs}  "
             f"seed: {cfg.seed}")
    every = cfg.logger.layer_stats_every_n_epochs
    layer_stats = f"epoch 1 and every {every} epochs" if every > 0 else "off"
    log.info(f"monitoring: tensorboard {cfg.logger.tensorboard}  every_n_steps {cfg.logger.every_n_steps}  "
             f"grad_norm {cfg.logger.grad_norm}  layer stats {layer_stats}  "
             f"histograms {cfg.logger.histograms}  graph {cfg.logger.graph}")


def _knobs(node: DictConfig) -> str:
    items = OmegaConf.to_container(node, resolve=True)
    return " ".join(f"{k}={v}" for k, v in items.items() if k not in ("_target_", "_partial_"))


class Run:
    """Everything one run builds, and the loop that trains it."""

    def __init__(self, cfg: DictConfig, run_dir: Path, live: bool = False,
                 ranks: distributed.Ranks = distributed.Ranks()):
        self.cfg, self.run_dir, self.live, self.ranks = cfg, run_dir, live, ranks
        # torchrun: the sum over the ranks of what each read (epoch totals, validation), so all decide alike
        self.reduce = distributed.summed if ranks.active else None
        # read every step by on_step: plain ints, since an OmegaConf lookup costs tens of microseconds
        self.ckpt_every_steps = cfg.checkpoint.every_n_steps
        self.ckpt_dir = run_dir / "checkpoints"
        self.summary: dict[str, Any] = {"status": "failed", "stop_reason": None, "best_epoch": None,
                                        "epochs_run": 0, "best": None, "test": None}
        self.monitor: RunMonitor | None = None
        self.started = False  # True once training has begun (the run directory then holds a real run)
        self.signals = faults.StopSignals()  # entered by execute, from build to summary.json
        # where the loop reads a stop signal after each step: this process's handlers, or under torchrun the signal
        # the ranks agreed on at the last logging interval (so that all of them stop after the same step)
        self.stop_signals: Any = self.signals if not ranks.active else types.SimpleNamespace(received=None)
        self.resume_in_epoch: dict[str, Any] | None = None  # the rest of an epoch a mid-epoch last.pt left
        self.began = time.time()  # this process's part of the run
        self.earlier_wall_s = 0.0  # the wall time of the processes before a resume (saved in last.pt)

    def build(self) -> None:
        cfg = self.cfg
        validate(cfg)
        self.check_fresh_directory()
        found = checkpoint.find_resume(cfg.checkpoint.resume, self.ckpt_dir)
        if found is None and cfg.checkpoint.resume == "auto" and (self.run_dir / "metrics.csv").is_file():
            # a first attempt killed before its first last.pt: this fresh start replaces its rows (and its curves,
            # which the monitor purges from step 1 as on any resume)
            log.warning(f"checkpoint.resume=auto: no last.pt in {self.ckpt_dir}; starting fresh in place of the "
                        "earlier attempt's metrics.csv rows and curves")
            if self.ranks.main:
                checkpoint.keep_metrics_up_to(self.run_dir / "metrics.csv", 0)
                checkpoint.keep_snapshots_up_to(self.ckpt_dir, 0)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)  # stored in every checkpoint
        seed_everything(cfg.seed)
        self.device = self.rank_device(select_device(cfg.trainer.device))
        self.precision = select_precision(cfg.trainer.precision, self.device)
        self.threads = configure_backends(cfg.trainer, self.device)
        self.data = d = build_data(cfg.data)
        self.summary["examples"] = {"train": len(d.train), "train_available": d.train_available,
                                    "val": len(d.val), "test": len(d.test), "train_per_class": d.train_per_class}
        self.model = build_model(cfg, self.data.input_shape, self.data.num_classes)
        initialize(self.model, cfg.initialization, getattr(self.model, "activation", "relu"))
        # transfer learning: trained weights, frozen or slower features (on a resume, last.pt's weights and the
        # feature names it recorded: the weights file is not read again)
        self.transfer = finetune.prepare(self.model, cfg.finetune,
                                         self.model.name if isinstance(self.model, TorchvisionModel) else None,
                                         recorded=found[1].get("finetune_features") if found is not None else None)
        self.channels_last = uses_channels_last(cfg.trainer, self.model)
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        # the module the loop calls; shares the weights (under torchrun DDP, which averages the gradients)
        self.forward = compiled(self.data_parallel(), cfg.trainer.compile)
        self.train_batches = train_loader(cfg, d, self.device, self.ranks)  # with cfg.augmentation
        self.val_batches = eval_loader(cfg, d, d.val, self.device, self.ranks)
        self.test_batches = eval_loader(cfg, d, d.test, self.device, self.ranks)
        steps_per_epoch = len(self.train_batches)
        # each epoch's batch size and steps: data.batch_size_schedule changes them
        self.batch_sizes = epoch_batch_sizes(cfg.data, cfg.trainer.max_epochs)
        steps = epoch_steps(self.train_batches, self.batch_sizes)
        self.optimizer = build_optimizer(cfg, self.model, steps_per_epoch=steps_per_epoch,
                                         features=self.transfer.scaled,
                                         feature_lr_scale=float(cfg.finetune.feature_lr_scale), epoch_steps=steps)
        self.scheduler = build_scheduler(cfg.scheduler, self.optimizer, steps_per_epoch, cfg.trainer.max_epochs,
                                         mode=monitor_mode(cfg.early_stopping.monitor, cfg.early_stopping.mode),
                                         epoch_steps=steps)
        # checkpoint.snapshots=cycles: the epochs at whose end a cycle of the schedule ends (its lowest lr)
        self.snapshot_epochs = (snapshot_epochs(cfg.scheduler, steps_per_epoch, cfg.trainer.max_epochs)
                                if cfg.checkpoint.snapshots == "cycles" else [])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast = autocast_for(self.device, self.precision)
        self.build_regularization()
        stop = cfg.early_stopping
        self.stopper = EarlyStopping(stop.monitor, monitor_mode(stop.monitor, stop.mode), stop.patience,
                                     stop.min_delta, stop.enabled)
        self.best_row: dict[str, float] = {}
        self.start_epoch, self.step = 1, 0
        self.notes: list[str] = []  # warnings about the configuration, logged after its description
        self.check_batch_norm_batches()
        if self.ranks.active:
            self.check_ranks()
        if self.ranks.rank > 0:
            torch.manual_seed(cfg.seed * 1_000_003 + self.ranks.rank)  # dropout: each rank its own masks
        if found is not None:
            self.resume(*found)
        if self.ranks.main:
            describe(self.model, self.optimizer, cfg, d, self.device, self.precision)
            self.describe_snapshots()
            for note in self.notes:
                log.warning(note)

    def describe_snapshots(self) -> None:
        """Where the snapshots will be taken, and what may keep some from being taken."""
        if not self.snapshot_epochs:
            return
        epochs = ", ".join(map(str, self.snapshot_epochs))
        log.info(f"snapshots: the weights at the end of each lr cycle, epochs {epochs}, as "
                 f"{self.ckpt_dir.name}/{checkpoint.snapshot_name(self.snapshot_epochs[0])}, ...")
        stop = self.cfg.early_stopping
        if stop.enabled:
            log.warning(f"snapshots with early stopping (patience {stop.patience}): each restart raises the loss for a "
                        "while, so the run may stop before its later cycles end; early_stopping.enabled=false keeps "
                        "them all")

    def check_fresh_directory(self) -> None:
        """A new run (no checkpoint.resume) in a directory where one already trained would append its rows to
        metrics.csv and its points to the TensorBoard curves, and overwrite the checkpoints: refused. (`train`
        refuses it earlier, before Hydra writes its record there: cli.FreshRunDirectory.)"""
        problem = fresh_directory_problem(self.run_dir, self.cfg.checkpoint.resume)
        if problem is not None:
            raise ConfigError(problem)

    def build_regularization(self) -> None:
        """Loss, penalties, clipping and weight averages of cfg.regularization, as parts of every step."""
        reg, model = self.cfg.regularization, self.model
        # the function, not nn.CrossEntropyLoss: a module call's hook handling cost a small MLP 1 % of its step
        self.loss_fn = functools.partial(F.cross_entropy, label_smoothing=float(reg.label_smoothing))
        if self.cfg.data.balance == "reweight":
            weight = class_weights(self.data.train.labels, self.data.num_classes).to(self.device)
            self.loss_fn = weighted_cross_entropy(weight, float(reg.label_smoothing))
        decayed = decayed_parameters(self.optimizer)  # l1/l2 skip biases and norm parameters, like decay
        closure_step = needs_closure(self.optimizer)
        if closure_step and self.precision == "fp16":
            raise ConfigError(f"optimizer={type(self.optimizer).__name__} evaluates the loss several times per "
                              "step, which fp16 loss scaling cannot follow; use trainer.precision=bf16 or fp32")
        trainer = self.cfg.trainer
        if closure_step and trainer.on_nonfinite == "skip":
            raise ConfigError(f"trainer.on_nonfinite=skip: optimizer={type(self.optimizer).__name__} steps inside "
                              "its closure, so a non-finite step cannot be skipped; use trainer.on_nonfinite=stop")
        self.guard = faults.NonfiniteGuard(
            [p for g in self.optimizer.param_groups for p in g["params"]], self.device,
            check=faults.check_mode(trainer.nonfinite_check, trainer.on_nonfinite),
            policy=trainer.on_nonfinite, max_skips=trainer.max_nonfinite_skips,
            check_grads=self.precision != "fp16",  # under fp16 the scaler skips inf-gradient steps itself
            agree=functools.partial(distributed.all_true, device=self.device) if self.ranks.active else None)
        self.ema = ema_model(model, reg.ema_decay, reg.ema_warmup) if reg.ema_decay is not None else None
        self.swa = swa_model(model) if reg.swa_start is not None else None
        ratio = float(reg.swa_lr) / float(self.cfg.optimizer.lr)
        if self.swa is not None and not 0.05 <= ratio <= 5:  # the preset's 0.05 suits SGD at 0.1, not Adam at 1e-3
            log.warning(f"regularization.swa_lr={reg.swa_lr:g} is {ratio:.3g}x optimizer.lr={self.cfg.optimizer.lr:g}: "
                        "the SWA epochs train at that constant rate, and their average is what the run tests; "
                        "SWA's rate is usually of the order of the optimizer's (set regularization.swa_lr)")
        self.swa_first_epoch = (first_swa_epoch(reg.swa_start, self.cfg.trainer.max_epochs)
                                if reg.swa_start is not None else None)
        self.parts = StepParts(
            penalty=penalty(decayed, reg.l1, reg.l2),
            clip=gradient_clipper([p for g in self.optimizer.param_groups for p in g["params"]], self.optimizer,
                                  self.scaler, reg.grad_clip_norm, reg.grad_clip_value),
            after_step=(lambda: self.ema.update_parameters(self.model)) if self.ema is not None else None,
            closure_step=closure_step,
            guard=self.guard if self.guard.check == "step" else None,
            on_step=self.on_step,
            grad_norm=self.grad_norm_reader(),
            weight_norm=self.weight_norm_reader(),
            copy_outputs=str(self.cfg.trainer.compile).lower() == "reduce-overhead",
            reduce=self.reduce,
            world=self.ranks.world,
        )

    def grad_norm_reader(self) -> Any:
        """train/grad_norm's measurement (at the last step of each logging interval), or None when not logged."""
        if not (self.cfg.logger.grad_norm and self.cfg.logger.tensorboard):
            return None
        params = list(self.model.parameters())
        return lambda: gradient_norm(params)

    def weight_norm_reader(self) -> Any:
        """The weights' norm at each logging interval, for the interval divergence check, or None when unchecked."""
        guard = self.guard
        if guard.check != "interval" or not (guard.check_grads and guard.params):
            return None
        params = list(self.model.parameters())  # all of them: also train/weight_norm at the epoch's end
        return lambda: global_norm(params)

    # --- torchrun -------------------------------------------------------------------------------------
    def rank_device(self, device: torch.device) -> torch.device:
        """Under torchrun each process trains on the GPU of its LOCAL_RANK (or on the CPU)."""
        if not self.ranks.active or device.type == "cpu":
            return device
        if device.type != "cuda":
            raise ConfigError(f"trainer.device={self.cfg.trainer.device} under torchrun: processes train together on "
                              "CUDA GPUs or on the CPU; set trainer.device=cuda or cpu")
        if device.index is not None:
            raise ConfigError(f"trainer.device={self.cfg.trainer.device} under torchrun: each process takes the GPU "
                              "of its LOCAL_RANK; set trainer.device=cuda or auto")
        return torch.device("cuda", self.ranks.local_rank)

    def data_parallel(self) -> nn.Module:
        """The model, in DistributedDataParallel under torchrun (whose construction copies rank 0's weights to all)."""
        if not self.ranks.active:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.model,
                                       device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def train_batch_sizes(self) -> dict[int, int]:
        """The training batch size of every epoch (data.batch_size_schedule applied, at most the training split)."""
        n = len(self.data.train)
        return {epoch: min(size, n) for epoch, size in enumerate(self.batch_sizes, start=1)}

    def check_batch_norm_batches(self) -> None:
        """Batch norm fails in training on one value per channel (no variance): a batch of one example where a
        norm sees a single value per channel of each example (an MLP's BatchNorm1d, a conv net's 1x1 maps). Mid-run
        when only the last batch of an epoch (drop_last=false) or a scheduled batch size is that small: refused.
        Batches that give it fewer than NOISY_BATCH_NORM values per channel train, with a warning (in self.notes)."""
        per_example = min(batch_norm_values_per_example(self.model, self.data.input_shape, self.device), default=0)
        if per_example == 0:  # no batch norm that trains
            return
        n, world, drop_last = len(self.data.train), self.ranks.world, bool(self.cfg.data.drop_last)
        if per_example == 1:
            first_epoch_of = {}
            for epoch, size in self.train_batch_sizes().items():
                first_epoch_of.setdefault(size, epoch)
            for size, epoch in first_epoch_of.items():
                last = n % size if not drop_last or size == n else 0
                if size // world == 1 or last // world == 1:
                    which = (f"the training batches of {size}" if size // world == 1
                             else f"the last training batch ({last} of {n} examples)")
                    raise ConfigError(f"{which} in epoch {epoch} give batch norm one value per channel"
                                      f"{' on a process' if world > 1 else ''} (this model's batch norms see "
                                      f"{per_example} per example), which it cannot normalise; raise data.batch_size "
                                      "(or its batch_size_schedule factors), set data.drop_last=true, or use another "
                                      "normalization")
        smallest = min(min(self.batch_sizes), n) // world  # an epoch's last, smaller batch aside
        if smallest * per_example < NOISY_BATCH_NORM:
            self.notes.append(f"batches of {smallest}{' on each process' if world > 1 else ''} give batch norm "
                              f"{smallest * per_example} values per channel (this model's batch norms see "
                              f"{per_example} per example): below {NOISY_BATCH_NORM} its statistics are noisy (on the "
                              "digits' MLP, batches of 4 leave train/loss at 0.23 and of 2 test at 0.885, where layer "
                              "norm gives 0.006 and 0.981 at any batch size); raise data.batch_size, or use "
                              "normalization=layer or group, which do not depend on the batch")

    def too_large_a_step(self) -> str:
        """The advice of the warnings whose cause is too large a step, with the learning rates now."""
        lr = ", ".join(f"{group['lr']:g}" for group in self.optimizer.param_groups)
        return (f"too large a step (lr now {lr}): lower optimizer.lr, warm up (scheduler.warmup_epochs), clip "
                "gradients or add a normalization")

    def warn_dead_layers(self, scalars: dict[str, float], epoch: int) -> None:
        """A ReLU layer dead for a whole batch passes no gradient, so the run trains on at chance without an error
        (README *Activations, measured*: plain SGD at lr 2.0). Each such layer is named once."""
        dead = [layer for layer in dead_layers(scalars) if layer not in self.dead_named]
        if not dead:
            return
        self.dead_named.update(dead)
        log.warning(f"epoch {epoch}: every unit of ReLU layer(s) {', '.join(dead)} outputs 0 for the whole batch "
                    f"(dead_relu = 1): no gradient passes them, so the layers before stop learning and the outputs "
                    f"no longer depend on the input. It follows {self.too_large_a_step()}")

    def warn_vanishing_gradient(self, scalars: dict[str, float], epoch: int) -> None:
        """A first layer whose gradient is a tiny share of the last's barely learns: a deep sigmoid net trains on at
        chance without an error (README *Activations, measured*: 1e-6 at 10 layers), as does a ReLU net most of whose
        units a too large step silenced. Named once a run; not where a whole ReLU layer is dead (warn_dead_layers)."""
        found = None if self.vanishing_named or dead_layers(scalars) else vanishing_gradient(scalars)
        if found is None:
            return
        self.vanishing_named = True
        first, g_first, last, g_last = found
        silent = dead_layers(scalars, share=0.5)
        if silent:
            cause = (f"most units of ReLU layer(s) {', '.join(f'{k} ({v:.1%})' for k, v in silent.items())} output 0 "
                     f"for the whole batch, after {self.too_large_a_step()}")
        else:
            cause = ("a deep net of sigmoid or tanh units, or too small an initialization; use model.activation=relu "
                     "with initialization=kaiming_normal, a normalization, or residual connections")
        log.warning(f"epoch {epoch}: the first layer's gradient ({first}: {g_first:.2g}) is {g_first / g_last:.1g} "
                    f"of the last layer's ({last}: {g_last:.2g}), so the first layers barely learn (vanishing "
                    f"gradients): {cause}")

    def check_ranks(self) -> None:
        """Refuse what torchrun's processes cannot do together (the same verdict on every rank)."""
        cfg, world, n = self.cfg, self.ranks.world, len(self.data.train)
        problems = []
        sizes = sorted(set(self.train_batch_sizes().values()))
        if any(size % world for size in sizes):
            capped = f", at most the {n} training examples" if n in sizes else ""
            fix = (f"make data.train_size a multiple of {world}, or data.batch_size a multiple of {world} below {n}"
                   if n in sizes and n % world else f"use a multiple of {world}")
            problems.append(f"data.batch_size={cfg.data.batch_size} (batches of {sizes}{capped}): each of the "
                            f"{world} processes trains an equal part of every batch; {fix}")
        elif not cfg.data.drop_last and any(n % size % world for size in sizes):
            problems.append(f"data.drop_last=false leaves a last batch of the {n} training examples that {world} "
                            "processes cannot split evenly; set data.drop_last=true or another batch size")
        if str(cfg.trainer.compile).lower() == "reduce-overhead":
            problems.append("trainer.compile=reduce-overhead (CUDA graphs) is not combined with DDP here; use "
                            "trainer.compile=default or false")
        if problems:
            raise ConfigError(f"under torchrun ({world} processes): " + "; ".join(problems))

    def write(self, save: Any) -> None:
        """Rank 0 writes (`save()`); under torchrun every rank learns whether it could, and all stop if not."""
        failed = None
        if self.ranks.main:
            try:
                save()
            except checkpoint.CheckpointWriteError as error:
                if not self.ranks.active:
                    raise
                failed = error.args
        failed = distributed.broadcast(failed, self.ranks)
        if failed is not None:
            raise checkpoint.CheckpointWriteError(*failed)

    @property
    def wall_time_s(self) -> float:
        """Seconds since the run began, across resumes (the time after the last save of a killed process is lost)."""
        return self.earlier_wall_s + time.time() - self.began

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as best: the EMA average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    # --- checkpoints -------------------------------------------------------------------------------
    def training_state(self, epoch: int, finished: bool, in_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything exact resumption needs; `epoch` is the last completed one, `in_epoch` where the next stands."""
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "epoch": epoch,
            "step": self.step,
            "finished": finished,
            "in_epoch": in_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": checkpoint.class_name(self.optimizer),  # a resume refuses another one
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "early_stopping": self.stopper.state_dict(),
            "nonfinite_skipped": self.guard.skipped,  # trainer.max_nonfinite_skips counts the whole run
            "best_row": self.best_row,
            "rng": checkpoint.rng_state(),
            "config": self.config_yaml,
            "wall_time_s": self.wall_time_s,
            "finetune_features": self.transfer.features,  # what finetune loaded: frozen or slower on a resume
            # torchrun: each rank's own random streams (dropout, augmentation), gathered from all of them
            "ranks": distributed.gather({"rng": checkpoint.rng_state(), "loader": self.train_batches.state_dict()},
                                        self.ranks) if self.ranks.active else None,
        }

    def save_last(self, epoch: int, finished: bool, in_epoch: dict[str, Any] | None = None) -> None:
        """checkpoints/last.pt (the one before kept as last.prev.pt); never from weights a non-finite step touched."""
        self.guard.raise_if_diverged()
        state = self.training_state(epoch, finished, in_epoch)
        self.write(lambda: checkpoint.save_atomic(state, self.ckpt_dir / "last.pt", keep_previous=True))

    def save_weights(self, name: str, model: nn.Module, epoch: int, **extra: Any) -> None:
        """checkpoints/<name>: one model's weights with the epoch and the run's config (best.pt, swa.pt)."""
        state = {"format_version": checkpoint.FORMAT_VERSION, "epoch": epoch, "model": model.state_dict(),
                 "config": self.config_yaml, **extra}
        self.write(lambda: checkpoint.save_atomic(state, self.ckpt_dir / name))

    def resume(self, path: Path, state: dict[str, Any]) -> None:
        """Continue the run `state` (loaded from `path`) saved: weights, optimizer, schedule, random states,
        position."""
        if state["format_version"] > checkpoint.FORMAT_VERSION:
            raise ConfigError(f"checkpoint.resume={path}: written by a newer trainlab (format "
                              f"{state['format_version']}, this one reads up to {checkpoint.FORMAT_VERSION}); upgrade")
        if "optimizer" not in state:
            raise ConfigError(f"checkpoint.resume={path} holds weights only, not a training state to continue; "
                              f"resume from the run's checkpoints/last.pt")
        lacking = [key for key in ("model", "scheduler", "scaler", "epoch", "step", "early_stopping", "rng")
                   if key not in state]
        if lacking:  # a hand-edited or foreign file with a format_version: a KeyError traceback further on
            raise ConfigError(f"checkpoint.resume={path} is not a trainlab training state: it lacks "
                              f"{', '.join(lacking)}; resume from the run's checkpoints/last.pt")
        self.check_continuable(path, state)
        self.check_same_data(path, state)
        own = self.own_streams(path, state)
        mismatch = checkpoint.model_mismatch(self.model.state_dict(), state["model"])
        if mismatch is not None:
            raise ConfigError(f"checkpoint.resume={path} holds a different model: {mismatch}. Resume with the model "
                              f"options it was trained with: {checkpoint.saved_options(state.get('config'), 'model')}")
        self.model.load_state_dict(state["model"])
        saved, built = checkpoint.saved_optimizer_class(state), checkpoint.class_name(self.optimizer)
        if saved is not None and saved != built:  # its state would load, and then crash or mean something else
            raise ConfigError(f"checkpoint.resume={path} was trained with {saved}, and this config builds {built}; "
                              f"resume with the optimizer options it was trained with: "
                              f"{checkpoint.saved_options(state.get('config'), 'optimizer')}")
        try:
            load_optimizer_state(self.optimizer, state["optimizer"])
        except (ValueError, KeyError) as error:
            raise ConfigError(f"checkpoint.resume={path} was trained with another optimizer setup ({error}); "
                              "resume with the optimizer and regularization options it was trained with") from None
        self.scheduler.load_state_dict(state["scheduler"])
        saved_config = state.get("config")
        ignored = (checkpoint.changed_options(saved_config, self.cfg, "optimizer")
                   + checkpoint.changed_options(saved_config, self.cfg, "regularization", keys=("weight_decay",))
                   + checkpoint.changed_options(saved_config, self.cfg, "finetune", keys=("feature_lr_scale",)))
        if ignored:  # torch's load_state_dict takes the saved groups' settings (lr, decay), the scheduler its base lrs
            log.warning(f"checkpoint.resume={path}: the optimizer continues with the settings it was trained with, "
                        f"not this config's: {', '.join(ignored)}; start a new run to train with others")
        schedule = checkpoint.changed_options(saved_config, self.cfg, "scheduler")
        if any(change.startswith("scheduler.name=") for change in schedule):  # another schedule: its option file
            schedule = [change.replace("scheduler.name=", "scheduler=") for change in schedule
                        if change.startswith("scheduler.name=")]
        if not state.get("finished"):  # (a finished run extended says so below)
            schedule += checkpoint.changed_options(saved_config, self.cfg, "trainer", keys=("max_epochs",))
        if schedule:  # the scheduler is this config's, at the checkpoint's step: the lr from here follows it
            log.warning(f"checkpoint.resume={path}: the learning-rate schedule differs from the one it trained with: "
                        f"{', '.join(schedule)}; from here the lr follows this config's (lr "
                        f"{state['optimizer']['param_groups'][0]['lr']:.4g} at the checkpoint, "
                        f"{self.optimizer.param_groups[0]['lr']:.4g} from here)")
        if state.get("finished"):
            log.warning(f"checkpoint.resume={path}: extending a finished run of {state['epoch']} epochs to "
                        f"trainer.max_epochs={self.cfg.trainer.max_epochs}; the schedule now spans the longer run "
                        f"(lr {state['optimizer']['param_groups'][0]['lr']:.4g} at its end, "
                        f"{self.optimizer.param_groups[0]['lr']:.4g} from here)")
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
        self.guard.skipped = int(state.get("nonfinite_skipped", 0))
        self.best_row = dict(state.get("best_row", {}))
        checkpoint.set_rng_state(own["rng"])
        self.start_epoch, self.step = state["epoch"] + 1, state["step"]
        self.earlier_wall_s = float(state.get("wall_time_s", 0.0))
        self.resume_in_epoch = state.get("in_epoch")
        if self.resume_in_epoch is not None and "loader" in own:
            self.resume_in_epoch["loader"] = own["loader"]  # this rank's augmentation stream
        self.summary["epochs_run"] = state["epoch"]
        best = path.parent / "best.pt"
        if self.ranks.main and best.is_file() and best.resolve() != (self.ckpt_dir / "best.pt").resolve():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best, self.ckpt_dir / "best.pt")
        if self.ranks.main:  # rows written after this checkpoint go, and so do snapshots: this run takes them again
            self.continue_metrics(path, state["epoch"])
            checkpoint.keep_metrics_up_to(self.run_dir / "metrics.csv", state["epoch"])
            self.resume_snapshots(path, state["epoch"])
            last = self.ckpt_dir / "last.pt"
            if path.resolve() == checkpoint.previous_path(last).resolve() and last.is_file():
                last.unlink()  # damaged (auto skipped it): the next save must not keep it as the fallback
                log.info(f"removed the damaged {last.name}; {path.name} stays the fallback until the next save")
        where = (f"inside epoch {self.start_epoch} after batch {self.resume_in_epoch['loader']['position']}"
                 if self.resume_in_epoch is not None else f"at epoch {self.start_epoch}")
        log.info(f"resumed from {path} {where} (step {self.step})")

    def continue_metrics(self, path: Path, epoch: int) -> None:
        """A resume into a new directory starts its metrics.csv with the rows of the run it continues, up to the
        checkpoint's epoch, so the file has a row for every epoch (the TensorBoard curves stay in that run's)."""
        source = path.resolve().parent.parent / "metrics.csv"
        target = self.run_dir / "metrics.csv"
        if source == target.resolve() or target.exists() or not source.is_file():
            return
        rows, _ = checkpoint.metrics_up_to(source, epoch)
        write_text_atomic(target, rows, newline="")
        log.info(f"metrics.csv starts with the {rows.count(chr(10)) - 1} epoch row(s) of {source.parent}; its "
                 f"TensorBoard curves up to epoch {epoch} stay there")

    def check_same_data(self, path: Path, state: dict[str, Any]) -> None:
        """A resume continues on the data and batches it trained on: another training subset, split or batch size
        would change what an epoch is (its steps, which the schedule and snapshots count) and the normalization.
        Where the data lives and how it is loaded may change. With snapshots, the schedule's cycles may not."""
        where = ("loader", "num_workers", "device_max_gb", "eval_batch_size", "root", "path", "cache_dir", "download")
        # a key the checkpoint's config lacks (data.imbalance, data.balance) trained at its schema default
        changed = checkpoint.changed_options(state.get("config"), self.cfg, "data", ignore=where,
                                             defaults=schema_defaults(DataConfig))
        if self.snapshot_epochs:  # its snapshots were taken at the ends of the cycles it trained with
            changed += checkpoint.changed_options(state.get("config"), self.cfg, "scheduler")
        if changed:
            raise ConfigError(f"checkpoint.resume={path} trained on other data or cycles than this config gives: "
                              f"{', '.join(changed)}; resume with the options it was trained with, or start a new "
                              "run (finetune.weights= takes its weights)")

    def resume_snapshots(self, path: Path, epoch: int) -> None:
        """The snapshots of a run resumed after `epoch`: those taken after it are deleted (the resumed run takes them
        again, so none is lost or kept twice); a last.pt of another directory brings its earlier ones along."""
        if not self.snapshot_epochs:
            return
        checkpoint.keep_snapshots_up_to(self.ckpt_dir, epoch)
        if path.parent.resolve() != self.ckpt_dir.resolve():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for taken, snapshot in checkpoint.snapshots(path.parent):
                if taken <= epoch:
                    shutil.copy2(snapshot, self.ckpt_dir / snapshot.name)
        have = {taken for taken, _ in checkpoint.snapshots(self.ckpt_dir)}
        missing = [e for e in self.snapshot_epochs if e <= epoch and e not in have]
        if missing:
            log.warning(f"no snapshot of epoch(s) {', '.join(map(str, missing))}: the run trained them without "
                        "checkpoint.snapshots=cycles; its snapshot ensemble holds only the later ones")

    def own_streams(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's random states in the checkpoint; refused when it was saved by another number of processes
        (each holds its part of every batch and its own random streams)."""
        saved = state.get("ranks")
        processes = len(saved) if saved else 1
        if processes != self.ranks.world:
            raise ConfigError(f"checkpoint.resume={path} was saved by {processes} process(es) and this run has "
                              f"{self.ranks.world}; resume it with "
                              + (f"torchrun --nproc_per_node={processes}" if processes > 1 else "plain train"))
        return saved[self.ranks.rank] if saved else {"rng": state["rng"]}

    def check_continuable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse to resume a run that has nothing left to do under this config: it reached trainer.max_epochs, or
        it stopped early and early stopping would stop it again. A finished run continues when those allow more
        epochs (training on past the old end, with the schedule stretched to the new trainer.max_epochs), unless SWA
        averaged any of them; a run whose SWA has begun continues only where its average does."""
        epoch, max_epochs = state["epoch"], self.cfg.trainer.max_epochs
        saved_stopper = state.get("early_stopping", {})
        changed = [f"early_stopping.{key}={saved_stopper[key]} (here: {getattr(self.stopper, key)})"
                   for key in ("monitor", "mode") if saved_stopper.get(key, getattr(self.stopper, key))
                   != getattr(self.stopper, key)]
        if changed:  # its best value, patience count and best.pt (and plateau's record) are of that metric
            raise ConfigError(f"checkpoint.resume={path} was trained with {', '.join(changed)}: its best value, "
                              "best.pt and patience count belong to that metric (and plateau's, which follows it); "
                              "resume with the monitor it was trained with, or start a new run (finetune.weights= "
                              "takes its weights)")
        if epoch >= max_epochs:
            raise ConfigError(f"checkpoint.resume={path}: that run already finished {epoch} epochs "
                              f"(trainer.max_epochs={max_epochs}); raise trainer.max_epochs to train further, or drop "
                              "checkpoint.resume to start fresh")
        averaged = int(state["swa"]["n_averaged"]) if state.get("swa") is not None else 0
        if averaged and state.get("finished"):
            raise ConfigError(f"checkpoint.resume={path}: that run finished with SWA over {averaged} epoch(s), whose "
                              "average belongs to the end of its schedule; a finished SWA run cannot be extended. "
                              "Start a new run (finetune.weights= takes its weights)")
        if averaged and self.swa is not None and self.swa_first_epoch != epoch - averaged + 1:
            # the schedule would resume before the new first SWA epoch, or average from elsewhere than the average did
            raise ConfigError(f"checkpoint.resume={path}: SWA has averaged epochs {epoch - averaged + 1} to {epoch}, "
                              f"and this config averages from epoch {self.swa_first_epoch} (regularization.swa_start="
                              f"{self.cfg.regularization.swa_start} of trainer.max_epochs={max_epochs}): one average "
                              "cannot span two schedules. Resume with the trainer.max_epochs and "
                              "regularization.swa_start it was trained with, or start a new run")
        if not state.get("finished"):
            return
        stopper = dataclasses.replace(self.stopper)  # this run's rule, the saved run's record
        stopper.load_state_dict(state["early_stopping"])
        if stopper.should_stop:
            saved = state["early_stopping"]  # by its own rule it stopped early, or completed and this rule ends it
            stopped = saved.get("enabled", True) and stopper.bad_epochs >= saved.get("patience", stopper.patience)
            what = (f"that run stopped early at epoch {epoch} ({stopper.reason()})" if stopped else
                    f"that run completed its {epoch} epochs, the last {stopper.bad_epochs} without improvement, and "
                    f"early_stopping.patience={stopper.patience} ends it there")
            raise ConfigError(f"checkpoint.resume={path}: {what}; raise early_stopping.patience above "
                              f"{stopper.bad_epochs} (or set early_stopping.enabled=false) to train further, or "
                              "drop checkpoint.resume to start fresh")

    # --- the loop -------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg
        max_epochs = cfg.trainer.max_epochs
        self.monitor = RunMonitor(self.run_dir, tensorboard=cfg.logger.tensorboard, live=self.live,
                                  max_epochs=max_epochs, steps_per_epoch=len(self.train_batches),
                                  model=self.model, optimizer=self.optimizer, device=self.device,
                                  resumed_at_step=self.step if self.cfg.checkpoint.resume is not None else None
                                  ) if self.ranks.main else SilentMonitor()
        every = cfg.logger.layer_stats_every_n_epochs
        self.recorder = (LayerRecorder(self.model, self.optimizer, cfg.logger.histograms)
                         if every > 0 and cfg.logger.tensorboard and self.ranks.main else None)
        self.dead_named: set[str] = set()  # ReLU layers already warned of as dead
        self.vanishing_named = False
        if cfg.logger.graph:
            self.monitor.graph(self.model, next(iter(self.val_batches))[0][:2])
        self.started = True
        self.signals.defer = True  # from here a stop signal ends the run after its current step, last.pt saved
        if self.ranks.main:
            checkpoint.remove_stale_temporaries(self.ckpt_dir)
        status, reason = "completed", f"reached trainer.max_epochs={max_epochs}"
        epochs = range(self.start_epoch, max_epochs + 1)
        if self.start_epoch > 1 and self.resume_in_epoch is None and self.stopper.should_stop:
            # a resume at an epoch's end whose lower early_stopping.patience the record already meets: early stopping
            # would have ended the run at that epoch, so it ends there instead of after one more
            status, reason, epochs = "stopped_early", self.stopper.reason(), range(0)
            log.warning(f"early_stopping.patience={self.stopper.patience}: the resumed run's last "
                        f"{self.stopper.bad_epochs} epochs did not improve, so it stops at epoch "
                        f"{self.start_epoch - 1} without training")
            self.save_last(self.start_epoch - 1, True)
        else:
            log.info(f"training started: epochs {self.start_epoch} to {max_epochs}, "
                     f"{len(self.train_batches)} steps per epoch, from step {self.step}")
        try:  # a stop signal (see execute) ends the run after the current step, with last.pt saved
            for epoch in epochs:
                if self.train_epoch(epoch):
                    status, reason = "stopped_early", self.stopper.reason()
                    break
        except faults.Diverged as error:
            status, reason = "diverged", f"{error.what}: {error}"
            kept = [name for name in ("last.pt", "best.pt") if (self.ckpt_dir / name).is_file()]
            log.error(f"{reason}; " + (f"checkpoints keep the last finite state ({', '.join(kept)})" if kept else
                                       "no checkpoint was written before it (it diverged in its first epoch)"))
        self.summary.update(status=status, stop_reason=reason)
        self.finish_swa()
        self.test_snapshots()
        self.test()

    def train_epoch(self, epoch: int) -> bool:
        """Train, validate, log, keep the best weights and last.pt; True when early stopping ends the run."""
        cfg = self.cfg
        tic = time.perf_counter()
        self.epoch = self.guard.epoch = epoch
        self.train_batches.set_epoch(epoch)
        self.train_batches.set_batch_size(self.batch_sizes[epoch - 1])
        averaging = self.swa is not None and epoch >= self.swa_first_epoch
        if averaging:  # SWA epochs run at their own constant rate instead of the schedule
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.regularization.swa_lr * group.get("lr_scale", 1.0)
        self.epoch_lr = self.optimizer.param_groups[0]["lr"]
        totals, done = EpochTotals(), 0
        if self.resume_in_epoch is not None:  # the rest of an epoch that a mid-epoch last.pt interrupted
            resumed, self.resume_in_epoch = self.resume_in_epoch, None
            self.train_batches.load_state_dict(resumed["loader"])
            totals = EpochTotals.from_state(resumed["totals"])
            self.epoch_lr, done = resumed["lr"], int(resumed["loader"]["position"])
        self.guard.watch(totals)
        self.monitor.start_epoch(epoch, self.step - done, len(self.train_batches), self.train_batches.batch_size,
                                 done)
        every = cfg.logger.layer_stats_every_n_epochs  # and epoch 1, whose first step shows the initialization
        recording = self.recorder is not None and (epoch == 1 or epoch % every == 0)
        if recording:  # hooks for the epoch's first step only; they remove themselves after it
            self.recorder.attach()
        first_step = self.step + 1
        result = train_one_epoch(self.forward, self.train_batches, self.loss_fn, self.optimizer,
                                 NO_SCHEDULE if averaging else self.scheduler, self.scaler, self.autocast,
                                 self.step, cfg.logger.every_n_steps, self.on_interval, self.parts, totals)
        self.step = result.step
        if recording:
            self.recorder.detach()
            if self.recorder.result is not None:
                self.monitor.layer_stats(self.recorder.result, first_step,
                                         first_layer_filters(self.model, self.data.input_shape))
                self.warn_dead_layers(self.recorder.result.scalars, epoch)
                self.warn_vanishing_gradient(self.recorder.result.scalars, epoch)
        self.guard.raise_if_diverged()
        if not math.isfinite(result.loss):
            raise faults.Diverged(f"the mean training loss of epoch {epoch} is {result.loss}")
        if averaging:
            self.swa.update_parameters(self.model)
        if self.ranks.active:  # the weights every rank evaluates, and rank 0 saves as best.pt, are one model
            distributed.mean_norm_statistics(self.eval_model, self.ranks.world, finetune.frozen_norms(self.eval_model))
        val = evaluate(self.eval_model, self.val_batches, self.autocast, self.reduce, self.data.num_classes)
        if not math.isfinite(val["loss"]):
            raise faults.DivergedInValidation(f"val/loss {val['loss']} at epoch {epoch} (train/loss "
                                              f"{result.loss:.4g}); try a lower optimizer.lr")
        row = {"epoch": epoch, "step": self.step, "train/loss": result.loss, "train/acc": result.acc,
               "val/loss": val["loss"], "val/acc": val["acc"], "val/balanced_acc": val["balanced_acc"],
               "lr": self.epoch_lr, "epoch_time_s": time.perf_counter() - tic}
        self.scheduler.epoch_end(row[self.stopper.monitor])
        row["best"] = self.stopper.update(row[self.stopper.monitor], epoch)  # only a better, finite value
        if row["best"]:
            self.best_row = {k: row[k] for k in ("val/loss", "val/acc", "val/balanced_acc")}
            self.save_weights("best.pt", self.eval_model, epoch,
                              metric={self.stopper.monitor: row[self.stopper.monitor]})
        if epoch in self.snapshot_epochs:  # before last.pt: a run resumed from it never misses this snapshot
            self.save_weights(checkpoint.snapshot_name(epoch), self.model, epoch, step=self.step)
        self.monitor.end_epoch(row)
        self.summary["epochs_run"] = epoch
        stop = self.stopper.should_stop
        finished = stop or epoch == cfg.trainer.max_epochs
        received = self.stop_signals.received
        if finished or epoch % cfg.checkpoint.every_n_epochs == 0 or received is not None:
            self.save_last(epoch, finished)
        if received is not None and not finished:
            raise faults.Interrupted(received, f"the end of epoch {epoch}, step {self.step}")
        return stop

    def on_interval(self, interval: Interval) -> None:
        """Each logging interval: its scalars, then the divergence verdict on what it read (check=interval)."""
        self.monitor.train_interval(interval)
        self.guard.raise_if_diverged(interval.weight_norm)
        if self.ranks.active:
            self.stop_signals.received = distributed.first_signal(self.signals.received, self.device)

    def on_step(self, step: int, totals: EpochTotals) -> None:
        """After every optimizer step: stop signals and mid-epoch checkpoints."""
        self.step = step
        every, received = self.ckpt_every_steps, self.stop_signals.received
        if received is not None or (every is not None and step % every == 0):
            in_epoch = {"epoch": self.epoch, "loader": self.train_batches.state_dict(),
                        "totals": totals.state_dict(), "lr": self.epoch_lr}
            self.save_last(self.epoch - 1, False, in_epoch)
        if received is not None:
            raise faults.Interrupted(received, f"epoch {self.epoch}, step {step}")

    def finish_swa(self) -> None:
        """Recompute batch-norm statistics for the SWA average, evaluate it and save it as swa.pt."""
        if self.swa is None or int(self.swa.n_averaged) == 0:
            if self.swa is not None:
                log.warning("SWA averaged no epoch (the run ended before regularization.swa_start)")
            return
        self.train_batches.set_epoch(0)
        frozen = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in finetune.frozen_norms(self.swa)]
        with self.autocast:
            torch.optim.swa_utils.update_bn(self.train_batches, self.swa)
        for module, state in frozen:  # update_bn resets every batch norm: a frozen one keeps its own
            module.load_state_dict(state)
        if self.ranks.active:  # each rank's pass saw its part of every batch: keep the ranks' mean statistics
            distributed.mean_norm_statistics(self.swa.module, self.ranks.world, finetune.frozen_norms(self.swa))
        val = evaluate(self.swa.module, self.val_batches, self.autocast, self.reduce, self.data.num_classes)
        self.summary["swa"] = {"epochs_averaged": int(self.swa.n_averaged), "val/loss": val["loss"],
                               "val/acc": val["acc"], "val/balanced_acc": val["balanced_acc"]}
        self.save_weights("swa.pt", self.swa.module, self.summary["epochs_run"])
        log.info(f"SWA over {int(self.swa.n_averaged)} epochs: val/loss {val['loss']:.4f}  val/acc {val['acc']:.4f}")

    def test_snapshots(self) -> None:
        """Each snapshot's test loss and accuracy, and those of the mean of their class probabilities (the snapshot
        ensemble, as `trainlab ensemble --checkpoint snapshots` computes it), into summary.json."""
        taken = [(e, path) for e, path in checkpoint.snapshots(self.ckpt_dir) if e <= self.summary["epochs_run"]]
        if not self.snapshot_epochs or not taken:
            return
        probabilities, labels = [], None
        for _, path in taken:
            self.model.load_state_dict(checkpoint.load(path)["model"])
            probs, labels = ensemble.probabilities(self.model, self.test_batches, self.autocast)
            probabilities.append(probs)
        # [loss sum, hits, examples] per snapshot, then for the mean of the last m for m = 2 .. all (the last of them
        # is the ensemble of every snapshot); under torchrun summed over the ranks' parts
        stacked = torch.stack(probabilities)
        sums = torch.stack([ensemble.sums(p, labels) for p in probabilities]
                           + [ensemble.sums(stacked[-m:].mean(dim=0), labels) for m in range(2, len(taken) + 1)])
        if self.reduce is not None:
            sums = self.reduce(sums.to(self.device)).cpu()
        scores = [{"test/loss": loss / n, "test/acc": hits / n} for loss, hits, n in sums.tolist()]
        self.summary["snapshots"] = [{"epoch": e, "weights": path.name, **score}
                                     for (e, path), score in zip(taken, scores)]
        if len(taken) < 2:
            log.warning(f"only the snapshot of epoch {taken[0][0]} was taken (the run ended before its next cycle "
                        "did): no snapshot ensemble")
            return
        by_size = [{"members": m, **score} for m, score in zip(range(2, len(taken) + 1), scores[len(taken):])]
        self.summary["snapshot_ensemble"] = {"members": len(taken), **scores[-1], "last": by_size}
        if self.monitor is not None:
            self.monitor.test_metrics({"test/snapshot_ensemble_loss": scores[-1]["test/loss"],
                                       "test/snapshot_ensemble_acc": scores[-1]["test/acc"]}, self.step)
        last = scores[len(taken) - 1]
        log.info(f"snapshot ensemble of {len(taken)} (epochs {', '.join(str(e) for e, _ in taken)}): test loss "
                 f"{scores[-1]['test/loss']:.4f}  acc {scores[-1]['test/acc']:.4f}; the last snapshot alone: loss "
                 f"{last['test/loss']:.4f}  acc {last['test/acc']:.4f}"
                 + ("; of the last " + ", ".join(f"{s['members']}: acc {s['test/acc']:.4f}" for s in by_size[:-1])
                    if len(by_size) > 1 else ""))

    def test(self) -> None:
        """Evaluate on the test split (used for nothing else): the SWA average when SWA ran, else best.pt."""
        swa = self.ckpt_dir / "swa.pt"
        weights = swa if self.summary.get("swa") else self.ckpt_dir / "best.pt"
        if not weights.is_file():
            log.warning("no best.pt (no epoch gave a finite monitored metric): nothing to test")
            return
        self.model.load_state_dict(checkpoint.load(weights)["model"])
        metrics = evaluate(self.model, self.test_batches, self.autocast, self.reduce, self.data.num_classes)
        self.summary["test"] = {"test/loss": metrics["loss"], "test/acc": metrics["acc"],
                                "test/balanced_acc": metrics["balanced_acc"]}
        self.summary["tested_weights"] = weights.name
        self.summary["best_epoch"] = self.stopper.best_epoch
        self.summary["best"] = {"epoch": self.stopper.best_epoch, self.stopper.monitor: self.stopper.best,
                                **self.best_row}
        counts = confusion_matrix(self.model, self.test_batches, self.autocast, self.data.num_classes, self.reduce)
        if self.ranks.main:
            write_confusion_csv(counts, self.run_dir / "confusion_matrix.csv")
        if self.monitor is not None:
            self.monitor.test_metrics(self.summary["test"], self.step)
            self.monitor.confusion(counts, self.step)
        log.info(f"test ({weights.name}, best epoch {self.stopper.best_epoch}): loss {metrics['loss']:.4f}  "
                 f"acc {metrics['acc']:.4f}  balanced acc {metrics['balanced_acc']:.4f}")


def weighted_cross_entropy(weight: torch.Tensor, label_smoothing: float) -> Callable[..., torch.Tensor]:
    """data.balance=reweight: the cross-entropy with class c's examples weighted weight[c], a batch's weighted mean
    (divided by the sum of its targets' weights). torch divides so for class labels, but by the batch size for
    soft targets (mixup, cutmix): those are divided by the sum over the batch of each target's mean class weight."""
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:
            return F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing)
        total = F.cross_entropy(logits, targets, weight=weight, label_smoothing=label_smoothing, reduction="sum")
        return total / (targets.float() @ weight).sum()

    return loss


NOISY_BATCH_NORM = 16  # values per channel in a training batch below which batch norm's statistics are noisy


def batch_norm_values_per_example(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> list[int]:
    """For each batch norm that trains (not a frozen one), the values per channel one example gives it: 1 for an
    MLP's, H x W of its input for a conv net's. One forward pass of a zero image, in eval mode."""
    frozen = finetune.frozen_norms(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen]
    if not norms:
        return []
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0][0].numel() // args[0].shape[1]))
             for m in norms]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return seen


class _NoSchedule:
    """Stands in for the scheduler while SWA holds the learning rate constant."""

    def step(self) -> None:
        pass


NO_SCHEDULE = _NoSchedule()


def resume_command(overrides: list[str], run_dir: Path, processes: int = 1) -> str:
    """The command that continues this run in its own directory (with as many processes)."""
    kept = [shlex.quote(o) for o in overrides if not o.startswith(("checkpoint.resume=", "hydra.run.dir="))]
    command = ["train"] if processes == 1 else ["torchrun", "--standalone", f"--nproc_per_node={processes}", "-m",
                                                "trainlab"]
    return " ".join([*command, *kept, shell_override("hydra.run.dir", run_dir), "checkpoint.resume=auto"])


def execute(cfg: DictConfig, run_dir: Path, overrides: list[str], live: bool = False,
            ranks: distributed.Ranks = distributed.Ranks()) -> tuple[str, int, Run]:
    """Run training in `run_dir` and write summary.json; returns (status, exit code, run).

    SIGTERM, SIGUSR1 and Ctrl-C only record themselves from here until summary.json is written: the loop
    finishes its step, saves last.pt and ends (faults.Interrupted), and a second signal cannot cut short
    the saving or the summary.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, run_dir, live, ranks)
    with run.signals:
        status, code, run = _execute(run, cfg, run_dir, overrides)
    received = run.signals.received
    if code == 0 and received is not None:  # after the last step (in the test): the run finished, yet it stops here
        log.warning(f"{faults.signal_name(received)} after training: the run finished its test and summary.json")
        code = faults.INTERRUPT_EXIT_CODES.get(received, 143)
    return status, code, run


def blame_first_failure(run: Run) -> None:
    """Under torchrun, when another rank failed before this one, summary.json gives that rank's error: here the
    failure shows only as this rank's collective breaking off ("Connection closed by peer")."""
    failed = distributed.failures(run.ranks)
    if not failed:  # this rank's own error
        return
    rank, first = min(failed.items(), key=lambda item: item[1]["at"])
    log.error(f"rank {rank} of {run.ranks.world} failed first, and this rank stopped with it: {first['reason']}")
    run.summary.update(stop_reason=f"rank {rank} failed: {first['reason']}", error=first["error"],
                       rank_0_error=run.summary["error"])


def _execute(run: Run, cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[str, int, Run]:
    code = None
    earlier_summary = (run_dir / "summary.json").is_file()  # a resume refused before training keeps it
    try:
        with faults.deterministic(cfg.trainer.deterministic is True):
            run.build()
            run.fit()
    except ConfigError as error:
        log.error(str(error))
        run.summary.update(status="failed", stop_reason="invalid config", error=str(error))
        code = EXIT_CODES["config_error"]
    except faults.Interrupted as stop:
        name = faults.signal_name(stop.signum)
        command = resume_command(overrides, run_dir, run.ranks.world)
        saved = (f"{run.ckpt_dir / 'last.pt'} saved. Continue with" if run.started
                 else "nothing to save. Start again with")
        log.warning(f"interrupted by {name} at {stop.where}: {saved}:\n  {command}")
        run.summary.update(status="interrupted", stop_reason=f"{name} at {stop.where}", resume_command=command)
        code = stop.exit_code
    except KeyboardInterrupt:  # raised outside the epoch loop's signal handlers
        log.warning("interrupted: checkpoints/last.pt holds the last state saved")
        run.summary.update(status="interrupted", stop_reason="interrupted by the user (Ctrl-C)")
    except checkpoint.CheckpointWriteError as error:
        log.error(str(error))
        run.summary.update(status="failed", stop_reason=str(error), error=str(error))
    except torch.OutOfMemoryError:
        message = faults.out_of_memory_message(run.train_batches.batch_size if hasattr(run, "train_batches")
                                               else cfg.data.batch_size, getattr(run, "device", torch.device("cpu")))
        log.error(message)
        run.summary.update(status="failed", stop_reason=message, error=traceback.format_exc())
    except Exception as error:  # noqa: BLE001 - any failure is recorded in summary.json, then reported
        refused = faults.nondeterministic_op(error)
        if refused is not None and cfg.trainer.deterministic is True:
            message = (f"trainer.deterministic=true: {refused} Set trainer.deterministic=false, or choose a model "
                       "or device whose ops all have deterministic implementations")
            log.error(message)
            run.summary.update(status="failed", stop_reason=message, error=traceback.format_exc())
        else:
            log.error("run failed:\n" + traceback.format_exc())
            run.summary.update(status="failed", stop_reason=f"error: {type(error).__name__}: {error}",
                               error=traceback.format_exc())
            if run.ranks.main and run.ranks.active:
                blame_first_failure(run)
    finally:
        if run.summary["status"] == "failed" and run.ranks.active and not run.ranks.main:
            distributed.publish_failure(run.ranks, {"at": time.time(), "reason": run.summary["stop_reason"],
                                                    "error": run.summary.get("error")})
        if run.monitor is not None:
            run.monitor.hparams(hyperparameters(cfg, overrides), run.summary)
            run.monitor.close()  # flushes TensorBoard and metrics.csv, also after a signal
        for name in ("train_batches", "val_batches", "test_batches"):
            if hasattr(run, name):
                getattr(run, name).close()
    status = run.summary["status"]
    run.summary.update(
        wall_time_s=round(run.wall_time_s, 3),
        device=str(run.device) if hasattr(run, "device") else None,  # null: refused before a device was chosen
        precision=getattr(run, "precision", None),
        versions=versions(),
        overrides=list(overrides),
        run_dir=str(run_dir),
        processes=run.ranks.world,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if run.ranks.main and (run.started or not earlier_summary):
        write_text_atomic(run_dir / "summary.json", json.dumps(run.summary, indent=2, default=str) + "\n")
    if run.ranks.main and run.started:
        console = Console()
        console.print(final_table(run.summary))
        for line in where_to_look(run.summary):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return status, EXIT_CODES[status] if code is None else code, run
