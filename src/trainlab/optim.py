"""The optimizer: parameter groups (decayed or not), decoupled weight decay and a momentum ramp as step pre-hooks."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trainlab.adam import UncorrectedAdam, UncorrectedAdamW
from trainlab.config import ConfigError, is_number
from trainlab.schedules import steps_until

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)

# Keys of the optimizer group that trainlab reads itself (popped before the optimizer is built).
TRAINLAB_KEYS = ("decay_norm_and_bias", "momentum_start", "momentum_warmup_epochs", "bias_correction")
# The optimizers `bias_correction` switches: with false, the same update without Adam's 1 / (1 - beta^t) factors.
UNCORRECTED = {torch.optim.Adam: UncorrectedAdam, torch.optim.AdamW: UncorrectedAdamW}
# Constructor arguments owned by the regularization group: trainlab decays every optimizer the same way.
DECAY_KEYS = ("weight_decay", "decoupled_weight_decay")
# Optimizers that accept a single parameter group: decay and no_decay are merged into one group.
SINGLE_GROUP = (torch.optim.LBFGS,)


def parameter_groups(model: nn.Module, decay_norm_and_bias: bool) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed): biases and normalization parameters are not decayed unless asked."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = name == "bias" or isinstance(module, _NORM_TYPES)
            (no_decay if exempt and not decay_norm_and_bias else decay).append(param)
    return decay, no_decay


def decoupled_weight_decay(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """w -= lr * wd * w for every group with a `weight_decay_decoupled`, before the optimizer's own update.

    A group may decay only its first `decayed_params` parameters (a merged group of a single-group
    optimizer such as LBFGS: the decayed parameters first, then the exempt ones).
    """
    for group in optimizer.param_groups:
        wd = group.get("weight_decay_decoupled", 0.0)
        if wd > 0:
            params = group["params"][: group.get("decayed_params", len(group["params"]))]
            if params:
                with torch.no_grad():
                    torch._foreach_mul_(params, 1.0 - group["lr"] * wd)


def decayed_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the decayed set (for penalties that must skip biases and norm parameters too)."""
    return [p for group in optimizer.param_groups for p in group["params"][:_decayed_count(group)]]


def _decayed_count(group: dict[str, Any]) -> int:
    """How many of the group's parameters (its first ones) are in the decayed set."""
    return group.get("decayed_params", 0 if str(group.get("name")).endswith("no_decay") else len(group["params"]))


def momentum_at(step: int, start: float, final: float, warmup_steps: int) -> float:
    """The momentum of optimizer step `step` (0-based): a linear ramp from start to final over warmup_steps."""
    if step >= warmup_steps:
        return final
    return start + (final - start) * step / warmup_steps


def momentum_ramp(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Set each group's momentum for the coming step from the step counter kept in the group (checkpointed).

    torch's RMSprop makes a parameter's momentum buffer at its first step only if momentum is above 0 then, and
    later steps with momentum read it: a ramp from 0 gets zero buffers (torch's own start) when it leaves 0."""
    for group in optimizer.param_groups:
        if "momentum_step" in group:
            group["momentum"] = momentum_at(group["momentum_step"], group["momentum_start"],
                                            group["momentum_final"], group["momentum_warmup_steps"])
            group["momentum_step"] += 1
            if (group["momentum"] > 0 and group["momentum_step"] <= group["momentum_warmup_steps"] + 1
                    and isinstance(optimizer, torch.optim.RMSprop)):
                for param in group["params"]:
                    state = optimizer.state.get(param)
                    if state and "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True when optimizer.step must be given a closure that re-evaluates the loss (LBFGS)."""
    return isinstance(optimizer, torch.optim.LBFGS)


def _accepts(cls: Any, key: str) -> bool:
    try:
        return key in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _valid_keys(cls: Any) -> list[str] | None:
    """The config keys `cls`'s constructor accepts (None when it takes **kwargs), plus trainlab's own."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    names = [p.name for p in parameters if p.name not in ("self", "params", *DECAY_KEYS)
             and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return names + [key for key in TRAINLAB_KEYS if key == "decay_norm_and_bias" or "momentum" in names
                    or (key == "bias_correction" and (cls in UNCORRECTED or cls in UNCORRECTED.values()))]


def build_optimizer(cfg: DictConfig, model: nn.Module, steps_per_epoch: int = 1,
                    features: list[nn.Parameter] | None = None, feature_lr_scale: float = 1.0,
                    epoch_steps: Sequence[int] | None = None) -> torch.optim.Optimizer:
    """cfg.optimizer (a partial torch optimizer) over the model's parameter groups, with cfg.regularization.

    The optimizer's own weight decay is forced to 0: decay is trainlab's decoupled pre-hook. With
    `momentum_start` and `momentum_warmup_epochs`, momentum ramps linearly from momentum_start to
    `momentum` over that many epochs of `steps_per_epoch` steps (of `epoch_steps`, each epoch's steps, where
    data.batch_size_schedule changes them). `bias_correction=false` (Adam, AdamW) builds
    trainlab.adam's uncorrected variant with the same arguments. `features` (finetune) train at
    optimizer.lr x `feature_lr_scale`, in groups of their own after the others.
    """
    options: dict[str, Any] = OmegaConf.to_container(cfg.optimizer, resolve=True)  # type: ignore[assignment]
    target = options.get("_target_")
    decay_norm_and_bias = options.pop("decay_norm_and_bias", False)
    if not isinstance(decay_norm_and_bias, bool):
        raise ConfigError(f"optimizer.decay_norm_and_bias={decay_norm_and_bias!r}: must be true or false")
    ramp = {key: options.pop(key) for key in ("momentum_start", "momentum_warmup_epochs") if key in options}
    for key, value in ramp.items():
        if not is_number(value):
            raise ConfigError(f"optimizer.{key}={value!r}: must be a number")
    bias_correction = options.pop("bias_correction", None)
    for key in DECAY_KEYS:
        if key in options:
            raise ConfigError(f"optimizer.{key}: set regularization.weight_decay instead (decoupled decay, "
                              "applied the same way for every optimizer)")
    try:
        factory = instantiate(options, _convert_="all")  # plain lists (betas), not OmegaConf's
    except Exception as error:  # noqa: BLE001 - Hydra wraps import and argument errors alike
        raise ConfigError(f"optimizer={target}: {error}") from None
    cls = factory.func if isinstance(factory, functools.partial) else factory
    if bias_correction is not None:
        factory, cls = _bias_correction(factory, cls, bias_correction, target)
        if bias_correction is False:
            target = f"{target} with optimizer.bias_correction=false ({cls.__module__}.{cls.__name__})"
    valid = _valid_keys(cls)
    if valid is not None:
        unknown = [key for key in options if key not in ("_target_", "_partial_") and key not in valid]
        if unknown:
            raise ConfigError(f"optimizer={target}: unknown key(s) "
                              f"{', '.join('optimizer.' + key for key in unknown)}; valid keys: {', '.join(valid)}")

    _check_rates(cls, options, target)
    decay, no_decay = parameter_groups(model, decay_norm_and_bias)
    wd = float(cfg.regularization.weight_decay)
    if (isinstance(cls, type) and issubclass(cls, SINGLE_GROUP)) or wd == 0:
        # One group "all" where the split changes nothing (no decay) or the optimizer takes one group: the decayed
        # parameters first, so decay and the l1/l2 penalties still skip the rest (`decayed_params`). A second,
        # identical group doubled the optimizer's per-group Python work: 1-2 % of a small MLP's step on a CPU.
        groups = [{"params": decay + no_decay, "weight_decay_decoupled": wd, "decayed_params": len(decay),
                   "name": "all"}]
    else:
        groups = [{"params": decay, "weight_decay_decoupled": wd, "name": "decay"},
                  {"params": no_decay, "weight_decay_decoupled": 0.0, "name": "no_decay"}]
        groups = [g for g in groups if g["params"]]
    if features:
        if isinstance(cls, type) and issubclass(cls, SINGLE_GROUP):
            raise ConfigError(f"finetune.feature_lr_scale={feature_lr_scale:g}: optimizer={target} takes one "
                              "parameter group, so one learning rate; use finetune=frozen, or another optimizer")
        groups = _scaled_groups(groups, features, feature_lr_scale, float(options.get("lr", 1e-3)))
    own_decay = {"weight_decay": 0.0} if _accepts(cls, "weight_decay") else {}  # AdamW's default is 0.01
    try:
        optimizer = factory(groups, **own_decay, **fast_kernels(cls, options, decay + no_decay))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer={target}: {error}; check the keys of the optimizer group") from None

    if ramp:
        _add_momentum_ramp(optimizer, target, ramp, epoch_steps if epoch_steps is not None else [steps_per_epoch])
    if wd > 0:
        optimizer.register_step_pre_hook(decoupled_weight_decay)
    return optimizer


def _check_rates(cls: Any, options: dict[str, Any], target: Any) -> None:
    """What torch accepts but cannot train with: lr 0 (nothing moves), SGD's or RMSprop's momentum of 1 or more
    (the velocity never decays: 1.5 grows it 1.5x a step), RMSprop's alpha or Adadelta's rho of 1 or more (the
    running mean of squared gradients stays 0, or goes negative: steps of lr / eps, plain SGD, or NaN), SGD's
    dampening of 1 or more with momentum (no gradient enters the velocity after the first step, or with its sign
    flipped); and Nesterov without momentum, which torch refuses without naming the values."""
    lr = options.get("lr")
    if is_number(lr) and lr == 0:
        raise ConfigError("optimizer.lr=0: the weights would never move; give a learning rate > 0")
    if not isinstance(cls, type):
        return
    rho = options.get("rho")
    if issubclass(cls, torch.optim.Adadelta) and is_number(rho) and rho >= 1:
        raise ConfigError(f"optimizer.rho={rho}: must be in [0, 1) for optimizer={target}; at 1 its running "
                          "averages stay 0 and every step is plain SGD, w -= lr * g (0.9 is usual)")
    momentum, dampening = options.get("momentum", 0), options.get("dampening", 0)
    if issubclass(cls, torch.optim.SGD) and is_number(momentum) and is_number(dampening):
        if options.get("nesterov") is True and not (momentum > 0 and dampening == 0):
            raise ConfigError(f"optimizer.nesterov=true needs optimizer.momentum > 0 and optimizer.dampening=0 (here "
                              f"{momentum} and {dampening}); set them (optimizer=nesterov: 0.9 and 0), or "
                              "optimizer.nesterov=false")
        if momentum > 0 and dampening >= 1:
            raise ConfigError(f"optimizer.dampening={dampening}: must be in [0, 1) with optimizer.momentum={momentum}; "
                              "the velocity v = momentum * v + (1 - dampening) * g takes in no gradient after the "
                              "first step at 1 (the weights stop), each with its sign flipped above 1 (0 is the "
                              "classic heavy ball)")
    if not issubclass(cls, (torch.optim.SGD, torch.optim.RMSprop)):
        return
    bounded = [("momentum", "the velocity would never decay (0.9 is usual)")]
    if issubclass(cls, torch.optim.RMSprop):
        bounded.append(("alpha", "the running mean of squared gradients would never follow them (0.99 is usual)"))
    for key, why in bounded:
        value = options.get(key)
        if is_number(value) and value >= 1:
            raise ConfigError(f"optimizer.{key}={value}: must be in [0, 1) for optimizer={target}; at 1 or more {why}")


def _extended(epoch_steps: Sequence[int], epochs: float) -> list[int]:
    """Each epoch's steps, the last repeated to cover `epochs` (a ramp may outlast the run, or the given epochs)."""
    return list(epoch_steps) + [epoch_steps[-1]] * max(0, math.ceil(epochs) - len(epoch_steps))


def _bias_correction(factory: Any, cls: Any, bias_correction: Any, target: Any) -> tuple[Any, Any]:
    """(factory, class): torch's Adam or AdamW as they are for true, trainlab's uncorrected variant for false."""
    if cls not in UNCORRECTED:
        raise ConfigError(f"optimizer.bias_correction: optimizer={target} has no bias correction to switch; only "
                          "optimizer=adam and optimizer=adamw (torch.optim.Adam, torch.optim.AdamW) take it")
    if not isinstance(bias_correction, bool):
        raise ConfigError(f"optimizer.bias_correction={bias_correction!r}: must be true or false")
    if bias_correction:
        return factory, cls
    uncorrected = UNCORRECTED[cls]
    return functools.partial(uncorrected, *factory.args, **factory.keywords), uncorrected


def _scaled_groups(groups: list[dict[str, Any]], features: list[nn.Parameter], scale: float,
                   lr: float) -> list[dict[str, Any]]:
    """Each group split in two: "head" (the classifier and new layers, at lr; first, so the logged lr is
    optimizer.lr) and "features" (at lr x scale, remembered as the group's lr_scale)."""
    chosen = {id(p) for p in features}
    parts: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for group in groups:
        decayed_ids = {id(p) for p in group["params"][:_decayed_count(group)]}
        for scaled in (False, True):
            params = [p for p in group["params"] if (id(p) in chosen) == scaled]
            params.sort(key=lambda p: id(p) not in decayed_ids)  # decayed first, as decayed_params counts them
            if params:
                base = "features" if scaled else "head"
                parts[scaled].append({**group, "params": params, "name": base if group["name"] == "all" else
                                      f"{base}_{group['name']}", "decayed_params": sum(id(p) in decayed_ids
                                                                                      for p in params),
                                      "lr": lr * (scale if scaled else 1.0), "lr_scale": scale if scaled else 1.0})
    return parts[False] + parts[True]


def fast_kernels(cls: Any, options: dict[str, Any], params: list[torch.Tensor]) -> dict[str, bool]:
    """fused=True where the optimizer has a fused kernel for the parameters' device, unless the config sets fused or
    foreach itself; elsewhere torch's own choice (foreach on CUDA, per-tensor on a CPU).

    A fused step updates every parameter in one pass instead of a few kernels per tensor. On CUDA that is one
    launch; on a CPU (torch 2.14, every optimizer with a fused kernel: SGD, Adam, AdamW, Adagrad) a small MLP's
    steps measured up to 5 % faster with SGD and 9-30 % with Adam, AdamW and Adagrad (`benchmark.py kernels`); the
    updates agree with the per-tensor ones to rounding.
    """
    if not params or "fused" in options or "foreach" in options or not _accepts(cls, "fused"):
        return {}
    return {"fused": True} if params[0].device.type in _fused_devices() else {}


def _fused_devices() -> tuple[str, ...]:
    """The device types torch has fused optimizer kernels for."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that moved the private helper: the devices every recent torch supports
        return ("cuda", "cpu")
    return tuple(_get_fused_kernels_supported_devices())


KERNEL_KEYS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """optimizer.load_state_dict, keeping the kernel choice (fused, foreach) this optimizer was built with: the
    saved groups carry the choice made for the device they were saved on, which another device may lack."""
    built = [{key: group[key] for key in KERNEL_KEYS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kernels in zip(optimizer.param_groups, built):
        group.update(kernels)


def _add_momentum_ramp(optimizer: torch.optim.Optimizer, target: Any, ramp: dict[str, Any],
                       epoch_steps: Sequence[int]) -> None:
    """Store the ramp in every param group (so optimizer.state_dict() carries it) and register its hook."""
    if "momentum" not in optimizer.defaults:
        raise ConfigError(f"optimizer.{', optimizer.'.join(ramp)}: optimizer={target} has no momentum to ramp; "
                          "use it with optimizer=momentum_schedule (SGD) or another optimizer with a `momentum` key")
    missing = [key for key in ("momentum_start", "momentum_warmup_epochs") if key not in ramp]
    if missing:
        raise ConfigError(f"optimizer.{missing[0]} is missing: a momentum ramp needs both optimizer.momentum_start "
                          "and optimizer.momentum_warmup_epochs")
    start, epochs = float(ramp["momentum_start"]), float(ramp["momentum_warmup_epochs"])
    final = float(optimizer.defaults["momentum"])
    if not 0.0 <= start < 1.0:
        raise ConfigError(f"optimizer.momentum_start={start}: must be in [0, 1)")
    if epochs < 0:
        raise ConfigError(f"optimizer.momentum_warmup_epochs={epochs}: must be >= 0 epochs")
    if start > 0 and final == 0:
        raise ConfigError(f"optimizer.momentum_start={start} with optimizer.momentum=0: set optimizer.momentum "
                          "(the momentum the ramp ends at)")
    for group in optimizer.param_groups:
        group.update(momentum_start=start, momentum_final=final, momentum_step=0,
                     momentum_warmup_steps=steps_until(epochs, _extended(epoch_steps, epochs)))
        group["momentum"] = momentum_at(0, start, final, group["momentum_warmup_steps"])
    optimizer.register_step_pre_hook(momentum_ramp)
