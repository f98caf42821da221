"""Schemas of the trainlab-owned config nodes, and validation of a composed config before anything runs."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import re
import shlex
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ALLOWED_TARGET_PREFIXES = ("torch.", "torchvision.", "trainlab.")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("false", "default", "reduce-overhead", "max-autotune", "true")  # true: default
MONITORS = ("val/loss", "val/acc", "val/balanced_acc", "train/loss", "train/acc")
CYCLE_SCHEDULES = ("cosine_restarts", "cyclic")  # schedules whose lr runs in cycles: checkpoint.snapshots=cycles
AUGMENT_POLICIES = ("autoaugment", "randaugment", "trivialaugment")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
CONF_DIR = Path(__file__).resolve().parent / "conf"
# Arguments build_model passes to every model itself (not config keys)
_MODEL_ARGUMENTS = ("input_shape", "num_classes", "norm", "dropout")
# Groups whose keys are checked where they are read, against their own option (scheduler.parse, build_optimizer)
_CHECKED_ELSEWHERE = ("scheduler", "optimizer")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


def fresh_directory_problem(run_dir: Path, resume: str | None, dry_run: bool = False) -> str | None:
    """Why a new run (no checkpoint.resume), a dry run, or a resume of another directory's checkpoint may not start
    in `run_dir`: it already holds a run, whose metrics.csv and curves the new one would extend and whose checkpoints
    and record it would overwrite. A resume of the run's own checkpoints (auto, or a path in its checkpoints/) may."""
    own = resume == "auto" or (resume is not None and
                               Path(resume).expanduser().resolve().parent == (run_dir / "checkpoints").resolve())
    if resume is not None and not dry_run and own:
        return None
    found = [name for name in ("metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt")
             if (run_dir / name).is_file()]
    if not found:
        return None
    if resume is not None and not dry_run:
        return (f"{run_dir} already holds another run ({', '.join(found)}); resuming checkpoint.resume={resume} there "
                "would overwrite its checkpoints and metrics.csv: leave out hydra.run.dir (a new directory), or name "
                "another")
    fix = "" if dry_run else "continue it with checkpoint.resume=auto (a sweep: sweep.resume=true), or "
    return (f"{run_dir} already holds a run ({', '.join(found)}); {fix}start this "
            f"{'dry run' if dry_run else 'one'} in a new directory (leave out hydra.run.dir / hydra.sweep.dir, or "
            "name another)")


BALANCES = ("none", "oversample", "reweight")
IMBALANCE_PROFILES = ("exponential", "step")


def schema_defaults(schema: type) -> dict[str, Any]:
    """The plain default of each key of a schema dataclass: what a run had where its recorded config (a checkpoint's,
    from before the key existed) lacks the key. Required keys ('???') and interpolations ('${seed}') are left out."""
    defaults = {}
    for item in dataclasses.fields(schema):
        if item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
        elif item.default is not dataclasses.MISSING and not (isinstance(item.default, str) and
                                                                (item.default == "???" or "${" in item.default)):
            defaults[item.name] = item.default
    return defaults


def monitor_mode(monitor: str, mode: str) -> str:
    """min or max: the direction in which `monitor` improves (early_stopping.mode=auto: max for an accuracy)."""
    if mode != "auto":
        return mode
    return "max" if monitor.endswith("acc") else "min"


# --- schemas ---------------------------------------------------------------------------------------
# Each option file of these groups starts from its schema (`- /schema_<group>@_here_` in its defaults
# list), so a misspelt key or a value of the wrong type fails while Hydra composes, before any work.


@dataclass
class DataConfig:
    name: str = "???"
    batch_size: int = 64  # examples per optimizer step
    eval_batch_size: int = 1024  # examples per forward pass at validation and test time
    val_fraction: float = 0.1  # share of the training split held out for validation
    split_seed: int = "${seed}"  # type: ignore[assignment]  # seeds the validation split (and train_size's draw)
    # null: the whole training split; N: train on N of its examples, stratified by class, drawn by split_seed,
    # nested (N's examples lie inside a larger N's); validation and test unchanged. A count, never a share.
    train_size: Any = None
    # an imbalanced training split: the largest class's size over the smallest's (1 = as the data comes), drawn by
    # split_seed; validation and test unchanged. Its shape, imbalance_profile: exponential (long-tailed: class c of C
    # keeps ratio ** (-c / (C - 1)) of its examples, class 0 all, the last 1 / ratio) | step (the last
    # minority_fraction of the classes keep 1 / ratio of their examples, the others all)
    imbalance: float = 1.0
    imbalance_profile: str = "exponential"
    minority_fraction: float = 0.5  # step: the share of the classes that are rare (Buda et al.'s mu)
    # none | oversample: every epoch draws as many examples of each class (small classes repeat, each time with
    # its own augmentation; as many steps as an epoch of none) | reweight: the training loss weighs class c by
    # n / (classes * n_c)
    balance: str = "none"
    drop_last: bool = True  # drop the last, smaller training batch of each epoch
    # [[epoch, factor], ...]: from that (1-based) epoch on, the training batch size is multiplied by factor,
    # cumulatively; [] = off. "Don't decay the learning rate, increase the batch size" (Smith et al. 2018)
    batch_size_schedule: List[Any] = field(default_factory=list)
    # device: the whole dataset on the device as uint8, batches as index slices, batched augmentation;
    # dataloader: torch DataLoader workers with per-image torchvision v2 transforms, for data that does not fit;
    # auto: device when all splits as uint8 take at most device_max_gb
    loader: str = "auto"
    device_max_gb: float = 4.0  # GiB of uint8 images up to which loader=auto keeps the data on the device
    num_workers: int = 2  # DataLoader worker processes (loader=dataloader); 0 = in the main process


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    test_fraction: float = 0.2  # share of all 1797 images held out as the test split (fixed, not seeded)


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    num_samples: int = 4096  # images in train + validation + test
    shape: list = field(default_factory=lambda: [3, 32, 32])  # channels, height, width
    num_classes: int = 10
    noise: float = 48.0  # std of the per-pixel noise around each class prototype, in uint8 levels
    test_fraction: float = 0.2
    seed: int = 0  # seeds the images themselves (not the split)


@dataclass
class FileDataConfig(DataConfig):
    """A dataset with its own train/test files under data.root, in torchvision's layout."""

    root: str = "${oc.env:TRAINLAB_DATA,data}"  # the environment variable TRAINLAB_DATA, else data/ in the working dir
    download: bool = False  # true: download through torchvision when absent (needs internet)


@dataclass
class ImageFolderConfig(DataConfig):
    name: str = "image_folder"
    path: str = "???"  # a folder of class subfolders, or one with train/, test/ (and val/) folders of them
    image_size: int = 32  # pixels: every image is resized (bilinear) to image_size x image_size once, when decoded
    channels: int = 3  # 3 = RGB, 1 = greyscale
    test_fraction: float = 0.2  # share held out as the test split without a test/ folder (fixed, not seeded)
    root: str = "${oc.env:TRAINLAB_DATA,data}"
    cache_dir: Optional[str] = "${.root}/cache"  # decoded uint8 images, keyed by the folder's contents; null = off


@dataclass
class TrainerConfig:
    max_epochs: int = 30
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    compile: str = "false"  # false | default (or true) | reduce-overhead | max-autotune: torch.compile the model
    channels_last: str = "auto"  # auto (conv models) | true | false: NHWC memory format for the model
    tf32: bool = True  # CUDA: fp32 matmuls and convolutions on TF32 tensor cores
    threads: Optional[int] = None  # CPU threads for torch; null: every available core (OMP_NUM_THREADS if set)
    deterministic: bool = False  # PyTorch's deterministic algorithms (an op without one fails); cuDNN autotuning off
    on_nonfinite: str = "stop"  # NaN/inf loss or gradient norm: stop (status diverged) | skip the step
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: steps skipped in the whole run before it stops as diverged
    nonfinite_check: str = "auto"  # auto: interval (step with on_nonfinite=skip) | step: each step | interval


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    monitor: str = "val/loss"  # val/loss | val/acc | val/balanced_acc | train/loss | train/acc
    mode: str = "auto"  # auto: min for a loss, max for an accuracy | min: lower is better | max: higher is better
    patience: int = 10  # epochs without improvement before stopping
    min_delta: float = 0.0  # smallest change that counts as an improvement


@dataclass
class FinetuneConfig:
    # a trainlab checkpoint (best.pt, last.pt, swa.pt) or, with model=torchvision, torchvision's weights name
    # (DEFAULT, IMAGENET1K_V1, ...): the model starts from these weights; a tensor they do not fit (the classifier of
    # another class count) keeps its initialization. null: train from the initialization
    weights: Optional[str] = None
    freeze: bool = False  # train only the classifier (the last linear layer) and the layers the weights did not fit
    feature_lr_scale: float = 1.0  # the loaded feature extractor trains at optimizer.lr x this (e.g. 0.1)


@dataclass
class CheckpointConfig:
    resume: Optional[str] = None  # null: start fresh | auto: this run directory's last.pt, if any | PATH to a last.pt
    every_n_epochs: int = 1  # write checkpoints/last.pt every N epochs (and always after the last)
    every_n_steps: Optional[int] = None  # also write last.pt every N optimizer steps, mid-epoch; null: off
    # none | cycles: the weights at the end of each cycle of a cyclic lr schedule (cosine_restarts, cyclic), where
    # the lr is lowest, as checkpoints/snapshot_<epoch>.pt: a snapshot ensemble (`trainlab ensemble --checkpoint
    # snapshots`). Cycles must end at epoch ends
    snapshots: str = "none"


@dataclass
class LoggerConfig:
    every_n_steps: int = 50  # optimizer steps per train/loss point (one host sync each), and one at each epoch's end
    tensorboard: bool = True
    progress: str = "auto"  # auto: a live bar on a terminal, plain lines elsewhere | bar | lines
    grad_norm: bool = True  # train/grad_norm: the global gradient L2 norm at the last step of each interval
    # per-layer statistics of the first step of epoch 1 (the initialization) and of every N-th epoch (N, 2N, ...):
    # activation mean/std, dead ReLU fraction, gradient norm, update-to-weight ratio, first-layer filters; 0 = off
    layer_stats_every_n_epochs: int = 10
    histograms: bool = True  # with layer stats: histograms of weights, gradients and activations
    graph: bool = False  # the model graph (traced once at start; a warning when a model cannot be traced)


@dataclass
class AugmentationConfig:
    # Training images only, per image, in this order; 0 = off for every knob.
    crop_padding: int = 0  # pixels of padding before a random crop back to full size; 0 = off
    crop_padding_mode: str = "zeros"  # zeros | reflect
    translate: float = 0.0  # largest shift, as a fraction of the width (x) and height (y); zero fill
    rotate: float = 0.0  # largest rotation in degrees: angle uniform in [-rotate, rotate]; bilinear, zero fill
    scale: float = 0.0  # zoom about the centre by a factor uniform in [1 - scale, 1 + scale]; bilinear, zero fill
    shear: float = 0.0  # largest shear angle in degrees, along x only: uniform in [-shear, shear]; bilinear, zero fill
    perspective: float = 0.0  # distortion scale in [0, 1]: corners move inwards by up to this share of half the size
    perspective_p: float = 0.5  # probability that an image gets a perspective distortion (with perspective > 0)
    elastic_alpha: float = 0.0  # elastic field strength: pixels move by alpha / 2 times the smoothed noise in [-1, 1]
    elastic_sigma: float = 5.0  # std in pixels of the gaussian that smooths the elastic field (with elastic_alpha > 0)
    hflip: float = 0.0  # probability of flipping each training image left-right
    vflip: float = 0.0  # probability of flipping each training image upside down
    brightness: float = 0.0  # jitter strength s: factor uniform in [max(0, 1 - s), 1 + s]
    contrast: float = 0.0  # likewise, blending with the image's mean grey level
    saturation: float = 0.0  # likewise, blending with the image's grey version (3-channel images only)
    sharpness: float = 0.0  # jitter strength s: factor uniform in [max(0, 1 - s), 1 + s]; 0 smoothed, 2 sharpened
    # strength g < 1: out = W (x / W)^gamma, gamma uniform in [1 - g, 1 + g]; W the white, 255 (digits 16)
    gamma: float = 0.0
    invert: float = 0.0  # probability of inverting each training image: W - x (W: 255; the digits' 16)
    blur_sigma: float = 0.0  # largest gaussian blur std in pixels: sigma uniform in [0.1, blur_sigma]; 0 = off
    cutout_size: int = 0  # side in pixels of the one square zeroed per image (wholly inside it)
    coarse_salt_p: float = 0.0  # probability that a cell becomes salt (white) or pepper (0), 1/2 each; 0 = off
    # side in pixels of the square cells of coarse salt-and-pepper, from the top-left corner (border cells cut off);
    # a whole number >= 1 (typed Any so that 2.5 gets trainlab's message and exit 2, not Hydra's type error)
    coarse_salt_size: Any = 4
    noise_std: float = 0.0  # std of additive gaussian noise, in pixel levels (0-255 scale; digits are 0-16)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight per image; soft targets
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) sets the pasted box's area per image; soft targets
    policy: Optional[str] = None  # data.loader=dataloader only: autoaugment | randaugment | trivialaugment
    autoaugment_dataset: str = "cifar10"  # the dataset autoaugment's policy was searched on: cifar10 | imagenet | svhn
    randaugment_num_ops: int = 2  # transforms applied in sequence per image
    randaugment_magnitude: int = 9  # strength of each, 0 to 30


@dataclass
class RegularizationConfig:
    dropout: float = 0.0  # probability of zeroing a unit (channel, in conv blocks) during training
    weight_decay: float = 0.0  # decoupled decay (AdamW-style): w -= lr * weight_decay * w each step
    l2: float = 0.0  # penalty l2 / 2 * sum(w^2) added to the loss (coupled: adaptive optimizers rescale it)
    l1: float = 0.0  # penalty l1 * sum(|w|) added to the loss
    label_smoothing: float = 0.0  # training targets: (1 - eps) * one-hot + eps / classes
    grad_clip_norm: Optional[float] = None  # rescale the gradient when its global L2 norm exceeds this
    grad_clip_value: Optional[float] = None  # clamp each gradient element to [-value, value]
    ema_decay: Optional[float] = None  # per-step decay of the weight average (e.g. 0.999); evaluated and saved
    ema_warmup: bool = False  # true: the decay ramps up as min(ema_decay, (1 + n) / (10 + n)) after n updates
    swa_start: Optional[float] = None  # fraction of trainer.max_epochs after which SWA averages each epoch
    swa_lr: float = 0.01  # constant learning rate during the SWA epochs (absolute)


SCHEMAS = {
    "schema_data": DataConfig,
    "schema_data_digits": DigitsConfig,
    "schema_data_synthetic": SyntheticConfig,
    "schema_data_files": FileDataConfig,  # mnist, fashion_mnist, kmnist, cifar10, cifar100, svhn
    "schema_data_image_folder": ImageFolderConfig,
    "schema_trainer": TrainerConfig,
    "schema_early_stopping": EarlyStoppingConfig,
    "schema_checkpoint": CheckpointConfig,
    "schema_finetune": FinetuneConfig,
    "schema_logger": LoggerConfig,
    "schema_augmentation": AugmentationConfig,
    "schema_regularization": RegularizationConfig,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register trainlab's resolvers (idempotent)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)
    if not OmegaConf.has_resolver("trainlab.slug"):
        OmegaConf.register_new_resolver("trainlab.slug", slug)


HYDRA_SPECIAL = re.compile(r"[\s=,\[\]{}()'\"\\]")  # what Hydra's override grammar reads as structure, not text


def shell_override(key: str, value: Any) -> str:
    """`key=value` to paste into a shell: the value quoted for Hydra's override grammar when it holds characters the
    grammar gives meaning to (a default run directory's name has `=` and `,`: unquoted, Hydra refused the command
    a stopped run printed), then the whole for the shell."""
    text = str(value)
    if HYDRA_SPECIAL.search(text):
        text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return shlex.quote(f"{key}={text}")


def slug(overrides: str, limit: int = 120) -> str:
    """A run-directory suffix from Hydra's override_dirname: `_` + overrides, safe as one path part."""
    if not overrides:
        return ""
    text = re.sub(r"[^A-Za-z0-9=,.+\-_\[\]]", "_", overrides)
    return "_" + (text if len(text) <= limit else text[: limit - 3] + "...")


# --- validation ------------------------------------------------------------------------------------


def validate(cfg: DictConfig) -> None:
    """Fail before any data or model is built, reporting every problem found at once."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid config: an interpolation cannot be resolved: {error}") from None
    problems = []
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        problems.append("missing values (set them on the command line, e.g. key=value): " + ", ".join(missing))
    # Walk the resolved tree: a _target_ produced by an interpolation (oc.create, ...) is checked too.
    problems += [f"_target_ at {path}: {why}" for path, why in _bad_targets(resolved)]
    problems += _unknown_keys(cfg)
    if not missing:
        problems += _check_values(cfg)
        for group, node in resolved.items():
            problems += _argument_problems(group, node)
        from trainlab.schedules import parse as parse_schedule  # torch is imported only once needed

        try:
            parse_schedule(cfg.scheduler)
        except ConfigError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys that nothing reads: a misspelt key added with Hydra's `+` (`+trainer.max_epoch=3`, as Hydra's own error
    suggests for a key it does not know) would otherwise train with the default, silently."""
    problems = []
    for name in cfg:
        if name == "hydra":
            continue
        if name not in _root_keys():
            problems.append(_unknown(str(name), _root_keys()))
            continue
        node = cfg[name]
        known = _known_keys(str(name), node)
        if known is None:
            continue
        unknown = [key for key in node if key not in known]
        if unknown and _renamed_option(str(name), node):
            chosen = node["name"]
            problems.append(f"{name}.name={chosen}: an option of {name} is chosen as {name}={chosen} (the config "
                            f"group, which brings that option's keys); {name}.name= renames the option composed and "
                            f"keeps its keys ({', '.join(f'{name}.{k}' for k in unknown)}). Write {name}={chosen}")
            continue
        problems += [_unknown(f"{name}.{key}", [f"{name}.{k}" for k in known]) for key in unknown]
    return problems


def _renamed_option(group: str, node: Any) -> bool:
    """Whether `group.name=` was set to another option file's name: the node holds exactly the keys of another option
    file of the group (the one composed), some of which the named option does not know."""
    name = node.get("name") if OmegaConf.is_dict(node) else None
    options = _option_files(group)
    if not isinstance(name, str) or name not in options:
        return False
    return any(keys == set(node) for option, keys in options.items() if option != name)  # the composed one's


def _unknown(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key}: no such key; {hint}valid here: {', '.join(sorted(known))}"


@functools.cache
def _root_keys() -> tuple[str, ...]:
    """The groups of train.yaml's defaults list and its own keys (seed, dry_run)."""
    primary = OmegaConf.load(CONF_DIR / "train.yaml")
    groups = [str(next(iter(entry))) if OmegaConf.is_dict(entry) else str(entry) for entry in primary.defaults]
    return tuple(g for g in groups if g != "_self_") + tuple(k for k in primary if k not in ("defaults", "hydra"))


def _known_keys(group: str, node: Any) -> tuple[str, ...] | None:
    """The keys `group` may hold: its schema's fields, its `_target_`'s arguments, or its chosen option file's keys;
    None when they cannot be known (a target taking **kwargs)."""
    if group in _CHECKED_ELSEWHERE or not OmegaConf.is_dict(node):
        return None
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        return tuple(f.name for f in dataclasses.fields(schema))
    if "_target_" in node:
        if check_target(node["_target_"]) is not None:
            return None
        from hydra._internal.utils import _locate

        try:
            parameters = inspect.signature(_locate(node["_target_"])).parameters.values()
        except (TypeError, ValueError, ImportError):
            return None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return ("_target_", "_partial_", *(p.name for p in parameters if p.name not in ("self", *_MODEL_ARGUMENTS)))
    return _option_keys(group, str(node.get("name", "")))


def _option_keys(group: str, name: str) -> tuple[str, ...] | None:
    """The keys of conf/<group>/<name>.yaml, or of every option of the group when no file has that name."""
    options = _option_files(group)
    keys = options[name] if name in options else {key for keys in options.values() for key in keys}
    return tuple(keys) if keys else None


@functools.cache
def _option_files(group: str) -> dict[str, frozenset[str]]:
    """The keys (less `defaults`) of each option file conf/<group>/<option>.yaml, by option name."""
    return {path.stem: frozenset(key for key in OmegaConf.load(path) if key != "defaults")
            for path in sorted((CONF_DIR / group).glob("*.yaml"))}


def check_target(target: Any) -> str | None:
    """Why `target` may not be built from a config, or None when it may.

    The name must start with an allowed package and must also resolve to an object defined there:
    `torch.os.system` starts with `torch.` but is `os.system`.
    """
    allowed = ", ".join(ALLOWED_TARGET_PREFIXES)
    if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
        return f"{target!r} is not allowed; only objects under {allowed} may be built from a config"
    from hydra._internal.utils import _locate

    try:
        obj = _locate(target)
    except ImportError as error:
        return f"{target!r} cannot be found ({str(error).splitlines()[0]})"
    home = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    if not isinstance(home, str) or not (home + ".").startswith(ALLOWED_TARGET_PREFIXES):
        return f"{target!r} is {home}.{getattr(obj, '__qualname__', '')}, which is outside {allowed}; not allowed"
    return None


def _bad_targets(node: Any, path: str = "") -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and value != "???":
                why = check_target(value)
                if why:
                    found.append((path or "<root>", why))
            else:
                found += _bad_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _bad_targets(item, f"{path}[{i}]")
    return found


def _argument_problems(group: str, node: Any) -> list[str]:
    """Keys of a group built from `_target_` (optimizer, model) whose values cannot be the arguments they name,
    judged by the defaults of the target's signature: a number where the default is a number, true or false where
    it is a bool, a list of as many numbers where it is a tuple of numbers (Adam's betas). Otherwise a wrong type
    surfaces as the target's own error from deep inside torch, which names neither the key nor the fix."""
    if not isinstance(node, dict) or check_target(node.get("_target_")) is not None:
        return []
    from hydra._internal.utils import _locate

    try:
        parameters = inspect.signature(_locate(node["_target_"])).parameters
    except (TypeError, ValueError, ImportError):
        return []
    problems = []
    for key, value in node.items():
        if key in parameters and value is not None:
            wanted = _wanted_kind(parameters[key].default, value)
            if wanted is not None:
                problems.append(f"{group}.{key}={value!r}: must be {wanted}")
    return problems


def is_number(value: Any) -> bool:
    """A real number: an int or a float, not a bool (YAML's true is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wanted_kind(default: Any, value: Any) -> str | None:
    """What `value` should be, given the parameter's default, or None when it fits (or the default says nothing)."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if is_number(default):
        return None if is_number(value) else "a number"
    if isinstance(default, tuple) and default and all(map(is_number, default)):
        fits = isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(is_number, value))
        return None if fits else f"a list of {len(default)} numbers, e.g. {list(default)}"
    return None


def _check_values(cfg: DictConfig) -> list[str]:
    problems = []

    def check(ok: bool, key: str, value: Any, fix: str) -> None:
        if not ok:
            problems.append(f"{key}={value!r}: {fix}")

    data, trainer, stop = cfg.data, cfg.trainer, cfg.early_stopping
    # numpy's range, which the streams derived from these stay within (seed=2**63 failed in torch.manual_seed, exit 1);
    # data.split_seed takes any whole number
    for key in ("seed", "data.seed"):
        seed = OmegaConf.select(cfg, key)
        check(seed is None or 0 <= seed < 2**32, key, seed, "a seed is a whole number from 0 to 2**32 - 1 (4294967295)")
    check(data.batch_size >= 1, "data.batch_size", data.batch_size, "must be at least 1")
    check(data.eval_batch_size >= 1, "data.eval_batch_size", data.eval_batch_size, "must be at least 1")
    schedule = data.batch_size_schedule
    if len(schedule) > 0:
        pairs = OmegaConf.to_container(schedule)
        check(all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and p[0] >= 1
                  and isinstance(p[1], (int, float)) and p[1] > 0 for p in pairs), "data.batch_size_schedule",
              pairs, "give [[epoch, factor], ...] with epochs >= 1 and factors > 0, e.g. [[10,2],[20,2]]")
        check(cfg.scheduler.name in ("none", "plateau"), "data.batch_size_schedule", pairs,
              f"replaces a decaying learning rate, and scheduler={cfg.scheduler.name} counts steps of a fixed "
              "batch size; use scheduler=none (warmup allowed) or scheduler=plateau with it")
    check(0.0 < data.val_fraction < 1.0, "data.val_fraction", data.val_fraction, "must be between 0 and 1")
    size = data.get("train_size")
    check(size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1), "data.train_size",
          size, "give a number of training examples, a whole number of at least 1 (e.g. 200), or null for the whole "
          "training split" + (f"; write it as a whole number: data.train_size={int(size)}"
                              if isinstance(size, float) and size.is_integer() else
                              "; a share is not taken: multiply it by the training split's size (the `train` count "
                              "of a run's `data:` line)" if isinstance(size, float) else ""))
    imbalance = data.get("imbalance", 1.0)
    check(is_number(imbalance) and math.isfinite(imbalance) and imbalance >= 1, "data.imbalance", imbalance,
          "the largest class's size over the smallest's, a finite number of at least 1 (e.g. 10 or 100; 1 = the data "
          "as it comes)")
    profile = data.get("imbalance_profile", "exponential")
    check(profile in IMBALANCE_PROFILES, "data.imbalance_profile", profile,
          f"choose one of {', '.join(IMBALANCE_PROFILES)}")
    minority = data.get("minority_fraction", 0.5)
    check(is_number(minority) and 0 < minority < 1, "data.minority_fraction", minority,
          "the share of the classes that are rare, between 0 and 1 (e.g. 0.5: half of them)")
    check(minority == 0.5 or profile == "step", "data.minority_fraction", minority,
          f"only data.imbalance_profile=step reads it (here: {profile}); add data.imbalance_profile=step, or leave "
          "it out")
    check(data.get("balance", "none") in BALANCES, "data.balance", data.get("balance"),
          f"choose one of {', '.join(BALANCES)}")
    if "test_fraction" in data:
        check(0.0 < data.test_fraction < 1.0, "data.test_fraction", data.test_fraction, "must be between 0 and 1")
    check(data.loader in ("auto", "device", "dataloader"), "data.loader", data.loader,
          "choose auto, device or dataloader")
    check(data.device_max_gb > 0, "data.device_max_gb", data.device_max_gb, "must be > 0 GiB")
    check(data.num_workers >= 0, "data.num_workers", data.num_workers, "must be >= 0 (0: load in the main process)")
    if "image_size" in data:
        check(data.image_size >= 1, "data.image_size", data.image_size, "must be at least 1 pixel, e.g. 32")
        check(data.channels in (1, 3), "data.channels", data.channels, "choose 3 (RGB) or 1 (greyscale)")
    check(trainer.max_epochs >= 1, "trainer.max_epochs", trainer.max_epochs, "must be at least 1")
    check(bool(DEVICE_PATTERN.match(trainer.device)), "trainer.device", trainer.device,
          "choose auto, cpu, cuda, cuda:N or mps")
    check(trainer.precision in PRECISIONS, "trainer.precision", trainer.precision,
          f"choose one of {', '.join(PRECISIONS)}")
    check(str(trainer.compile).lower() in COMPILE_MODES, "trainer.compile", trainer.compile,
          f"choose one of {', '.join(COMPILE_MODES[:-1])} (true is default)")
    check(str(trainer.channels_last).lower() in ("auto", "true", "false"), "trainer.channels_last",
          trainer.channels_last, "choose auto, true or false")
    check(trainer.threads is None or trainer.threads >= 1, "trainer.threads", trainer.threads,
          "must be at least 1, or null for every available core")
    check(stop.monitor in MONITORS, "early_stopping.monitor", stop.monitor, f"choose one of {', '.join(MONITORS)}")
    check(stop.mode in ("auto", "min", "max"), "early_stopping.mode", stop.mode, "choose auto, min or max")
    natural = monitor_mode(str(stop.monitor), "auto")
    check(stop.mode in ("auto", natural) or stop.monitor not in MONITORS, "early_stopping.mode", stop.mode,
          f"early_stopping.monitor={stop.monitor} improves when it gets {'higher' if natural == 'max' else 'lower'}, "
          f"so mode={stop.mode} would keep its worst epoch; use mode={natural} or mode=auto")
    check(stop.patience >= 1, "early_stopping.patience", stop.patience, "must be at least 1 epoch")
    check(math.isfinite(stop.min_delta) and stop.min_delta >= 0, "early_stopping.min_delta", stop.min_delta,
          "must be a finite number >= 0 (0: any improvement counts)")
    check(not (str(stop.monitor).endswith("acc") and 1 <= stop.min_delta < math.inf), "early_stopping.min_delta",
          stop.min_delta, f"{stop.monitor} is a fraction in [0, 1], so no epoch can improve on the first by 1 or more: "
          "best.pt would keep epoch 1's weights; give a fraction, e.g. 0.005 for half a percentage point")
    plateau = cfg.scheduler
    if plateau.get("name") == "plateau" and stop.enabled and isinstance(plateau.get("patience"), int):
        # plateau counts epochs without improvement by early stopping's rule (min_delta 0 or the same): its count
        # never runs ahead of early stopping's, so a patience as long stops the run before the lr ever drops
        check(plateau.patience < stop.patience or plateau.get("min_delta", 0.0) not in (0, stop.min_delta),
              "scheduler.patience", plateau.patience, f"early stopping (early_stopping.patience={stop.patience}) "
              "ends the run by the epoch plateau would first lower the lr, so it never trains at a lower one; give "
              "scheduler.patience below early_stopping.patience (e.g. 3), raise early_stopping.patience, or "
              "early_stopping.enabled=false")
    check(cfg.checkpoint.every_n_epochs >= 1, "checkpoint.every_n_epochs", cfg.checkpoint.every_n_epochs,
          "must be at least 1")
    check(cfg.checkpoint.every_n_steps is None or cfg.checkpoint.every_n_steps >= 1, "checkpoint.every_n_steps",
          cfg.checkpoint.every_n_steps, "must be at least 1, or null for epoch checkpoints only")
    check(cfg.checkpoint.resume is None or cfg.checkpoint.resume.strip() != "", "checkpoint.resume",
          cfg.checkpoint.resume, "give null, auto, or the path of a last.pt")
    snapshots = cfg.checkpoint.snapshots
    check(snapshots in ("none", "cycles"), "checkpoint.snapshots", snapshots, "choose none or cycles")
    check(snapshots != "cycles" or cfg.scheduler.name in CYCLE_SCHEDULES, "checkpoint.snapshots", snapshots,
          f"takes a snapshot at the end of each learning-rate cycle, and scheduler={cfg.scheduler.name} has no "
          f"cycles; use scheduler={' or scheduler='.join(CYCLE_SCHEDULES)}, or checkpoint.snapshots=none")
    check(snapshots != "cycles" or cfg.regularization.swa_start is None, "checkpoint.snapshots", snapshots,
          "SWA (regularization.swa_start) replaces the schedule's cycles with a constant lr; average the weights "
          "(swa) or the cycle ends' predictions (snapshots), not both")
    check(trainer.on_nonfinite in ("stop", "skip"), "trainer.on_nonfinite", trainer.on_nonfinite, "choose stop or skip")
    check(trainer.max_nonfinite_skips >= 0, "trainer.max_nonfinite_skips", trainer.max_nonfinite_skips,
          "must be >= 0")
    check(trainer.nonfinite_check in ("auto", "step", "interval"), "trainer.nonfinite_check",
          trainer.nonfinite_check, "choose auto, step or interval")
    check(not (trainer.on_nonfinite == "skip" and trainer.nonfinite_check == "interval"), "trainer.nonfinite_check",
          trainer.nonfinite_check, "on_nonfinite=skip skips a step before its update, which needs each step's "
          "verdict; use nonfinite_check=step or auto with it")
    check(cfg.logger.every_n_steps >= 1, "logger.every_n_steps", cfg.logger.every_n_steps, "must be at least 1")
    check(cfg.logger.progress in ("auto", "bar", "lines"), "logger.progress", cfg.logger.progress,
          "choose auto, bar or lines")
    check(cfg.logger.layer_stats_every_n_epochs >= 0, "logger.layer_stats_every_n_epochs",
          cfg.logger.layer_stats_every_n_epochs, "must be >= 0 epochs (0 = off)")
    check(0.0 <= cfg.regularization.dropout < 1.0, "regularization.dropout", cfg.regularization.dropout,
          "must be in [0, 1)")
    reg = cfg.regularization
    for key in ("weight_decay", "l1", "l2"):
        check(math.isfinite(reg[key]) and reg[key] >= 0, f"regularization.{key}", reg[key],
              "must be a finite number >= 0 (0 = off)")
    # decoupled decay multiplies the weights by 1 - lr * weight_decay before each update: at 1 or more every step
    # erases them (or flips their sign), and such a run "completed" at chance accuracy
    rates = {"optimizer.lr": cfg.optimizer.get("lr")}
    if reg.swa_start is not None:
        rates["regularization.swa_lr"] = reg.swa_lr
    # so does the coupled l2 penalty under SGD, whose gradient l2 * w enters the update as w -= lr * l2 * w (at the
    # first step whatever the momentum); adaptive optimizers rescale it per weight, so no such bound holds for them
    shrinks = {"weight_decay": "decoupled decay multiplies the weights by 1 - lr * weight_decay every step"}
    if str(cfg.optimizer.get("_target_")) == "torch.optim.SGD":
        shrinks["l2"] = "under SGD the penalty's gradient l2 * w multiplies the weights by 1 - lr * l2 every step"
    for name, rate in rates.items():
        for key, why in shrinks.items():
            if is_number(rate) and 0 < rate < math.inf and math.isfinite(reg[key]):
                check(rate * reg[key] < 1, f"regularization.{key}", reg[key],
                      f"{why}, and with {name}={rate:g} that is {1 - rate * reg[key]:g}: each step would erase them "
                      f"or flip their sign; give regularization.{key} below 1 / {name} = {1 / rate:g} (5e-4 is usual)")
    check(0.0 <= reg.label_smoothing < 1.0, "regularization.label_smoothing", reg.label_smoothing,
          "must be in [0, 1)")
    for key in ("grad_clip_norm", "grad_clip_value"):
        check(reg[key] is None or 0 < reg[key] < math.inf, f"regularization.{key}", reg[key],
              "must be a finite number > 0, or null for off")
    check(reg.ema_decay is None or 0.0 < reg.ema_decay < 1.0, "regularization.ema_decay", reg.ema_decay,
          "must be in (0, 1), e.g. 0.999, or null for off")
    check(reg.swa_start is None or 0.0 <= reg.swa_start < 1.0, "regularization.swa_start", reg.swa_start,
          "is a fraction of the run in [0, 1), or null for off")
    check(0 < reg.swa_lr < math.inf, "regularization.swa_lr", reg.swa_lr, "must be a finite number > 0")
    check(not reg.ema_warmup or reg.ema_decay is not None, "regularization.ema_warmup", reg.ema_warmup,
          "ramps the decay of an EMA, and regularization.ema_decay is null (no EMA); set it (e.g. 0.999) or use "
          "regularization=ema")
    check(reg.swa_start is not None or reg.swa_lr == RegularizationConfig.swa_lr, "regularization.swa_lr",
          reg.swa_lr, "is the lr of the SWA epochs, and regularization.swa_start is null (no SWA); set it (e.g. "
          "0.75) or use regularization=swa")
    norm, init = cfg.normalization, cfg.initialization
    if "eps" in norm:
        check(is_number(norm.eps) and norm.eps > 0, "normalization.eps", norm.eps, "must be a number > 0, e.g. 1e-5")
    if "momentum" in norm:
        momentum = norm.momentum
        check(momentum is None or (is_number(momentum) and 0 < momentum <= 1), "normalization.momentum", momentum,
              "is the weight of each new batch in the running statistics, in (0, 1] (null: an "
              "equal-weight average of all batches); 0 would keep them at mean 0, variance 1, and every evaluation "
              "would normalise with those")
    if "num_groups" in norm:
        check(isinstance(norm.num_groups, int) and not isinstance(norm.num_groups, bool) and norm.num_groups >= 1,
              "normalization.num_groups", norm.num_groups, "must be a whole number >= 1 that divides every layer width")
    if "std" in init:
        check(is_number(init.std) and init.std > 0, "initialization.std", init.std, "must be a number > 0")
    if "value" in init:
        check(is_number(init.value), "initialization.value", init.value, "must be a number")
    aug = cfg.augmentation
    for key, value in aug.items():  # inf passed the range checks below, then gave NaN losses or an OverflowError
        check(not isinstance(value, float) or math.isfinite(value), f"augmentation.{key}", value,
              "must be a finite number")
    check(0.0 <= aug.hflip <= 1.0, "augmentation.hflip", aug.hflip, "is a probability in [0, 1]")
    check(aug.crop_padding >= 0, "augmentation.crop_padding", aug.crop_padding, "must be >= 0 pixels")
    check(aug.crop_padding_mode in ("zeros", "reflect"), "augmentation.crop_padding_mode",
          aug.crop_padding_mode, "choose zeros or reflect")
    check(0.0 <= aug.vflip <= 1.0, "augmentation.vflip", aug.vflip, "is a probability in [0, 1]")
    check(0.0 <= aug.translate < 1.0, "augmentation.translate", aug.translate,
          "is a fraction of the image size in [0, 1), e.g. 0.125")
    check(0.0 <= aug.rotate <= 180.0, "augmentation.rotate", aug.rotate, "is in degrees, 0 to 180")
    check(0.0 <= aug.scale < 1.0, "augmentation.scale", aug.scale,
          "is the largest zoom change, in [0, 1): the factor is uniform in [1 - scale, 1 + scale]")
    check(0.0 <= aug.shear < 90.0, "augmentation.shear", aug.shear, "is in degrees, 0 to below 90")
    for key in ("perspective", "perspective_p"):
        check(0.0 <= aug[key] <= 1.0, f"augmentation.{key}", aug[key], "must be in [0, 1]")
    check(aug.elastic_alpha >= 0, "augmentation.elastic_alpha", aug.elastic_alpha, "must be >= 0 (0 = off)")
    check(aug.elastic_sigma > 0, "augmentation.elastic_sigma", aug.elastic_sigma,
          "is the smoothing std in pixels and must be > 0, e.g. 5")
    check(aug.blur_sigma == 0 or aug.blur_sigma >= 0.1, "augmentation.blur_sigma", aug.blur_sigma,
          "must be 0 (off) or at least 0.1: the blur's sigma is uniform in [0.1, blur_sigma] pixels")
    check(aug.sharpness >= 0, "augmentation.sharpness", aug.sharpness, "must be >= 0 (0 = off)")
    check(0.0 <= aug.gamma < 1.0, "augmentation.gamma", aug.gamma,
          "is the largest change of the exponent, in [0, 1): gamma is uniform in [1 - gamma, 1 + gamma]")
    check(0.0 <= aug.invert <= 1.0, "augmentation.invert", aug.invert, "is a probability in [0, 1]")
    for key in ("brightness", "contrast", "saturation", "noise_std", "mixup_alpha", "cutmix_alpha"):
        check(aug[key] >= 0, f"augmentation.{key}", aug[key], "must be >= 0 (0 = off)")
    check(aug.cutout_size >= 0, "augmentation.cutout_size", aug.cutout_size, "must be >= 0 pixels (0 = off)")
    check(is_number(aug.coarse_salt_p) and 0.0 <= aug.coarse_salt_p <= 1.0, "augmentation.coarse_salt_p",
          aug.coarse_salt_p, "is the probability that a cell is replaced, in [0, 1] (0 = off), e.g. 0.1")
    salt_size = aug.coarse_salt_size
    check(isinstance(salt_size, int) and not isinstance(salt_size, bool) and salt_size >= 1,
          "augmentation.coarse_salt_size", salt_size, "is the side of a cell in pixels, a whole number >= 1, e.g. 4"
          + (f"; write it as augmentation.coarse_salt_size={int(salt_size)}"
             if isinstance(salt_size, float) and salt_size.is_integer() and salt_size >= 1 else ""))
    check(aug.policy is None or aug.policy in AUGMENT_POLICIES, "augmentation.policy", aug.policy,
          f"choose one of {', '.join(AUGMENT_POLICIES)}, or null")
    check(aug.policy is None or data.get("loader") == "dataloader", "augmentation.policy", aug.policy,
          "runs only on the DataLoader path (torchvision's per-image policies); set data.loader=dataloader")
    check(aug.autoaugment_dataset in ("cifar10", "imagenet", "svhn"), "augmentation.autoaugment_dataset",
          aug.autoaugment_dataset, "choose cifar10, imagenet or svhn")
    check(aug.randaugment_num_ops >= 1, "augmentation.randaugment_num_ops", aug.randaugment_num_ops,
          "must be at least 1")
    check(0 <= aug.randaugment_magnitude <= 30, "augmentation.randaugment_magnitude", aug.randaugment_magnitude,
          "must be in [0, 30]")
    return problems
