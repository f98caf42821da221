"""The benchmark scripts run end to end for a handful of steps (--smoke), so they cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("trainlab_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(benchmark, capsys, *args: str) -> str:
    benchmark.main([*args, "--smoke", "--device", "cpu"])
    return capsys.readouterr().out


def test_loop_benchmark_prints_both_ratios(benchmark, capsys):
    out = run(benchmark, capsys, "loop")
    match = re.search(rf"^loop_overhead_ratio mlp=({NUMBER}) cnn=({NUMBER})$", out, re.M)
    assert match, out
    assert all(float(x) > 0 for x in match.groups())
    assert len(re.findall(r"^loop (mlp|cnn) block 1/1: trainlab", out, re.M)) == 2


def test_loop_benchmark_runs_the_blocks_asked_for_of_one_workload(benchmark, capsys):
    out = run(benchmark, capsys, "loop", "--workload", "mlp", "--blocks", "2")
    assert re.findall(r"^loop (\w+) block (\d)/2: trainlab", out, re.M) == [("mlp", "1"), ("mlp", "2")]
    assert re.search(rf"^loop_overhead_ratio mlp=({NUMBER})$", out, re.M), out
    with pytest.raises(SystemExit, match="--blocks=0: give at least 1"):
        benchmark.main(["loop", "--smoke", "--device", "cpu", "--blocks", "0"])


def test_kernels_benchmark_compares_the_picked_kernels_with_the_defaults(benchmark, capsys):
    out = run(benchmark, capsys, "kernels", "--workload", "mlp")
    picked = r"^kernels mlp optimizer=adam: trainlab's pick \(fused\) / torch's default median "
    assert re.search(picked, out, re.M), out
    match = re.search(r"^optimizer_kernels_ratio (.*)$", out, re.M)
    assert match, out
    ratios = dict(pair.split("=") for pair in match.group(1).split())
    assert set(ratios) == {f"mlp_{name}" for name in benchmark.KERNEL_OPTIMIZERS}
    assert all(float(x) > 0 for x in ratios.values())


def test_data_benchmark_compares_the_two_paths(benchmark, capsys):
    out = run(benchmark, capsys, "data")
    assert re.search(rf"^data_speedup_ratio {NUMBER} ", out, re.M), out
    assert "DataLoader (1 workers)" in out


def test_throughput_benchmark_reports_images_per_second(benchmark, capsys):
    out = run(benchmark, capsys, "throughput")
    assert re.search(rf"^throughput resnet20 flip_crop precision=fp32 compile=false: +{NUMBER} images/s", out, re.M), out


def test_tta_benchmark_trains_the_preset_and_reports_accuracy(benchmark, capsys):
    # The preset itself needs CIFAR-10; the smoke run swaps in tiny synthetic data and a small model.
    out = run(benchmark, capsys, "tta", "--seeds", "1", "--override", "data=synthetic", "data.num_samples=400",
              "data.shape=[3,16,16]", "model=cnn", "model.depth=8", "trainer.max_epochs=1", "data.batch_size=64")
    match = re.search(rf"^tta_result wall_s={NUMBER} test_acc_mean=({NUMBER}) test_acc_std=0.0000 seeds=1$", out, re.M)
    assert match, out
    assert 0.0 <= float(match.group(1)) <= 1.0


def test_sync_benchmark_explains_itself_without_a_gpu(benchmark, capsys):
    out = run(benchmark, capsys, "syncs")
    assert "needs a CUDA device" in out


@pytest.mark.slow  # 11 s: a torchrun run of 2 processes and one of 1
def test_scaling_benchmark_compares_a_torchrun_run_with_one_process(benchmark, capsys):
    out = run(benchmark, capsys, "scaling")
    assert re.search(rf"^scaling block 1/1: 1 process +{NUMBER} images/s  2 processes +{NUMBER} images/s", out, re.M)
    match = re.search(rf"^scaling_ratio processes=2 ratio=({NUMBER}) per_process=({NUMBER}) ", out, re.M)
    assert match, out
    assert float(match.group(1)) > 0 and float(match.group(2)) == pytest.approx(float(match.group(1)) / 2, abs=0.01)


def test_scaling_benchmark_explains_itself_with_one_process(benchmark, capsys):
    out = run(benchmark, capsys, "scaling", "--processes", "1")
    assert "scaling: needs 2 or more processes" in out and "scaling_ratio" not in out
