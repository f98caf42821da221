#!/usr/bin/env python
"""trainlab's performance benchmarks. Each prints ratios against a baseline run in the same process.

    python scripts/benchmark.py loop [--quick] [--blocks N]   trainlab's loop vs a hand-written loop (steps/s ratio)
    python scripts/benchmark.py kernels [--quick]  the optimizer kernels trainlab picks vs torch's default (steps/s)
    python scripts/benchmark.py syncs            host syncs on ordinary training steps (CUDA only)
    python scripts/benchmark.py data [--quick]   device-resident batches + flip_crop vs DataLoader + v2 transforms
    python scripts/benchmark.py throughput       images/s of a residual CNN with flip_crop, per precision and compile
    python scripts/benchmark.py tta [--seeds N]  time to accuracy of experiment=cifar10_fast
    python scripts/benchmark.py scaling [--processes N]  images/s of one run on N processes (torchrun) vs one

Options: --device (auto | cpu | cuda), --quick (fewer, shorter blocks: about a minute on 2 CPU cores).
Every result line starts with the benchmark's name, so `| grep ^loop_overhead_ratio` picks the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from trainlab.cli import CONF_DIR
from trainlab.config import register_configs
from trainlab.device import autocast_for, select_device

QUIET = ["logger.progress=lines"]


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The config `train <overrides>` composes."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_run(overrides: list[str], run_dir: Path):
    """A built (not yet trained) trainlab Run for `train <overrides>` writing into run_dir."""
    import logging

    from trainlab.run import Run

    logging.getLogger("trainlab").setLevel(logging.WARNING)  # keep the benchmark's own output readable
    run = Run(compose_cfg(overrides), run_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # the run's announcement (config tree) is not a result
        run.build()
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_times(run_dir: Path) -> list[float]:
    """Each epoch's seconds from a run's metrics.csv (training and validation: no start-up, data or test); none when
    the run ended before its first epoch."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as handle:
        return [float(row["epoch_time_s"]) for row in csv.DictReader(handle)]


def later_epochs(times: list[float]) -> float:
    """The median epoch after the first (which compiles, autotunes and warms up); the first when it is the only one."""
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


# --- 1. loop overhead ------------------------------------------------------------------------------

# Workloads: (name, trainlab overrides, steps per epoch). Validation and test splits are made tiny, since the
# hand-written loop evaluates nothing; what remains of them is counted against trainlab.
WORKLOADS = {
    "mlp": ["model=mlp", "data=synthetic", "data.shape=[1,8,8]", "data.batch_size=64", "optimizer=momentum"],
    "cnn": ["model=cnn", "model.depth=20", "data=synthetic", "data.shape=[3,32,32]", "data.batch_size=128",
            "optimizer=momentum", "augmentation=none"],
}


def loop_overrides(name: str, steps_per_epoch: int, epochs: int, device: str) -> list[str]:
    batch = int(next(o for o in WORKLOADS[name] if o.startswith("data.batch_size=")).split("=")[1])
    # train is (1 - test) * (1 - val) of the samples: solve for steps_per_epoch full batches (drop_last).
    val = test = 0.01
    samples = math.ceil((steps_per_epoch * batch + 0.5) / ((1 - val) * (1 - test)))
    return WORKLOADS[name] + [
        f"data.num_samples={samples}", f"data.val_fraction={val}", f"data.test_fraction={test}",
        "scheduler=cosine", f"trainer.max_epochs={epochs}", f"trainer.device={device}", *QUIET,
    ]


def minimal_loop(model, optimizer, batches, autocast) -> None:
    """The minimal training loop over `batches`: forward, cross-entropy, zero_grad, backward, step."""
    for x, y in batches:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def hand_written(run) -> Callable[[int], float]:
    """The minimal loop (forward, cross-entropy, zero_grad, backward, step) on the run's model architecture and
    optimizer settings, fed the same batches (the run's own loader): returns `epoch(e)`, which trains epoch e and
    returns its seconds. Its SGD uses the kernels trainlab picks (fused where the device has them), so the ratio
    is the loop's cost alone; `kernels` measures what the pick itself gains."""
    from trainlab.initialization import initialize
    from trainlab.models import build_model
    from trainlab.optim import fast_kernels

    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, run.data.input_shape, run.data.num_classes)
    initialize(model, cfg.initialization, getattr(model, "activation", "relu"))
    model.to(device, memory_format=torch.channels_last if run.channels_last else torch.preserve_format)
    kernels = fast_kernels(torch.optim.SGD, {}, list(model.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum, **kernels)
    batches, autocast = run.train_batches, autocast_for(device, run.precision)

    def epoch(e: int) -> float:
        batches.set_epoch(e)  # trainlab's next epoch sets its own epoch and batch size again
        batches.set_batch_size(run.batch_sizes[e - 1])
        model.train()
        sync(device)
        tic = time.perf_counter()
        minimal_loop(model, optimizer, batches, autocast)
        sync(device)
        return time.perf_counter() - tic

    return epoch


def paired_block(overrides: list[str], hand_first: bool) -> tuple[float, float, object]:
    """One block: a freshly built trainlab run of `overrides` (Run.fit: training steps with logging, scheduler and
    the non-finite check, then per epoch validation, early stopping, metrics.csv/TensorBoard rows and checkpoints),
    and after (or before: `hand_first`, alternating epoch by epoch) each of its epochs the same epoch of the
    hand-written loop on the same batches. Pairing epoch by epoch keeps each pair within seconds of each other,
    where the machine's speed drifts over minutes. Returns (trainlab's seconds, the hand-written loop's, the run).
    Building the run and the once-per-run work after its last epoch (test, confusion matrix) are not timed."""
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(overrides, Path(tmp))
        epoch_body, spent, baseline = run.train_epoch, [], []
        hand_epoch = hand_written(run)

        def timed_epoch(epoch: int) -> bool:
            first = hand_first == (epoch % 2 == 1)  # ABBA, epoch by epoch
            if first:
                baseline.append(hand_epoch(epoch))
            sync(run.device)
            tic = time.perf_counter()
            stop = epoch_body(epoch)
            sync(run.device)
            spent.append(time.perf_counter() - tic)
            if not first:
                baseline.append(hand_epoch(epoch))
            return stop

        run.train_epoch = timed_epoch
        run.fit()
        run.monitor.close()
    return sum(spent), sum(baseline), run


def bench_loop(args: argparse.Namespace) -> None:
    device = str(select_device(args.device))
    # workload: (steps per epoch, epochs per block, blocks)
    plan = {"mlp": (600, 2, 3), "cnn": (12, 2, 3)} if args.quick else {"mlp": (2000, 4, 7), "cnn": (40, 4, 7)}
    if device.startswith("cuda"):
        # a GPU VM's speed swings by 20 % within seconds: many short blocks, each pair close in time
        plan = {"mlp": (2000, 2, 5 if args.quick else 15), "cnn": (200, 2, 5 if args.quick else 15)}
    if args.smoke:
        plan = {"mlp": (4, 1, 1), "cnn": (2, 1, 1)}
    if args.blocks is not None:  # more blocks narrow the median where the machine's speed is noisy
        if args.blocks < 1:
            raise SystemExit(f"--blocks={args.blocks}: give at least 1")
        plan = {name: (steps, epochs, args.blocks) for name, (steps, epochs, _) in plan.items()}
    ratios = {}
    for name, (steps_per_epoch, epochs, repeats) in plan.items():
        if args.workload not in (None, name):
            continue
        overrides = loop_overrides(name, steps_per_epoch, epochs, device)
        paired_block(overrides, hand_first=False)  # warm-up of both (allocator, kernels, caches)
        pairs = []
        for r in range(repeats):
            a, b, run = paired_block(overrides, hand_first=r % 2 == 1)
            pairs.append(b / a)  # steps/s of trainlab over steps/s of the hand-written loop (same steps)
            steps = steps_per_epoch * epochs
            print(f"loop {name} block {r + 1}/{repeats}: trainlab {steps / a:8.1f} steps/s  "
                  f"hand-written {steps / b:8.1f} steps/s  ratio {b / a:.3f}", flush=True)
        ratios[name] = statistics.median(pairs)
        print(f"loop {name}: median ratio {ratios[name]:.3f}  spread {min(pairs):.3f}-{max(pairs):.3f}  "
              f"({repeats} blocks of {steps_per_epoch * epochs} steps, interleaved epoch by epoch, device {device}, "
              f"precision {run.precision})")
    print("loop_overhead_ratio " + " ".join(f"{name}={ratio:.3f}" for name, ratio in ratios.items()))


# --- 1b. optimizer kernels -------------------------------------------------------------------------

KERNEL_OPTIMIZERS = ("momentum", "nesterov", "adam", "adamw", "adagrad")


def minimal_steps(run, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Steps/s of the minimal loop over `batches` on a built run's model and optimizer (the one `train` builds)."""
    run.model.train()
    sync(run.device)
    tic = time.perf_counter()
    minimal_loop(run.model, run.optimizer, batches, run.autocast)
    sync(run.device)
    return len(batches) / (time.perf_counter() - tic)


def bench_kernels(args: argparse.Namespace) -> None:
    """Steps/s of the minimal loop with the optimizer `train` builds (fused kernels where the device has them) over
    the same with torch's default kernels (`+optimizer.fused=false`), per optimizer, on the loop benchmark's
    workloads. The two runs start from the same weights and take turns in ABBA order."""
    device = str(select_device(args.device))
    steps = {"mlp": 200, "cnn": 4} if args.quick else {"mlp": 400, "cnn": 10}
    repeats = 3 if args.quick else 9
    if args.smoke:
        steps, repeats = {"mlp": 3, "cnn": 1}, 1
    ratios = {}
    for name in (("mlp", "cnn") if args.workload is None else (args.workload,)):
        for optimizer in (KERNEL_OPTIMIZERS if name == "mlp" or not args.quick else ("momentum", "adam")):
            base = [o for o in loop_overrides(name, steps[name], 1, device) if not o.startswith("optimizer=")]
            runs = []
            for extra in ([], ["+optimizer.fused=false"]):
                with tempfile.TemporaryDirectory() as tmp:  # building a run writes nothing to its directory
                    runs.append(build_run([*base, f"optimizer={optimizer}", *extra], Path(tmp)))
            picked, default = runs
            picked.train_batches.set_epoch(1)
            batches = list(picked.train_batches)  # the same batches for both
            kernel = "fused" if picked.optimizer.param_groups[0].get("fused") else "default"
            minimal_steps(picked, batches), minimal_steps(default, batches)  # warm-up of both
            pairs = []
            for r in range(repeats):
                order = (picked, default) if r % 2 == 0 else (default, picked)
                rate = {id(run): minimal_steps(run, batches) for run in order}
                pairs.append(rate[id(picked)] / rate[id(default)])
            ratios[f"{name}_{optimizer}"] = statistics.median(pairs)
            print(f"kernels {name} optimizer={optimizer}: trainlab's pick ({kernel}) / torch's default "
                  f"median {ratios[f'{name}_{optimizer}']:.3f}  spread {min(pairs):.3f}-{max(pairs):.3f}  "
                  f"({repeats} blocks of {steps[name]} steps, device {device})", flush=True)
    print("optimizer_kernels_ratio " + " ".join(f"{key}={ratio:.3f}" for key, ratio in ratios.items()))


# --- 2. host syncs ----------------------------------------------------------------------------------


def bench_syncs(args: argparse.Namespace) -> None:
    """100 ordinary training steps under torch.cuda.set_sync_debug_mode('warn'); every sync is counted."""
    from trainlab.loop import train_one_epoch

    if not torch.cuda.is_available():
        print("syncs: needs a CUDA device (host syncs are free on CPU); skipped")
        return
    steps = 100
    for name, extra in (("default", []), ("ema+clip+cosine", ["regularization=ema", "regularization.grad_clip_norm=1.0",
                                                               "scheduler=cosine"]),
                        ("cnn flip_crop", ["model=cnn", "data=synthetic", "augmentation=flip_crop"])):
        with tempfile.TemporaryDirectory() as tmp:
            run = build_run([*extra, "logger.every_n_steps=1000", "trainer.device=cuda"], Path(tmp))

            def watched():  # the loader's own work (order, slices, augmentation) is watched too
                torch.cuda.set_sync_debug_mode("warn")
                yield from batches_for(run, steps)
                torch.cuda.set_sync_debug_mode(0)  # the epoch-end read of the totals is allowed

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_one_epoch(run.forward, watched(), run.loss_fn, run.optimizer, run.scheduler, run.scaler,
                                run.autocast, 0, 1000, lambda *a: None, run.parts)
            torch.cuda.set_sync_debug_mode(0)
            # each sync warns "called a synchronizing CUDA operation"; the mode's own notice is not one
            syncs = [w for w in caught if "synchronizing cuda operation" in str(w.message).lower()]
            print(f"syncs {name}: {len(syncs)} host syncs in {steps} ordinary steps")
            for w in syncs[:5]:
                print(f"  {w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}")


def batches_for(run, steps: int):
    """`steps` training batches from the run's loader, epoch after epoch."""
    epoch = 0
    while True:
        epoch += 1
        run.train_batches.set_epoch(epoch)
        for batch in run.train_batches:
            yield batch
            steps -= 1
            if steps == 0:
                return


# --- 3. data path -----------------------------------------------------------------------------------


def bench_data(args: argparse.Namespace) -> None:
    """Samples/s of serving CIFAR-shaped training batches with flip_crop, normalised and on the device: trainlab's
    DeviceLoader vs torchvision's DataLoader with the equivalent v2 transforms, on the same device."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    from trainlab.augment import build_augment
    from trainlab.data import DeviceLoader, Split
    from trainlab.device import available_cores

    device = select_device(args.device)
    n, batch = (512 if args.smoke else 5000 if args.quick else 20000), 256
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    mean, std = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1), torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1)

    augment = build_augment(compose_cfg(["augmentation=flip_crop"]).augmentation, 10, (3, 32, 32))
    batches = DeviceLoader(Split(images, labels), mean.flatten(), std.flatten(), batch, device, shuffle=True,
                           drop_last=True, augment=augment)  # trainlab's own loader, as a run builds it

    def device_path() -> float:
        batches.set_epoch(batches.epoch + 1)
        sync(device)
        tic = time.perf_counter()
        for x, y in batches:
            pass
        sync(device)
        return batches.num_examples / (time.perf_counter() - tic)

    transform = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32), v2.Normalize(mean.flatten().tolist(), std.flatten().tolist())])

    class Images(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int):
            return transform(images[i]), labels[i]

    workers = 1 if args.smoke else available_cores()
    loader = DataLoader(Images(), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=True)

    def dataloader_path() -> float:
        sync(device)
        tic = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)
        return n // batch * batch / (time.perf_counter() - tic)

    dataloader_path(), device_path()  # warm-up: workers started, kernels loaded
    repeats = 1 if args.smoke else 3 if args.quick else 5
    ratios = []
    for r in range(repeats):
        fast, slow = device_path(), dataloader_path()
        ratios.append(fast / slow)
        print(f"data block {r + 1}/{repeats}: device-resident {fast:10.0f} samples/s  DataLoader "
              f"({workers} workers) {slow:8.0f} samples/s  ratio {fast / slow:.1f}", flush=True)
    print(f"data_speedup_ratio {statistics.median(ratios):.1f} (median of {repeats}; spread "
          f"{min(ratios):.1f}-{max(ratios):.1f}; device {device}; target >= 5)")


# --- 4. throughput of a whole run -------------------------------------------------------------------


def bench_throughput(args: argparse.Namespace) -> None:
    """Training images/s of ResNet-20 with flip_crop on CIFAR-shaped data, from Run.fit's epoch times."""
    device = select_device(args.device)
    if device.type == "cuda":
        combos = [(p, "false") for p in ("fp32", "bf16", "fp16")]
        combos += [(p, c) for c in ("default", "reduce-overhead") for p in ("fp32", "bf16")]
        samples, epochs = (20000, 3) if args.quick else (50000, 4)
    else:
        combos = [("fp32", "false")] if args.quick else [("fp32", "false"), ("fp32", "default")]
        samples, epochs = (1200, 2) if args.quick else (5000, 3)
    if args.smoke:
        combos, samples, epochs = combos[:1], 300, 2
    failed: list[str] = []
    for precision, mode in combos:
        overrides = ["model=cnn", "data=synthetic", f"data.num_samples={samples}", "data.batch_size=512",
                     "augmentation=flip_crop", "optimizer=nesterov", f"trainer.precision={precision}",
                     f"trainer.compile={mode}", f"trainer.max_epochs={epochs}", f"trainer.device={device}",
                     *QUIET]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                run = build_run(overrides, Path(tmp))
                run.fit()
                run.monitor.close()
            except Exception as error:  # one failing combination (a compile mode, say) must not hide the others
                failed.append(f"precision={precision} compile={mode}")
                print(f"throughput resnet20 flip_crop precision={precision} compile={mode}: FAILED "
                      f"{type(error).__name__}: {error}", flush=True)
                continue
            times = epoch_times(Path(tmp))
            steady = later_epochs(times)
            per_s = run.train_batches.num_examples / steady
            print(f"throughput resnet20 flip_crop precision={precision} compile={mode}: {per_s:9.0f} images/s "
                  f"(epoch incl. validation {steady:.2f} s, first epoch {times[0]:.2f} s, device {device})",
                  flush=True)
    if failed:
        raise SystemExit(f"throughput: {len(failed)} combination(s) failed: {'; '.join(failed)}")


# --- 5. time to accuracy ----------------------------------------------------------------------------


def bench_tta(args: argparse.Namespace) -> None:
    """Wall time and test accuracy of `train experiment=cifar10_fast` over seeds (plus --override ...)."""
    from trainlab.run import execute

    results = []
    for seed in range(args.seeds):
        overrides = ["experiment=cifar10_fast", f"seed={seed}", f"trainer.device={args.device}", *QUIET,
                     *args.override]
        with tempfile.TemporaryDirectory() as tmp:
            tic = time.perf_counter()
            status, _, run = execute(compose_cfg(overrides), Path(tmp), overrides)
            wall = time.perf_counter() - tic
            acc = (run.summary.get("test") or {}).get("test/acc", float("nan"))
            results.append((wall, acc))
            times = epoch_times(Path(tmp))
            epochs = (f"; epochs {sum(times):.1f} s: the first {times[0]:.2f} s, then {later_epochs(times):.2f} s "
                      "each") if times else ""
            print(f"tta seed {seed}: {status}  test/acc {acc:.4f}  wall {wall:.1f} s  "
                  f"({run.summary.get('epochs_run')} epochs, device {run.summary.get('device')}{epochs})", flush=True)
    walls, accs = [r[0] for r in results], [r[1] for r in results]
    spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    print(f"tta_result wall_s={statistics.median(walls):.1f} test_acc_mean={statistics.mean(accs):.4f} "
          f"test_acc_std={spread:.4f} seeds={len(results)}")


# --- 6. several processes ---------------------------------------------------------------------------


def bench_scaling(args: argparse.Namespace) -> None:
    """Training images/s of one ResNet-20 run across N processes (torchrun, DDP) over the same run in one process,
    from each run's steady epoch times. The runs are separate processes (that is the point), so the blocks take
    turns (ABBA) instead of sharing a process. On a CPU the processes share the cores: torchrun gives each worker
    one thread (OMP_NUM_THREADS=1), one process takes them all."""
    device = str(select_device(args.device))
    processes = args.processes or (torch.cuda.device_count() if device.startswith("cuda") else 2)
    if processes < 2:
        print(f"scaling: needs 2 or more processes (device {device} gives {processes}; NCCL takes one GPU each); "
              "skipped")
        return
    samples, epochs, repeats = (20000, 3, 3) if device.startswith("cuda") else (2048, 3, 3)
    if args.quick:
        repeats = 2
    if args.smoke:
        samples, epochs, repeats = 512, 2, 1
    overrides = ["model=cnn", "data=synthetic", f"data.num_samples={samples}", "data.batch_size=256",
                 "augmentation=flip_crop", "optimizer=nesterov", f"trainer.max_epochs={epochs}",
                 f"trainer.device={'cuda' if device.startswith('cuda') else 'cpu'}", "logger.tensorboard=false",
                 *QUIET]

    def images_per_s(count: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}",
                        "-m", "trainlab"] if count > 1 else [sys.executable, "-m", "trainlab"]
            done = subprocess.run([*launcher, *overrides, f"hydra.run.dir={tmp}"], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"scaling: the run on {count} process(es) failed:\n{done.stdout[-2000:]}"
                                 f"{done.stderr[-2000:]}")
            with (Path(tmp) / "metrics.csv").open() as handle:
                steps = int(next(csv.DictReader(handle))["step"])  # the first epoch's: every epoch takes as many
            return steps * 256 / later_epochs(epoch_times(Path(tmp)))

    pairs = []
    for r in range(repeats):
        order = (1, processes) if r % 2 == 0 else (processes, 1)
        rates = {count: images_per_s(count) for count in order}
        pairs.append(rates[processes] / rates[1])
        print(f"scaling block {r + 1}/{repeats}: 1 process {rates[1]:9.0f} images/s  {processes} processes "
              f"{rates[processes]:9.0f} images/s  ratio {pairs[-1]:.2f}", flush=True)
    ratio = statistics.median(pairs)
    print(f"scaling_ratio processes={processes} ratio={ratio:.2f} per_process={ratio / processes:.2f} "
          f"(median of {repeats}; spread {min(pairs):.2f}-{max(pairs):.2f}; device {device})")


BENCHMARKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "loop": bench_loop, "kernels": bench_kernels, "syncs": bench_syncs, "data": bench_data,
    "throughput": bench_throughput, "tta": bench_tta, "scaling": bench_scaling,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer and shorter blocks (about a minute on CPU)")
    parser.add_argument("--smoke", action="store_true", help="a handful of steps of each part (the tests use it)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="loop, kernels: only this workload")
    parser.add_argument("--blocks", type=int, help="loop: blocks of each workload (default 7; --quick 3; a GPU 15)")
    parser.add_argument("--seeds", type=int, default=3, help="tta: seeds to run")
    parser.add_argument("--override", nargs="*", default=[], help="tta: extra train overrides (e.g. data.root=...)")
    parser.add_argument("--processes", type=int, help="scaling: processes of the torchrun run (default: GPUs, or 2)")
    args = parser.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    print(json.dumps({"benchmark": args.benchmark, "torch": torch.__version__,
                      "device": str(select_device(args.device)), "threads": torch.get_num_threads(),
                      "date": time.strftime("%Y-%m-%d")}))
    BENCHMARKS[args.benchmark](args)


if __name__ == "__main__":
    sys.exit(main())
