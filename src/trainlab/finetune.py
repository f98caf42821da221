"""Transfer learning (cfg.finetune): start from trained weights, a trainlab checkpoint or torchvision's, with a new
classifier for the data's classes; keep the loaded feature extractor frozen, or train it at a lower rate.

The classifier is the model's last linear layer. "Features" are the loaded tensors outside it: a layer the weights
do not fit (a new classifier, a CIFAR stem in place of ImageNet's) keeps its initialization and trains at
optimizer.lr like the classifier. Without weights, freeze and feature_lr_scale act on every layer but the classifier
(the random-features baseline).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from trainlab.config import ConfigError

log = logging.getLogger("trainlab")


class _Frozen:
    """A batch norm of a frozen feature extractor: always in eval mode, so it normalises with the loaded running
    statistics and never updates them (model.train() reaches it and is ignored)."""

    def train(self, mode: bool = True) -> nn.Module:
        return super().train(False)  # type: ignore[misc]


_FROZEN_TYPES: dict[type, type] = {}


def frozen_type(cls: type) -> type:
    """`cls` (a batch-norm class) with _Frozen's train(), made once per class."""
    if cls not in _FROZEN_TYPES:
        _FROZEN_TYPES[cls] = type(f"Frozen{cls.__name__}", (_Frozen, cls), {})
    return _FROZEN_TYPES[cls]


def classifier(model: nn.Module) -> nn.Linear | None:
    """The model's last linear layer (MLP, CNN and torchvision classifiers all end in one)."""
    return next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)


@dataclass
class Transfer:
    """What finetune did to a model: the names of its feature tensors (loaded, outside the classifier), and the
    parameters among them that train at optimizer.lr x feature_lr_scale (none when frozen or at scale 1)."""

    features: list[str] = field(default_factory=list)
    scaled: list[nn.Parameter] = field(default_factory=list)


def prepare(model: nn.Module, cfg: DictConfig, model_name: str | None = None,
            recorded: list[str] | None = None) -> Transfer:
    """Load cfg.weights into `model`, and freeze what cfg.freeze asks or pick the features cfg.feature_lr_scale
    slows. `recorded`: the feature names a resumed checkpoint saved; the weights file is then not read (last.pt
    holds the weights, and the file may be gone)."""
    scale, freeze = float(cfg.feature_lr_scale), bool(cfg.freeze)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"finetune.feature_lr_scale={cfg.feature_lr_scale}: must be a number > 0 (to keep the "
                          "features as loaded, use finetune=frozen)")
    if cfg.weights is None and not freeze and scale == 1.0:
        return Transfer()
    head = classifier(model)
    if head is None:
        raise ConfigError("finetune: the model has no linear layer to use as the classifier; finetune needs one")
    head_names = {f"{name}.{p}" for name, module in model.named_modules() if module is head
                  for p, _ in module.named_parameters(recurse=False)}
    if recorded is not None:
        features = set(recorded)
    else:
        loaded = load_weights(model, str(cfg.weights), model_name, head_names) if cfg.weights is not None else None
        if loaded is None:
            log.warning("finetune: no finetune.weights, so the feature extractor is the initialization "
                        f"({'frozen: a random-features baseline' if freeze else f'at lr x {scale:g}'})")
        features = {name for name, _ in model.named_parameters()
                    if name not in head_names and (loaded is None or name in loaded)}
    transfer = Transfer(features=sorted(features))
    if not freeze:
        transfer.scaled = [p for name, p in model.named_parameters() if name in features] if scale != 1.0 else []
        return transfer
    for name, parameter in model.named_parameters():
        if name in features:
            parameter.requires_grad_(False)
    frozen = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in features:
            module.__class__ = frozen_type(type(module))
            module.eval()
            frozen += 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"finetune: feature extractor frozen ({len(features)} tensors, {frozen} batch norms in eval mode); "
             f"{trainable:,} parameters train")
    return transfer


def frozen_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _Frozen)]


def load_weights(model: nn.Module, weights: str, model_name: str | None, head: set[str]) -> set[str]:
    """Copy the tensors of `weights` into `model`; returns the names of the parameters and buffers loaded.

    The weights must be of the same architecture: the same tensor names, and the same shapes except in the
    classifier (`head`: another class count) and the first layer (other input channels or a new stem), which
    keep the model's initialization. A first conv of three input channels loaded into one of a single channel is
    summed over the colours instead (the response to a grey image stays the same). A batch norm right after a
    first layer that was not loaded keeps its initialization too (its statistics were those of the old layer)."""
    source, where, trained = _source(weights, model_name)
    own = model.state_dict()
    prefix = "net." if model_name is not None and not any(k.startswith("net.") for k in source) else ""
    source = {prefix + k: v for k, v in source.items()}
    resampled = _fit_position_embedding(model, source)
    counters = {k for k in (*own, *source) if k.endswith("num_batches_tracked")}
    absent = [k for k in own if k not in source and k not in counters]
    extra = [k for k in source if k not in own and k not in counters]
    first = _first_layer(model)
    reshaped = [f"{k} ({list(source[k].shape)} in the weights, {list(v.shape)} here)" for k, v in own.items()
                if k in source and source[k].shape != v.shape and k not in head and k not in first]
    if absent or extra or reshaped:
        parts = [f"{what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}" for what, keys in
                 (("missing", absent), ("not in this model", extra), ("other shapes", reshaped)) if keys]
        raise ConfigError(f"finetune.weights={weights} is not of this model's architecture ({'; '.join(parts)}); "
                          "give weights of the same model, normalization and widths (only the classifier and the "
                          "first layer may differ)" + (f", or train with the options of the weights' run: {trained}"
                                                       if trained else ""))
    loaded, kept, skipped = set(), [], set()
    if not all(source[k].shape == own[k].shape or _grey_first_conv(source[k], own[k]) for k in first):
        # the first layer keeps its initialization: so does the batch norm after it (its statistics were the old one's)
        norm = next((n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
        if norm is not None:
            skipped = {k for k in own if k.startswith(f"{norm}.")}
            kept.append(f"{norm} (the batch norm after the new first layer)")
    with torch.no_grad():
        for name, tensor in own.items():
            value = source[name] if name in source and name not in skipped else None
            if value is None:
                continue
            if value.shape != tensor.shape and _grey_first_conv(value, tensor):
                value = value.sum(dim=1, keepdim=True)
            if value.shape == tensor.shape:
                tensor.copy_(value)
                if name not in counters:
                    loaded.add(name)
            else:
                kept.append(f"{name} ({list(value.shape)} in the weights, {list(tensor.shape)} here)")
    notes = [resampled] if resampled else []
    notes += [f"kept the initialization of {', '.join(kept)}"] if kept else []
    log.info(f"finetune: loaded {len(loaded)} of {len(own) - len(counters & set(own))} tensors from {where}"
             + "".join(f"; {note}" for note in notes))
    return loaded


def _fit_position_embedding(model: nn.Module, source: dict[str, torch.Tensor]) -> str | None:
    """A torchvision ViT's position embedding in `source` made for another image size, resampled in place to this
    model's grid of patches: bicubic over the grid, the class token's kept (torchvision's interpolate_embeddings, as
    timm does when it loads weights at another resolution). Returns what was done, for the log, or None.

    ImageNet's ViT weights are for 224-px images (14x14 patches of 16 px); without this, a run on 32-px images
    (2x2 patches) could not load them at all."""
    from torchvision.models import VisionTransformer
    from torchvision.models.vision_transformer import interpolate_embeddings

    net, key = getattr(model, "net", None), "net.encoder.pos_embedding"
    if not isinstance(net, VisionTransformer) or key not in source:
        return None
    old, new = source[key].shape, net.encoder.pos_embedding.shape
    grid = math.isqrt(old[1] - 1) if len(old) == 3 and old[1] > 1 else 0
    if old == new or len(old) != 3 or old[0] != 1 or old[2] != new[2] or grid * grid != old[1] - 1:
        return None  # the same grid, or another architecture (reported as such)
    state = interpolate_embeddings(net.image_size, net.patch_size, {"encoder.pos_embedding": source[key].float()})
    source[key] = state["encoder.pos_embedding"].to(source[key].dtype)
    side = net.image_size // net.patch_size
    return (f"resampled the position embedding from {grid}x{grid} patches ({grid * net.patch_size}-px images) to "
            f"{side}x{side} ({net.image_size}-px)")


def _first_layer(model: nn.Module) -> set[str]:
    """The state-dict names of the model's first layer with weights (a conv or linear)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return {f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return set()


def _grey_first_conv(value: torch.Tensor, tensor: torch.Tensor) -> bool:
    return value.ndim == 4 and value.shape[1] == 3 and tensor.shape[1] == 1 and (
        value.shape[0], *value.shape[2:]) == (tensor.shape[0], *tensor.shape[2:])


def _source(weights: str, model_name: str | None) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict, description, the model and normalization options of the run that saved it: '' for torchvision's)
    of a trainlab checkpoint file or, for model=torchvision, torchvision's weights."""
    from trainlab import checkpoint

    path = Path(weights).expanduser()
    if path.is_file() or path.suffix in (".pt", ".pth") or "/" in weights:
        if not path.is_file():
            raise ConfigError(f"finetune.weights={weights}: {'is a directory' if path.is_dir() else 'no such file'}; "
                              "give the path of a trainlab checkpoint (best.pt, last.pt, swa.pt) of the run to start "
                              "from (quote a path with = or , in it: 'finetune.weights=\"<path>\"')")
        state = checkpoint.load(path)
        if "model" not in state:
            raise ConfigError(f"finetune.weights={weights}: holds no model weights")
        trained = " ".join(checkpoint.saved_options(state.get("config"), group) for group in ("model", "normalization"))
        trained = trained.replace("normalization.name=", "normalization=")  # the option, not a key of the default's
        return state["model"], str(path), trained if "cannot be read" not in trained else ""
    if model_name is None:
        raise ConfigError(f"finetune.weights={weights}: no such file; give the path of a trainlab checkpoint "
                          "(best.pt, last.pt, swa.pt), or use a torchvision weights name with model=torchvision")
    return (*_torchvision_weights(weights, model_name), "")


def _torchvision_weights(weights: str, model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's pretrained weights `weights` (DEFAULT, IMAGENET1K_V1, ...) of `model_name`: from torch's hub
    cache ($TORCH_HOME/hub/checkpoints), downloaded there first when absent (a temporary file, renamed when whole)."""
    import torchvision
    from urllib.error import URLError

    try:
        choices = torchvision.models.get_model_weights(model_name)
    except (ValueError, KeyError):
        raise ConfigError(f"finetune.weights={weights}: torchvision has no pretrained weights for "
                          f"model.name={model_name}") from None
    names = ["DEFAULT", *(w.name for w in choices)]
    if weights not in names:
        raise ConfigError(f"finetune.weights={weights}: not a file, nor weights of {model_name}; choose one of "
                          f"{', '.join(names)}, or give the path of a trainlab checkpoint")
    chosen = choices[weights] if weights != "DEFAULT" else choices.DEFAULT
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
    try:
        state = torch.hub.load_state_dict_from_url(chosen.url, progress=False, map_location="cpu", weights_only=True)
    except (URLError, OSError) as error:
        raise ConfigError(f"finetune.weights={weights}: {model_name}'s {chosen.name} weights are not in {file.parent} "
                          f"and cannot be downloaded ({error}); download {chosen.url} elsewhere and copy it to {file}"
                          ) from None
    # googlenet's and inception_v3's auxiliary classifiers (aux1, aux2, AuxLogits): torchvision's own builder drops
    # them after loading unless aux_logits=True, and trainlab builds these models without them
    aux = {k for k in state if k.partition(".")[0] in ("aux1", "aux2", "AuxLogits")}
    state = {k: v for k, v in state.items() if k not in aux}
    return state, f"torchvision {model_name} {chosen.name} ({file}" + (
        f"; {len(aux)} tensors of its auxiliary classifiers left out)" if aux else ")")
