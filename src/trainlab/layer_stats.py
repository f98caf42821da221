"""Inside the model: gradient and weight norms, per-layer statistics of one recorded step, first-layer filters."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                    nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Softplus)
RELU_TYPES = (nn.ReLU, nn.ReLU6)  # an inactive unit outputs exactly zero, so "dead" is well defined
HISTOGRAM_BINS = 30  # equal-width buckets between a tensor's min and max
MAX_FILTER_TILES = 64  # the first layer's image shows its first 64 kernels (a small image: cheap to encode and write)


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all `tensors` together, computed on their device (nothing is read back to the host).

    Under no_grad rather than a detach per tensor: a fixed handful of kernels and calls, read once per logging
    interval. The squares are summed in float64: in float32 elements below about 1e-23 square to 0, and the
    vanishing gradients of a badly initialized deep net read as exactly 0."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    with torch.no_grad():
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))).float()


def gradient_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients the last optimizer step used (after clipping, when clipping is on)."""
    return global_norm(p.grad for p in params if p.grad is not None)


def dead_fraction(output: torch.Tensor) -> torch.Tensor:
    """Share of units (features of a linear layer, channels of a conv layer) that output zero, or less, for every
    example (and position) of the batch."""
    alive = (output.detach() > 0).transpose(0, 1).reshape(output.shape[1], -1).any(dim=1)
    return 1.0 - alive.float().mean()


def dead_layers(scalars: dict[str, float], share: float = 1.0) -> dict[str, float]:
    """The ReLU layers of a recorded step (`dead_relu/<layer>` among `scalars`) at least `share` of whose units
    output 0 for the whole batch, with their shares. At 1, every unit: nothing passes them, forward or back."""
    return {tag.split("/", 1)[1]: value for tag, value in scalars.items()
            if tag.startswith("dead_relu/") and value >= share}


VANISHING = 1e-4  # first layer's gradient norm over the last's below which the first layers barely learn


def vanishing_gradient(scalars: dict[str, float]) -> tuple[str, float, str, float] | None:
    """(first weight, its gradient norm, last weight, its gradient norm) of a recorded step whose first layer's
    gradient is below VANISHING times the last layer's, else None. The weights in the model's order, as recorded."""
    norms = [(tag.split("/", 1)[1], value) for tag, value in scalars.items() if tag.startswith("grad_norm/")]
    if len(norms) < 2 or not 0 < norms[-1][1] < math.inf:
        return None
    (first, g_first), (last, g_last) = norms[0], norms[-1]
    return (first, g_first, last, g_last) if g_first < VANISHING * g_last else None


def histogram(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """[min, max, sum, sum of squares, then the counts of `bins` equal-width buckets] of `values`, computed on
    their device, so a recorded step reads every histogram back at once (and never copies a whole tensor)."""
    x = values.detach().reshape(-1).float()
    low, high = torch.aminmax(x)
    index = ((x - low) / ((high - low).clamp_min(1e-12) / bins)).long().clamp_(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).float()
    return torch.cat([torch.stack([low, high, x.sum(), x.square().sum()]), counts])


@dataclass
class Histogram:
    """What TensorBoard's raw histogram takes: bucket_limits are the buckets' right edges."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]

    @classmethod
    def from_row(cls, row: list[float], num: int) -> Histogram:
        low, high, total, squares, counts = row[0], row[1], row[2], row[3], row[4:]
        width = (high - low) / len(counts)
        limits = [low + width * (i + 1) for i in range(len(counts))]
        return cls(low, high, num, total, squares, limits, counts)


@dataclass
class LayerStats:
    """One recorded training step: scalars (tag -> value) and histograms (tag -> Histogram)."""

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)


class LayerRecorder:
    """Per-layer statistics of one training step, through hooks that exist only until that step has ended.

    attach() before an epoch that records. The model's first forward pass then keeps a copy of the weights;
    every activation module's output gives its mean, std, dead-ReLU fraction (and histogram). The optimizer's
    step post-hook reads each weight's gradient norm and update-to-weight ratio ||w_after - w_before|| /
    ||w_before|| (weights of linear and conv layers: parameters with 2 or more dimensions), reads everything
    back to the host at once, and removes every hook, so the rest of the epoch runs without them.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, histograms: bool):
        self.model, self.optimizer, self.histograms = model, optimizer, histograms
        self.weights = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        self.activations = [(name, m) for name, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)]
        self._handles: list[Any] = []
        self._before: list[torch.Tensor] | None = None
        self._acts: dict[str, torch.Tensor] = {}
        self._act_hists: dict[str, tuple[torch.Tensor, int]] = {}
        self._calls: dict[str, int] = {}
        self.result: LayerStats | None = None

    @property
    def attached(self) -> bool:
        return len(self._handles) > 0

    def attach(self) -> None:
        self.detach()
        self.result, self._before = None, None
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward))
        for name, module in self.activations:
            kind = type(module).__name__.lower()
            label = name if name.rsplit(".", 1)[-1] == kind else f"{name}.{kind}"  # "3.relu", "layer1.0.relu"
            hook = self._activation_hook(label, isinstance(module, RELU_TYPES))
            self._handles.append(module.register_forward_hook(hook))
        self._handles.append(self.optimizer.register_step_post_hook(self._on_step))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, module: nn.Module, inputs: Any) -> None:
        if self._before is None:  # the weights before the recorded step (and before any decay pre-hook)
            self._before = [p.detach().clone() for _, p in self.weights]
        self._acts, self._act_hists, self._calls = {}, {}, {}  # keep the last forward before the step (LBFGS)

    def _activation_hook(self, label: str, relu: bool):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            calls = self._calls[label] = self._calls.get(label, 0) + 1
            key = label if calls == 1 else f"{label}#{calls}"  # a module applied twice per forward (torchvision)
            out = output.detach().float()
            self._acts[f"act_mean/{key}"] = out.mean()
            self._acts[f"act_std/{key}"] = out.std()
            if relu:
                self._acts[f"dead_relu/{key}"] = dead_fraction(out)
            if self.histograms:
                self._act_hists[f"activations/{key}"] = (histogram(out), out.numel())

        return hook

    @torch.no_grad()
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scalars, histograms = dict(self._acts), dict(self._act_hists)
        for (name, p), before in zip(self.weights, self._before or []):
            if p.grad is not None:
                scalars[f"grad_norm/{name}"] = global_norm([p.grad])
            scalars[f"update_ratio/{name}"] = (p - before).norm() / before.norm().clamp_min(1e-12)
            if self.histograms:
                histograms[f"weights/{name}"] = (histogram(p), p.numel())
                if p.grad is not None:
                    histograms[f"grads/{name}"] = (histogram(p.grad), p.numel())
        rows = [torch.stack([v.float() for v in scalars.values()])] if scalars else []
        rows += [h for h, _ in histograms.values()]
        read = torch.cat(rows).tolist() if rows else []  # the one read back to the host
        values, start = dict(zip(scalars, read)), len(scalars)
        hists = {}
        for tag, (_, num) in histograms.items():
            hists[tag] = Histogram.from_row(read[start : start + 4 + HISTOGRAM_BINS], num)
            start += 4 + HISTOGRAM_BINS
        self.result = LayerStats(values, hists)
        self._before = None
        self.detach()


def first_layer_filters(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor | None:
    """The first layer's weights as one image (C, H, W) in [0, 1], a tile per kernel, each scaled to its own range.

    The first layer is the first Conv2d or Linear module; a linear layer counts when it reads a whole image
    (its rows are then images too). RGB kernels are colour tiles, other kernels one grey tile per input channel.
    None when the model starts otherwise.
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        return None
    weight = first.weight.detach().float().cpu()
    if isinstance(first, nn.Linear):
        if len(input_shape) != 3 or first.in_features != math.prod(input_shape):
            return None
        weight = weight.reshape(-1, *input_shape)
    tiles = weight if weight.shape[1] == 3 else weight.reshape(-1, 1, *weight.shape[2:])
    tiles = tiles[:MAX_FILTER_TILES]
    low = tiles.amin(dim=(1, 2, 3), keepdim=True)
    high = tiles.amax(dim=(1, 2, 3), keepdim=True)
    tiles = (tiles - low) / (high - low).clamp_min(1e-12)
    scale = max(1, 8 // tiles.shape[-1])  # kernels under 8 px enlarged (nearest); TensorBoard scales the rest
    tiles = tiles.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    return image_grid(tiles, padding=2)


def image_grid(tiles: torch.Tensor, padding: int) -> torch.Tensor:
    """(N, C, h, w) tiles as one (C, H, W) image, ceil(sqrt(N)) to a row, on a white background."""
    n, channels, h, w = tiles.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.ones(rows * cols, channels, h + padding, w + padding)
    canvas[:n, :, padding:, padding:] = tiles  # each tile with its top-left margin
    grid = canvas.reshape(rows, cols, channels, h + padding, w + padding).permute(2, 0, 3, 1, 4)
    grid = grid.reshape(channels, rows * (h + padding), cols * (w + padding))
    return torch.nn.functional.pad(grid, (0, padding, 0, padding), value=1.0)  # the right and bottom margins


SAMPLE = 1 << 18  # coordinates of a group read for its median step size, when it has more (a uniform random sample)


def effective_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per parameter group, the median over its coordinates of the step size an adaptive optimizer applies to
    a unit gradient: lr / (sqrt(G) + eps) for Adagrad (G the sum of squared gradients: it only grows, so the step
    shrinks), lr / (sqrt(v) + eps) for RMSprop (v a running mean: it follows the gradients), Adam's and AdamW's
    with their bias corrections, and without them for trainlab.adam's UncorrectedAdam and UncorrectedAdamW
    (optimizer.bias_correction=false), Adadelta's sqrt(delta + eps) / sqrt(v + eps) times lr. Empty for other
    optimizers, and before the first step.

    A group of more than SAMPLE coordinates is read at SAMPLE of them drawn uniformly (each tensor's share by its
    size, from a generator of its own: the run's random streams are untouched). Not every k-th coordinate: in a weight
    matrix whose row length k divides, those are the same input columns in every row."""
    kind = type(optimizer).__name__
    if kind not in ("Adagrad", "RMSprop", "Adam", "AdamW", "UncorrectedAdam", "UncorrectedAdamW", "Adadelta"):
        return {}
    found = {}
    with torch.no_grad():
        for index, group in enumerate(optimizer.param_groups):
            stepped = [(param, state) for param in group["params"]
                       if (state := optimizer.state.get(param)) and float(state.get("step", 1)) > 0]
            # (Adagrad's state exists before its first step)
            total = sum(param.numel() for param, _ in stepped)
            steps = []
            for param, state in stepped:
                picked = _picked(param, total)
                # the same coordinates of every state tensor, then the step sizes of those alone:
                chosen = {k: v.reshape(-1)[picked] if torch.is_tensor(v) and v.ndim > 0 else v
                          for k, v in state.items()}
                steps.append(_step_size(kind, group, chosen))
            if steps:
                found[str(group.get("name", index))] = float(torch.cat(steps).float().median())
    return found


def _picked(param: torch.Tensor, total: int) -> torch.Tensor | slice:
    """The coordinates of `param` read for its group's median: all of them when the group has at most SAMPLE, else
    a uniform random draw of its share of SAMPLE."""
    if total <= SAMPLE:
        return slice(None)
    count = max(1, round(SAMPLE * param.numel() / total))
    generator = torch.Generator(device=param.device).manual_seed(param.numel())
    return torch.randint(param.numel(), (count,), generator=generator, device=param.device)


def _step_size(kind: str, group: dict, state: dict) -> torch.Tensor:
    """The per-coordinate multiplier of the gradient in the optimizer's next update (without momentum)."""
    lr, eps = group["lr"], group["eps"]
    step = float(state["step"]) if "step" in state else 0.0
    if kind == "Adagrad":
        return lr / (1 + (step - 1) * group["lr_decay"]) / (state["sum"].sqrt() + eps)
    if kind == "RMSprop":
        v = state["square_avg"]
        if group["centered"]:
            v = v - state["grad_avg"] ** 2
        return lr / (v.sqrt() + eps)
    if kind == "Adadelta":
        return lr * (state["acc_delta"] + eps).sqrt() / (state["square_avg"] + eps).sqrt()
    beta1, beta2 = group["betas"]
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    if kind.startswith("Uncorrected"):  # trainlab.adam: m / (sqrt(v) + eps) as they are
        return lr / (v.sqrt() + eps)
    return lr / (1 - beta1 ** step) / (v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps)  # eps where torch adds it
