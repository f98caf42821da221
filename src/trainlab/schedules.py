"""Learning-rate schedules: pure functions of training progress or time, stepped once per optimizer step."""

from __future__ import annotations

import inspect
import logging
import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trainlab.config import CYCLE_SCHEDULES, ConfigError, is_number

# Each schedule returns the multiplier of optimizer.lr. Its first argument is its clock, which starts
# when warmup ends: `progress` runs from 0 to 1 over the rest of the run; `epochs` is the time since
# warmup in (fractional) epochs, step / steps_per_epoch.

log = logging.getLogger("trainlab")

PRECOMPUTED_STEPS = 2_000_000  # a run's lr factors computed up front (16 MB at most); later steps on the fly
RESTART_TOLERANCE = 1e-9  # epochs; absorbs float rounding so a restart lands exactly on its boundary step
CYCLIC_MODES = ("triangular", "triangular2", "exp_range")
ANNEAL_STRATEGIES = ("cos", "linear")
BASE_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95  # the momentum at the lr's peak, and at its start and end (torch's OneCycleLR)


def constant(progress: float) -> float:
    """1 everywhere."""
    return 1.0


def step_decay(epochs: float, step_epochs: float = 10.0, gamma: float = 0.5) -> float:
    """gamma ** (whole periods of step_epochs completed), changing only at epoch boundaries (a fractional period
    at the first boundary it has passed: 2.2 at 3, 5, 7, 9, 11, ...)."""
    return gamma ** math.floor(math.floor(epochs) / step_epochs + RESTART_TOLERANCE)


def multistep_decay(epochs: float, milestones: Sequence[float] = (10, 20), gamma: float = 0.1) -> float:
    """gamma ** (milestones reached), changing only at epoch boundaries."""
    return gamma ** sum(math.floor(epochs) >= m for m in milestones)


def exponential(epochs: float, k: float = 0.1) -> float:
    """exp(-k t), t in epochs."""
    return math.exp(-k * epochs)


def inverse_time(epochs: float, k: float = 1.0) -> float:
    """1 / (1 + k t), t in epochs (the 1/t decay)."""
    return 1.0 / (1.0 + k * epochs)


def inverse_sqrt(epochs: float, timescale_epochs: float = 1.0) -> float:
    """1 / sqrt(1 + t / t0), t and t0 in epochs: 1/sqrt(t) decay, flat (1) at t = 0."""
    return 1.0 / math.sqrt(1.0 + epochs / timescale_epochs)


def polynomial(progress: float, power: float = 2.0, min_lr_fraction: float = 0.0) -> float:
    """From 1 at progress 0 to min_lr_fraction at progress 1 along (1 - progress) ** power."""
    return min_lr_fraction + (1.0 - min_lr_fraction) * (1.0 - min(progress, 1.0)) ** power


def linear(progress: float, min_lr_fraction: float = 0.0) -> float:
    """A straight line from 1 at progress 0 to min_lr_fraction at progress 1."""
    return polynomial(progress, 1.0, min_lr_fraction)


def cosine(progress: float, min_lr_fraction: float = 0.0) -> float:
    """Half a cosine from 1 at progress 0 to min_lr_fraction at progress 1."""
    return min_lr_fraction + (1.0 - min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def cosine_restarts(epochs: float, period_epochs: float = 10.0, period_mult: float = 2.0,
                    min_lr_fraction: float = 0.0) -> float:
    """SGDR: a cosine from 1 to min_lr_fraction in each period; back to 1 at each period's start.

    1) find the period containing t: they last T0, T0*m, T0*m^2, ... epochs
    2) half a cosine over that period
    """
    if period_mult == 1.0:
        start = math.floor((epochs + RESTART_TOLERANCE) / period_epochs) * period_epochs
        length = period_epochs
    else:
        start, length = 0.0, period_epochs
        while epochs >= start + length - RESTART_TOLERANCE:
            start, length = start + length, length * period_mult
    return cosine(max(0.0, epochs - start) / length, min_lr_fraction)


def triangle(epochs: float, half_cycle_epochs: float = 2.0, mode: str = "triangular", gamma: float = 1.0) -> float:
    """The height of Smith's cyclical triangle: 0 at the troughs (start and end of each cycle), its scale at a peak.

    1) cycle = 1, 2, ...; x = 1 at the troughs, 0 at the peak
    2) the amplitude's scale: 1 (triangular), halved each cycle (triangular2), gamma**t (exp_range)
    """
    cycle = math.floor(1.0 + epochs / (2.0 * half_cycle_epochs))
    x = abs(epochs / half_cycle_epochs - 2.0 * cycle + 1.0)
    scale = {"triangular": 1.0, "triangular2": 0.5 ** (cycle - 1), "exp_range": gamma ** epochs}[mode]
    return max(0.0, 1.0 - x) * scale


def cyclic(epochs: float, half_cycle_epochs: float = 2.0, base_lr_fraction: float = 0.1,
           mode: str = "triangular", gamma: float = 1.0) -> float:
    """Smith's cyclical lr: base_lr_fraction + (1 - base_lr_fraction) * triangle, starting at the base."""
    return base_lr_fraction + (1.0 - base_lr_fraction) * triangle(epochs, half_cycle_epochs, mode, gamma)


def cyclic_momentum(epochs: float, half_cycle_epochs: float = 2.0, mode: str = "triangular", gamma: float = 1.0,
                    base_momentum: float = BASE_MOMENTUM, max_momentum: float = MAX_MOMENTUM) -> float:
    """cyclic's momentum, the lr's triangle upside down: max_momentum at the troughs, base_momentum at a full peak
    (triangular2 and exp_range scale its amplitude as the lr's, as torch's CyclicLR does)."""
    return max_momentum - (max_momentum - base_momentum) * triangle(epochs, half_cycle_epochs, mode, gamma)


def anneal(start: float, end: float, pct: float, strategy: str) -> float:
    """From start (pct 0) to end (pct 1): half a cosine ("cos") or a straight line ("linear")."""
    if strategy == "cos":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * pct))
    return start + (end - start) * pct


def onecycle(progress: float, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4,
             anneal_strategy: str = "cos") -> float:
    """Smith's one cycle, relative to the max lr: 1/div up to 1 over pct_start, then down to 1/(div*final_div).

    1) warm up from 1/div_factor to 1 over progress [0, pct_start]
    2) anneal from 1 to 1/(div_factor * final_div_factor) over progress [pct_start, 1]
    Its progress reaches 1 at the run's last step (torch's OneCycleLR too): see LAST_STEP_ENDS.
    """
    progress = min(progress, 1.0)
    if progress < pct_start:
        return anneal(1.0 / div_factor, 1.0, progress / pct_start, anneal_strategy)
    return anneal(1.0, 1.0 / (div_factor * final_div_factor), (progress - pct_start) / (1.0 - pct_start),
                  anneal_strategy)


def onecycle_momentum(progress: float, pct_start: float = 0.3, anneal_strategy: str = "cos",
                      base_momentum: float = BASE_MOMENTUM, max_momentum: float = MAX_MOMENTUM) -> float:
    """onecycle's momentum, inverse to its lr (Smith & Topin 2018; torch's OneCycleLR): from max_momentum down to
    base_momentum over progress [0, pct_start] while the lr rises, back up to max_momentum at progress 1."""
    progress = min(progress, 1.0)
    if progress < pct_start:
        return anneal(max_momentum, base_momentum, progress / pct_start, anneal_strategy)
    return anneal(base_momentum, max_momentum, (progress - pct_start) / (1.0 - pct_start), anneal_strategy)


def plateau(reductions: int, factor: float = 0.1, min_lr_fraction: float = 0.0) -> float:
    """factor ** reductions, never below min_lr_fraction."""
    return max(min_lr_fraction, factor ** reductions)


SCHEDULES: dict[str, Callable[..., float]] = {
    "none": constant, "cosine": cosine, "step": step_decay, "multistep": multistep_decay,
    "exponential": exponential, "inverse_time": inverse_time, "inverse_sqrt": inverse_sqrt, "linear": linear,
    "polynomial": polynomial, "cosine_restarts": cosine_restarts, "cyclic": cyclic, "onecycle": onecycle,
    "plateau": plateau,
}
EPOCH_CLOCK = frozenset({"step", "multistep", "exponential", "inverse_time", "inverse_sqrt", "cosine_restarts",
                         "cyclic"})
# The momentum cycled inversely to the lr (Smith & Topin 2018; torch's OneCycleLR and CyclicLR): each schedule's
# momentum as a function of the same clock, taking the lr schedule's knobs that shape it.
MOMENTUM_CYCLES: dict[str, Callable[..., float]] = {"onecycle": onecycle_momentum, "cyclic": cyclic_momentum}
MOMENTUM_KNOBS = ("cycle_momentum", "base_momentum", "max_momentum")
# Knobs read elsewhere than by the lr function: by the Plateau tracker; by the momentum cycle
EXTRA_KNOBS = {"plateau": ("patience", "min_delta"), **{name: MOMENTUM_KNOBS for name in MOMENTUM_CYCLES}}
# Schedules whose progress reaches 1 at the run's last optimizer step, so that the step uses the end value (onecycle's
# lr / (div_factor * final_div_factor), as torch's OneCycleLR). The others reach 1 one step after the run (torch's
# CosineAnnealingLR stepped per step does the same), which their min_lr_fraction (0 by default) makes visible only
# as a last step a hair above the floor.
LAST_STEP_ENDS = frozenset({"onecycle"})


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: Callable[[float], float],
              last_step_ends: bool = False) -> float:
    """The multiplier of the base learning rate used at optimizer step `step` (0-based).

    1) linear warmup: (step + 1) / warmup_steps of the schedule's start, schedule(0), for the first warmup_steps
       steps (1 for most schedules; onecycle starts at 1/div_factor, and its own rise follows)
    2) then the schedule, with progress running from 0 after warmup to 1 at total_steps, or at the last step
       (total_steps - 1) when `last_step_ends`
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps * schedule(0.0)
    return schedule((step - warmup_steps) / max(1, total_steps - warmup_steps - (1 if last_step_ends else 0)))


def lr_factor_epochs(step: int, steps_per_epoch: int, warmup_steps: int, schedule: Callable[[float], float]) -> float:
    """As lr_factor, for a schedule of the epochs elapsed since warmup ended (the warmup ends at schedule(0): cyclic
    starts at its base)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps * schedule(0.0)
    return schedule((step - warmup_steps) / steps_per_epoch)


def after_warmup(step: int, warmup_steps: int, factor: Callable[[int], float]) -> float:
    """factor(step), held at its value at the warmup's end during warmup: a cycled momentum stays at its cycle's start
    (max_momentum) while the lr warms up to the cycle's start, the lowest lr of the cycle."""
    return factor(max(step, warmup_steps))


def steps_until(epochs: float, epoch_steps: Sequence[int]) -> int:
    """The optimizer steps within the first `epochs` (fractional) epochs, given the steps of each epoch (which
    data.batch_size_schedule changes): a warmup of 3 epochs ends where epoch 3 ends, whatever its batch size."""
    if epochs <= 0:  # (a negative warmup stays negative, for build_scheduler to refuse)
        return round(epochs * epoch_steps[0]) if epoch_steps else 0
    whole = min(math.floor(epochs), len(epoch_steps))
    steps = float(sum(epoch_steps[:whole]))
    if whole < len(epoch_steps):
        steps += (epochs - whole) * epoch_steps[whole]
    return round(steps)


def improves(value: float, best: float, mode: str, min_delta: float) -> bool:
    """Early stopping's rule: finite, and better than best by more than min_delta (any beats a nan best)."""
    if not math.isfinite(value):
        return False
    if math.isnan(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass
class Plateau:
    """Reduce-on-plateau state: epochs without improvement of the monitored metric, and reductions made."""

    mode: str = "min"
    factor: float = 0.1
    patience: int = 5
    min_delta: float = 0.0
    min_lr_fraction: float = 0.0
    best: float = math.nan
    bad_epochs: int = 0
    reductions: int = 0

    def update(self, value: float) -> None:
        """Record one epoch's metric; `patience` epochs in a row without improvement make one reduction."""
        if improves(value, self.best, self.mode, self.min_delta):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.reductions, self.bad_epochs = self.reductions + 1, 0

    def scale(self) -> float:
        return plateau(self.reductions, self.factor, self.min_lr_fraction)


class Scheduler:
    """Sets every param group's lr to base lr * factor(step) (* the plateau scale) after each optimizer step, and with a
    `momentum` cycle its momentum too: the group's `momentum_key`, "momentum" (SGD, RMSprop) or "betas" (beta1).

    The factors (and momenta) of the first `precompute` steps are computed once, at construction: a step then costs a
    list lookup instead of three nested calls, which measured 5 µs a step inside a small MLP's loop on a CPU.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float],
                 plateau: Plateau | None = None, warmup_steps: int = 0, precompute: int = 0,
                 momentum: Callable[[int], float] | None = None, momentum_key: str = "momentum"):
        self.optimizer, self.factor, self.plateau, self.warmup_steps = optimizer, factor, plateau, warmup_steps
        self.momentum, self.momentum_key = momentum, momentum_key
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self._factors = array("d", map(factor, range(precompute)))  # 8 bytes a step
        self._momenta = array("d", map(momentum, range(precompute)) if momentum is not None else ())
        self._momentum: float | None = None  # the value the cycle last set, as _scale is the lr's
        self.steps = 0  # optimizer steps taken
        self._apply()

    def _apply(self) -> None:
        steps = self.steps
        scale = self._factors[steps] if steps < len(self._factors) else self.factor(steps)
        if self.plateau is not None:
            scale *= self.plateau.scale()
        self._scale = scale
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale
        if self.momentum is not None:
            self._apply_momentum(steps)

    def _apply_momentum(self, steps: int) -> None:
        value = self._momenta[steps] if steps < len(self._momenta) else self.momentum(steps)
        self._momentum = value
        for group in self.optimizer.param_groups:
            if self.momentum_key == "betas":
                group["betas"] = (value, *group["betas"][1:])
            else:
                group["momentum"] = value

    def step(self) -> None:
        """Advance one optimizer step."""
        self.steps += 1
        self._apply()

    def epoch_end(self, value: float) -> None:
        """The epoch's monitored metric: plateau acts on it once warmup is over; other schedules ignore it."""
        if self.plateau is None or self.steps < self.warmup_steps:
            return
        self.plateau.update(float(value))
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [base * self._scale for base in self.base_lrs]

    def get_last_momentum(self) -> float | None:
        """The momentum (or beta1) the cycle set for the next step; None when it cycles none."""
        return self._momentum

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self.steps, "base_lrs": list(self.base_lrs)}
        if self.plateau is not None:
            p = self.plateau
            state["plateau"] = {"best": p.best, "bad_epochs": p.bad_epochs, "reductions": p.reductions}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"] if "steps" in state else state["last_epoch"])  # or a LambdaLR's state
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        if self.plateau is not None and "plateau" in state:
            saved = state["plateau"]
            self.plateau.best, self.plateau.bad_epochs = float(saved["best"]), int(saved["bad_epochs"])
            self.plateau.reductions = int(saved["reductions"])
        self._apply()


KNOB_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "min_lr_fraction": (lambda v: is_number(v) and 0 <= v <= 1, "a fraction of optimizer.lr in [0, 1]"),
    "step_epochs": (lambda v: is_number(v) and v > 0, "> 0 epochs"),
    "gamma": (lambda v: is_number(v) and v > 0, "> 0"),
    "milestones": (lambda v: isinstance(v, list) and all(is_number(m) and m > 0 for m in v) and v == sorted(v),
                   "a list of increasing epochs > 0, e.g. [10, 20]"),
    "k": (lambda v: is_number(v) and v >= 0, ">= 0 (per epoch)"),
    "timescale_epochs": (lambda v: is_number(v) and v > 0, "> 0 epochs"),
    "power": (lambda v: is_number(v) and v > 0, "> 0"),
    "period_epochs": (lambda v: is_number(v) and v > 0, "> 0 epochs"),
    "period_mult": (lambda v: is_number(v) and v >= 1, ">= 1"),
    "half_cycle_epochs": (lambda v: is_number(v) and v > 0, "> 0 epochs"),
    "base_lr_fraction": (lambda v: is_number(v) and 0 <= v <= 1, "a fraction of optimizer.lr in [0, 1]"),
    "mode": (lambda v: v in CYCLIC_MODES, "one of " + ", ".join(CYCLIC_MODES)),
    "pct_start": (lambda v: is_number(v) and 0 < v < 1, "a fraction of the run in (0, 1)"),
    "div_factor": (lambda v: is_number(v) and v >= 1, ">= 1"),
    "final_div_factor": (lambda v: is_number(v) and v >= 1, ">= 1"),
    "anneal_strategy": (lambda v: v in ANNEAL_STRATEGIES, "one of " + ", ".join(ANNEAL_STRATEGIES)),
    "factor": (lambda v: is_number(v) and 0 < v < 1, "in (0, 1)"),
    "patience": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number of epochs >= 1"),
    "min_delta": (lambda v: is_number(v) and v >= 0, ">= 0"),
    "cycle_momentum": (lambda v: isinstance(v, bool), "true or false"),
    "base_momentum": (lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)"),
    "max_momentum": (lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)"),
}


def knobs_of(name: str) -> list[str]:
    """The knobs schedule `name` takes besides warmup_epochs."""
    return list(inspect.signature(SCHEDULES[name]).parameters)[1:] + list(EXTRA_KNOBS.get(name, ()))


def parse(cfg: DictConfig | dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
    """(name, warmup_epochs, knobs) of a scheduler node; ConfigError naming every bad knob."""
    options: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    name = options.pop("name", None)
    if name not in SCHEDULES:
        raise ConfigError(f"scheduler={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    warmup_epochs = options.pop("warmup_epochs", 0)
    valid = knobs_of(name)
    problems = [f"scheduler={name}: unexpected keyword scheduler.{key}; {name} takes warmup_epochs"
                f"{''.join(', ' + k for k in valid)} (a key an experiment set for its own schedule goes with "
                f"~scheduler.{key})" for key in options if key not in valid]
    if not is_number(warmup_epochs):
        problems.append(f"scheduler.warmup_epochs={warmup_epochs!r}: must be a number of epochs")
    problems += [f"scheduler.{key}={value!r}: must be {KNOB_RULES[key][1]}"
                 for key, value in options.items() if key in valid and not KNOB_RULES[key][0](value)]
    gamma, mode = options.get("gamma", 1.0), options.get("mode", _default("cyclic", "mode"))
    if name == "cyclic" and mode == "exp_range" and is_number(gamma) and gamma > 1:
        problems.append(f"scheduler.gamma={gamma}: exp_range scales each cycle's amplitude by gamma**epochs, so above "
                        "1 the peaks grow past optimizer.lr, the cycle's highest lr; give gamma <= 1 (e.g. 0.99)")
    if name == "cyclic" and mode in CYCLIC_MODES and mode != "exp_range" and is_number(gamma) and gamma != 1:
        problems.append(f"scheduler.gamma={gamma}: only scheduler.mode=exp_range reads it, and mode={mode} would "
                        "train without it; add scheduler.mode=exp_range, or leave gamma at 1")
    if name in MOMENTUM_CYCLES:
        problems += _momentum_knob_problems(options)
    if problems:
        raise ConfigError("; ".join(problems))
    return name, float(warmup_epochs), options


def _momentum_knob_problems(options: dict[str, Any]) -> list[str]:
    """A momentum that would rise with the lr (base above max), and momentum knobs that cycle_momentum=false leaves
    unread."""
    base, top = options.get("base_momentum", BASE_MOMENTUM), options.get("max_momentum", MAX_MOMENTUM)
    problems = []
    if is_number(base) and is_number(top) and base > top:
        problems.append(f"scheduler.base_momentum={base} is above scheduler.max_momentum={top}: the momentum falls to "
                        "base_momentum while the lr rises to its peak, and is back at max_momentum where the lr is "
                        "lowest (Smith); give base_momentum <= max_momentum")
    unread = _momentum_knobs_set(options)
    if options.get("cycle_momentum", True) is False and unread:
        problems.append(f"{', '.join(unread)}: only scheduler.cycle_momentum=true reads "
                        f"{'it' if len(unread) == 1 else 'them'}, and cycle_momentum=false would train without; set "
                        f"scheduler.cycle_momentum=true, or leave base_momentum and max_momentum at {BASE_MOMENTUM} "
                        f"and {MAX_MOMENTUM}")
    return problems


def _momentum_knobs_set(options: dict[str, Any]) -> list[str]:
    """`scheduler.key=value` for base_momentum and max_momentum where they differ from their defaults."""
    defaults = {"base_momentum": BASE_MOMENTUM, "max_momentum": MAX_MOMENTUM}
    return [f"scheduler.{key}={options[key]}" for key, default in defaults.items()
            if key in options and options[key] != default]


def momentum_key(optimizer: torch.optim.Optimizer, name: str, knobs: dict[str, Any]) -> str | None:
    """The optimizer setting scheduler.cycle_momentum cycles, as torch's OneCycleLR and CyclicLR pick it: "betas"
    (beta1 of Adam, AdamW, NAdam, RAdam, Adamax) or "momentum" (SGD, RMSprop); None: the lr cycles alone.

    An optimizer without momentum (Adagrad, Adadelta, LBFGS, FTRL) or at momentum 0 (optimizer=sgd, rmsprop) gets
    none turned on (torch cycles one into a momentum of 0): at the default momentum knobs only the lr cycles, and the
    log says so; with base_momentum or max_momentum set it is refused, as is optimizer's momentum ramp, which sets the
    momentum every step too.
    """
    if knobs.get("cycle_momentum", True) is False:
        return None
    if any("momentum_step" in group for group in optimizer.param_groups):  # optim.momentum_ramp's counter
        raise ConfigError(f"scheduler.cycle_momentum=true: scheduler={name} cycles the momentum inversely to the lr, "
                          "and optimizer.momentum_start and momentum_warmup_epochs ramp it "
                          "(optimizer=momentum_schedule); both would set it every step. Set "
                          "scheduler.cycle_momentum=false to keep the ramp, or pick optimizer=momentum (or nesterov) "
                          "to cycle it")
    if "betas" in optimizer.defaults:
        return "betas"
    momentum = optimizer.defaults.get("momentum")
    if is_number(momentum) and momentum > 0:
        return "momentum"
    has = "momentum 0 (optimizer.momentum)" if momentum is not None else "no momentum"
    fix = ("pick optimizer=momentum (or nesterov, adam, adamw, nadam, radam, adamax)" if momentum is None else
           "pick optimizer=momentum (or nesterov), or give optimizer.momentum above 0 (e.g. 0.9; optimizer=sgd: "
           "+optimizer.momentum=0.9)")
    chosen = _momentum_knobs_set(knobs)
    if chosen:
        raise ConfigError(f"scheduler.cycle_momentum=true with {', '.join(chosen)} needs an optimizer with momentum, "
                          f"and {type(optimizer).__name__} has {has}; {fix}, or set scheduler.cycle_momentum=false "
                          "and drop the momentum knobs to cycle the lr alone")
    log.warning(f"scheduler={name}: {type(optimizer).__name__} has {has}, so only the lr cycles "
                "(scheduler.cycle_momentum cycles a momentum, and never turns one on); to cycle it too, "
                f"{fix}; scheduler.cycle_momentum=false says so and silences this")
    return None


def cycle_boundaries(name: str, knobs: dict[str, Any], horizon: float) -> list[float]:
    """Where the cycles of schedule `name` end, in epochs since warmup, up to `horizon` (inclusive).

    cosine_restarts: T0, T0 + T0*m, ... (each a restart back to the top); cyclic: every 2 * half_cycle_epochs
    (each a trough, back at base_lr_fraction). Both are the lowest lr of their cycle.
    """
    if name not in CYCLE_SCHEDULES:
        raise ConfigError(f"scheduler={name} has no cycles; choose one of {', '.join(CYCLE_SCHEDULES)}")
    defaults = {k: p.default for k, p in inspect.signature(SCHEDULES[name]).parameters.items()}
    knobs = {**defaults, **knobs}
    ends: list[float] = []
    if name == "cosine_restarts":
        end, length = knobs["period_epochs"], knobs["period_epochs"]
        while end <= horizon + RESTART_TOLERANCE:
            ends.append(end)
            length *= knobs["period_mult"]
            end += length
    else:
        cycle = 2.0 * knobs["half_cycle_epochs"]
        ends = [k * cycle for k in range(1, math.floor(horizon / cycle + RESTART_TOLERANCE) + 1)]
    return ends


def _warn_unreached_decays(name: str, knobs: dict[str, Any], last_epoch: int, max_epochs: int,
                           warmup_epochs: float) -> None:
    """Warn of a step decay whose first period, or multistep milestones, the run never reaches: `last_epoch` is the
    whole epochs since warmup at the run's last step (a decay at epoch e applies from the step that begins epoch e)."""
    counted = f", counted from the end of scheduler.warmup_epochs={warmup_epochs:g}" if warmup_epochs else ""
    if name == "step":
        period = knobs.get("step_epochs", _default(name, "step_epochs"))
        if math.floor(last_epoch / period + RESTART_TOLERANCE) == 0:
            log.warning(f"scheduler=step: scheduler.step_epochs={period} is not reached within "
                        f"trainer.max_epochs={max_epochs} (epochs{counted or ' from the start'}), so the lr never "
                        "decays; shorten scheduler.step_epochs or raise trainer.max_epochs")
        return
    milestones = list(knobs.get("milestones", _default(name, "milestones")))
    unreached = [m for m in milestones if last_epoch < m]
    if unreached:
        log.warning(f"scheduler=multistep: scheduler.milestones {unreached} are not reached within "
                    f"trainer.max_epochs={max_epochs} (milestone m decays the lr after m epochs{counted}), so the lr "
                    f"decays {len(milestones) - len(unreached)} of {len(milestones)} times; lower them or raise "
                    "trainer.max_epochs")


def _default(name: str, knob: str) -> Any:
    return inspect.signature(SCHEDULES[name]).parameters[knob].default


def snapshot_epochs(cfg: DictConfig, steps_per_epoch: int, max_epochs: int) -> list[int]:
    """The epochs at whose end checkpoint.snapshots=cycles saves the weights: those where a cycle of cfg.scheduler
    ends (warmup included). ConfigError when a cycle ends inside an epoch (its end would then be saved at a high lr,
    after the restart) or when fewer than 2 cycles end within the run (no ensemble)."""
    name, warmup_epochs, knobs = parse(cfg)
    warmup = steps_until(warmup_epochs, [steps_per_epoch] * max_epochs)  # as build_scheduler counts it
    # the optimizer steps each cycle ends after: the first step of the next one, as the schedule places it
    ends = [math.ceil(warmup + (b - RESTART_TOLERANCE) * steps_per_epoch)
            for b in cycle_boundaries(name, knobs, max_epochs - warmup / steps_per_epoch)]
    inside = [e / steps_per_epoch for e in ends if e % steps_per_epoch]
    if inside:
        raise ConfigError(f"checkpoint.snapshots=cycles: cycles of scheduler={name} end inside an epoch (at epoch "
                          f"{', '.join(f'{e:.4g}' for e in inside)} of {steps_per_epoch} steps each); a snapshot is "
                          "taken at an epoch's end, which after a restart mid-epoch is no longer the cycle's lowest "
                          "lr. Choose scheduler.warmup_epochs and "
                          + ("period_epochs, period_mult" if name == "cosine_restarts" else "half_cycle_epochs")
                          + " so that every cycle ends at a whole epoch")
    epochs = [e // steps_per_epoch for e in ends]
    if len(epochs) < 2:
        raise ConfigError(f"checkpoint.snapshots=cycles: {len(epochs)} cycle(s) of scheduler={name} end within "
                          f"trainer.max_epochs={max_epochs}{f' (at epoch {epochs[0]})' if epochs else ''}; a "
                          "snapshot ensemble needs at least 2: raise trainer.max_epochs or shorten the cycles")
    return epochs


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, max_epochs: int,
                    mode: str = "min", epoch_steps: Sequence[int] | None = None) -> Scheduler:
    """The Scheduler of cfg (warmup + schedule) over max_epochs * steps_per_epoch steps, or over `epoch_steps` (the
    steps of each epoch, where data.batch_size_schedule changes them; only none and plateau run with it, and the
    warmup counts the epochs' own steps).

    `mode` (min/max) is early_stopping.mode: whether plateau's monitored metric improves downwards or upwards.
    """
    name, warmup_epochs, knobs = parse(cfg)
    if mode not in ("min", "max"):
        raise ConfigError(f"early_stopping.mode={mode!r}: choose min or max")
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch={steps_per_epoch}: the training split yields no batch")
    epoch_steps = list(epoch_steps) if epoch_steps is not None else [steps_per_epoch] * max_epochs
    total = sum(epoch_steps)
    warmup = steps_until(warmup_epochs, epoch_steps)
    if warmup < 0 or warmup >= total:
        raise ConfigError(f"scheduler.warmup_epochs={warmup_epochs:g} must be >= 0 and shorter than the run "
                          f"(trainer.max_epochs={max_epochs})")
    if warmup == 0 and warmup_epochs > 0:
        raise ConfigError(f"scheduler.warmup_epochs={warmup_epochs:g} is less than half of one of the "
                          f"{epoch_steps[0]} steps of epoch 1, so no step would warm up; give at least "
                          f"{1 / epoch_steps[0]:.3g} (one step), or 0")
    if name in CYCLE_SCHEDULES and not cycle_boundaries(name, knobs, max_epochs - warmup / steps_per_epoch):
        knob = "period_epochs" if name == "cosine_restarts" else "half_cycle_epochs"
        log.warning(f"scheduler={name}: its first cycle (scheduler.{knob}={knobs.get(knob, _default(name, knob))}) "
                    f"does not end within trainer.max_epochs={max_epochs}, so the lr never "
                    + ("restarts nor reaches its lowest value" if name == "cosine_restarts" else
                       "completes a cycle") + f"; shorten scheduler.{knob} or raise trainer.max_epochs")
    if name in ("step", "multistep"):
        _warn_unreached_decays(name, knobs, (total - 1 - warmup) // steps_per_epoch, max_epochs, warmup_epochs)
    cycle = {key: knobs.pop(key) for key in MOMENTUM_KNOBS if key in knobs}  # the momentum's, not the lr's
    tracker = None
    if name == "plateau":
        tracker, schedule = Plateau(mode=mode, **knobs), constant
    else:
        schedule = partial(SCHEDULES[name], **knobs)
    if name in EPOCH_CLOCK:
        clock = partial(lr_factor_epochs, steps_per_epoch=steps_per_epoch, warmup_steps=warmup)
    else:
        clock = partial(lr_factor, total_steps=total, warmup_steps=warmup, last_step_ends=name in LAST_STEP_ENDS)
    key = momentum_key(optimizer, name, cycle) if name in MOMENTUM_CYCLES else None
    momentum = None
    if key is not None:  # the same clock as the lr's: same warmup, progress and last step
        shape = MOMENTUM_CYCLES[name]
        takes = list(inspect.signature(shape).parameters)[1:]
        shape = partial(shape, **{k: v for k, v in {**knobs, **cycle}.items() if k in takes})
        momentum = partial(after_warmup, warmup_steps=warmup, factor=partial(clock, schedule=shape))
    return Scheduler(optimizer, partial(clock, schedule=schedule), tracker, warmup,
                     precompute=min(total + 1, PRECOMPUTED_STEPS), momentum=momentum, momentum_key=key or "momentum")
