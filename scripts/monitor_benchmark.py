"""What monitoring costs: steps per second of whole runs with monitoring at its defaults vs switched off.

Both variants train the same config in this one process, in interleaved blocks (A B, B A, A B, ...), so a
slow stretch of the machine hits both alike. Each block builds a fresh run (not timed) and times its fit():
every training step, validation, checkpoints, logging and the final test. "off" is logger.tensorboard=false
(no event file, so no gradient norm, weight norm, layer statistics or images) and logger.grad_norm=false,
logger.layer_stats_every_n_epochs=0; the console lines and metrics.csv stay on in both.

    python scripts/monitor_benchmark.py                        # the default config, 10 epochs per block
    python scripts/monitor_benchmark.py --blocks 8 model=cnn data=synthetic data.num_samples=2048

Prints each block and the ratio (monitoring on / off) of the summed steps per second; the target is >= 0.97.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import trainlab
from trainlab.config import register_configs
from trainlab.run import Run

OFF = ["logger.tensorboard=false", "logger.grad_norm=false", "logger.layer_stats_every_n_epochs=0"]


def compose_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(Path(trainlab.__file__).parent / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def timed_fit(overrides: list[str], run_dir: Path) -> tuple[int, float, float]:
    """(optimizer steps, seconds in its epochs, seconds of its whole fit()) of one run built untimed in `run_dir`.

    The epochs' time is every call of Run.train_epoch: training steps, the interval and per-epoch logging,
    layer statistics, validation and checkpoints; fit() adds once-per-run work (the event file's creation,
    the final test, the confusion matrix, the hparams summary).
    """
    run_dir.mkdir(parents=True)
    run = Run(compose_cfg(overrides), run_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # the config tree each build prints
        run.build()
    in_epochs = [0.0]
    train_epoch = run.train_epoch

    def timed_epoch(epoch: int) -> bool:
        tic = time.perf_counter()
        try:
            return train_epoch(epoch)
        finally:
            in_epochs[0] += time.perf_counter() - tic

    run.train_epoch = timed_epoch
    tic = time.perf_counter()
    try:
        run.fit()
    finally:
        if run.monitor is not None:
            run.monitor.close()
    return run.step, in_epochs[0], time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=6, help="pairs of runs (default 6)")
    parser.add_argument("--epochs", type=int, default=10, help="trainer.max_epochs of each run (default 10)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both variants, e.g. model=cnn")
    args = parser.parse_args()
    logging.getLogger("trainlab").setLevel(logging.WARNING)  # the runs' console lines would drown the result
    base = [*args.overrides, f"trainer.max_epochs={args.epochs}", "early_stopping.enabled=false",
            "logger.progress=lines"]
    variants = {"defaults": base, "off": base + OFF}
    totals = {name: [0, 0.0, 0.0] for name in variants}  # steps, seconds in epochs, seconds of fit()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        timed_fit(variants["off"], Path(tmp) / "warmup")  # first-call costs (imports, allocator) out of the way
        timed_fit(variants["defaults"], Path(tmp) / "warmup_defaults")
        for block in range(args.blocks):
            order = list(variants) if block % 2 == 0 else list(reversed(variants))
            rates = {}
            for name in order:
                result = timed_fit(variants[name], Path(tmp) / f"{block}_{name}")
                totals[name] = [a + b for a, b in zip(totals[name], result)]
                rates[name] = result[0] / result[1]
            ratios.append(rates["defaults"] / rates["off"])
            print(f"block {block}: defaults {rates['defaults']:8.1f} steps/s   off {rates['off']:8.1f} steps/s   "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    (steps_on, epochs_on, fit_on), (steps_off, epochs_off, fit_off) = totals["defaults"], totals["off"]
    ratio = (steps_on / epochs_on) / (steps_off / epochs_off)
    print(f"overrides: {' '.join(args.overrides) or '(default config)'}; {args.blocks} blocks of {args.epochs} epochs")
    print(f"steps/s in the epochs with monitoring at its defaults {steps_on / epochs_on:.1f}, off "
          f"{steps_off / epochs_off:.1f}: ratio {ratio:.3f} (median of blocks {statistics.median(ratios):.3f}); "
          "target >= 0.97")
    print(f"whole fit() including once-per-run work: ratio {(steps_on / fit_on) / (steps_off / fit_off):.3f} "
          f"({(fit_on - epochs_on) / args.blocks:.2f} s vs {(fit_off - epochs_off) / args.blocks:.2f} s per run "
          "outside the epochs)")
    sys.exit(0)


if __name__ == "__main__":
    main()
