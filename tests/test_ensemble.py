"""`trainlab ensemble`: the mean of several runs' predicted probabilities on their common test split."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from test_data import write_image_folder
from trainlab import ensemble, report
from trainlab.config import ConfigError
from trainlab.run import execute


def trained(run_dir: Path, overrides: list[str]) -> Path:
    """A run directory as `train` leaves it: the run, and Hydra's record of its config."""
    cfg = compose_cfg(overrides)
    assert execute(cfg, run_dir, overrides)[:2] == ("completed", 0)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    """A sweep directory of three seeds of the default MLP on digits, 2 epochs each."""
    sweep = tmp_path_factory.mktemp("ensemble") / "sweep"
    for seed in (0, 1, 2):
        trained(sweep / f"{seed}_seed={seed}", ["trainer.max_epochs=2", f"seed={seed}"])
    return sweep


def test_each_member_scores_as_its_own_test_and_the_mean_is_never_worse_in_loss(seeds):
    result = ensemble.ensemble([seeds])
    assert [m.run_dir.name for m in result.members] == ["0_seed=0", "1_seed=1", "2_seed=2"]
    for member in result.members:
        tested = json.loads((member.run_dir / "summary.json").read_text())["test"]
        assert member.acc == pytest.approx(tested["test/acc"], abs=1e-7)  # the same weights, images and labels
        assert member.balanced_acc == pytest.approx(tested["test/balanced_acc"], abs=1e-7)
        assert member.loss == pytest.approx(tested["test/loss"], rel=1e-5)
        assert member.weights.name == "best.pt"
    assert result.examples == 359  # digits' fixed test split
    # -log of a mean of probabilities is at most the mean of -logs (Jensen), example by example
    assert result.loss <= sum(m.loss for m in result.members) / 3 + 1e-12
    assert len({m.loss for m in result.members}) == 3  # the seeds made different models


def test_a_run_with_a_copy_of_itself_is_that_run(seeds, tmp_path):
    one = seeds / "1_seed=1"
    shutil.copytree(one, tmp_path / "copy")
    result = ensemble.ensemble([one, tmp_path / "copy"])
    assert (result.loss, result.acc) == pytest.approx((result.members[0].loss, result.members[0].acc), abs=1e-12)


def test_a_member_given_twice_counts_once_and_a_damaged_summary_is_read_as_unfinished(seeds, tmp_path, capsys):
    """A sweep plus one of its jobs gave that job twice the weight in the mean (5 members of 4 runs), silently; a
    truncated summary.json (a kill while it was written) gave a JSONDecodeError traceback."""
    whole = ensemble.ensemble([seeds])
    again = ensemble.ensemble([seeds, seeds / "0_seed=0", seeds / "0_seed=0"])
    assert [m.run_dir.name for m in again.members] == [m.run_dir.name for m in whole.members]
    assert (again.loss, again.acc) == (whole.loss, whole.acc)
    assert "2 member(s) given more than once, counted once" in capsys.readouterr().err
    damaged = tmp_path / "sweep"
    shutil.copytree(seeds, damaged)
    (damaged / "2_seed=2" / "summary.json").write_text('{"status": "compl')
    capsys.readouterr()
    assert [m.run_dir.name for m in ensemble.ensemble([damaged]).members] == ["0_seed=0", "1_seed=1"]
    assert "left out 1 job(s) of" in capsys.readouterr().err  # as the report, which lists it as not done
    given = ensemble.ensemble([damaged / "2_seed=2", damaged / "1_seed=1"])  # named: taken, with a note
    assert [m.weights.name for m in given.members] == ["best.pt", "best.pt"]
    assert "2_seed=2 did not complete (unknown); its tested weights are taken as they are" in capsys.readouterr().err


def test_a_sweep_ensemble_leaves_out_jobs_that_did_not_complete(seeds, tmp_path, capsys):
    """An interrupted job with a best.pt (one epoch of three) was averaged in silently."""
    sweep = tmp_path / "sweep"
    shutil.copytree(seeds, sweep)
    summary = json.loads((sweep / "1_seed=1" / "summary.json").read_text())
    (sweep / "1_seed=1" / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    capsys.readouterr()
    assert [m.run_dir.name for m in ensemble.ensemble([sweep]).members] == ["0_seed=0", "2_seed=2"]
    assert "left out 1 job(s) of " + str(sweep) + " that did not complete: 1_seed=1 (interrupted)" in (
        capsys.readouterr().err)


def test_the_command_prints_the_table_and_writes_the_csv(seeds, tmp_path, capsys):
    report.main(["ensemble", str(seeds / "0_seed=0"), str(seeds / "2_seed=2"), "--checkpoint", "last",
                 "--csv", str(tmp_path / "e.csv")])
    out = capsys.readouterr().out
    assert "ensemble of 2 runs on 359 test images" in out and "against the best member" in out
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert [r["member"] for r in rows] == [str(seeds / "0_seed=0"), str(seeds / "2_seed=2"), "ensemble"]
    assert [r["weights"] for r in rows[:2]] == ["last.pt", "last.pt"]
    assert set(rows[0]) == {"member", "weights", "test/loss", "test/acc", "test/balanced_acc"}
    assert "test/balanced_acc" in out


def test_runs_tested_on_the_same_images_in_another_order_are_refused(seeds, monkeypatch):
    """The test split was told apart by its images' sum and sum of squares: two images of one class swapped (the
    labels alike) passed, and the mean then averaged each example's probabilities with another image's."""
    from trainlab import data

    build, built = data.build_data, []

    def swapped_in_the_second_run(cfg):
        dataset = build(cfg)
        built.append(dataset)
        if len(built) == 2:
            labels = dataset.test.labels
            i, j = [k for k in range(len(labels)) if labels[k] == labels[0]][:2]
            assert not torch.equal(dataset.test.images[i], dataset.test.images[j])
            dataset.test.images[[i, j]] = dataset.test.images[[j, i]]
        return dataset

    monkeypatch.setattr(data, "build_data", swapped_in_the_second_run)
    with pytest.raises(ConfigError, match="was tested on other images than"):
        ensemble.ensemble([seeds / "0_seed=0", seeds / "1_seed=1"])


def test_runs_that_cannot_be_ensembled_are_refused_with_exit_2(seeds, tmp_path, capsys):
    other = trained(tmp_path / "synthetic", ["trainer.max_epochs=1", "data=synthetic", "data.num_samples=300",
                                             "data.shape=[1,8,8]"])
    with pytest.raises(ConfigError, match="was tested on other images than"):
        ensemble.ensemble([seeds / "0_seed=0", other])
    with pytest.raises(ConfigError, match="at least 2 runs.*; the snapshots of one run .* --checkpoint snapshots"):
        ensemble.ensemble([seeds / "0_seed=0"])
    with pytest.raises(ConfigError, match="summary.json: is a file, not a run or sweep directory"):
        ensemble.ensemble([seeds / "0_seed=0" / "summary.json", seeds])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run directory"):
        ensemble.ensemble([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="no swa weights"):
        ensemble.ensemble([seeds / "0_seed=0", seeds / "1_seed=1"], which="swa")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["ensemble", str(tmp_path / "nowhere"), str(seeds)])
    assert exit_info.value.code == 2 and "nowhere: no such run or sweep directory" in capsys.readouterr().err


# --- relative data paths: those of the directory the run was trained in ---------------------------------


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("cache", [[], ["data.cache_dir=decoded"]], ids=["root_cache", "literal_cache_dir"])
def test_relative_data_paths_are_read_from_the_directory_the_run_was_trained_in(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINLAB_DATA", raising=False)  # data.root is then the relative default, data
    lab, elsewhere = tmp_path / "lab", tmp_path / "elsewhere"
    write_image_folder(lab / "imgs")
    elsewhere.mkdir()
    monkeypatch.chdir(lab)
    run = trained(lab / "run", ["trainer.max_epochs=1", "data=image_folder", "data.path=imgs", "data.image_size=8",
                                *cache])
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(lab)}}}, run / ".hydra" / "hydra.yaml")  # as Hydra writes it
    cached = listing(lab / ("decoded" if cache else "data/cache"))
    assert len(cached) == 1
    shutil.copytree(run, lab / "twin")  # a second member (the same run given twice counts once)
    monkeypatch.chdir(elsewhere)
    result = ensemble.ensemble([run, lab / "twin"])
    tested = json.loads((run / "summary.json").read_text())["test"]
    assert result.members[0].acc == pytest.approx(tested["test/acc"], abs=1e-7)
    assert result.examples == 5  # 0.2 of the 24 images
    assert listing(elsewhere) == []  # no data/cache of its own: the run's cache was read
    assert listing(lab / ("decoded" if cache else "data/cache")) == cached


def test_a_run_without_hydra_record_of_its_cwd_is_read_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    assert ensemble.run_cwd(tmp_path / "run") == tmp_path  # no hydra.yaml
    OmegaConf.save({"hydra": {"job": {"name": "train"}}}, tmp_path / "run" / ".hydra" / "hydra.yaml")
    assert ensemble.run_cwd(tmp_path / "run") == tmp_path  # no hydra.runtime.cwd in it
    OmegaConf.save({"hydra": {"runtime": {"cwd": "/srv/lab"}}}, tmp_path / "run" / ".hydra" / "hydra.yaml")
    assert ensemble.run_cwd(tmp_path / "run") == Path("/srv/lab")


def test_anchoring_changes_relative_paths_only():
    data = OmegaConf.create({"data": {"path": "/images", "root": "store", "cache_dir": "${.root}/cache"}}).data
    ensemble.anchor_data(data, Path("/srv/lab"))
    assert OmegaConf.to_container(data, resolve=True) == {"path": "/images", "root": "/srv/lab/store",
                                                          "cache_dir": "/srv/lab/store/cache"}
    data = OmegaConf.create({"path": "~/images", "root": "/data", "cache_dir": None})
    ensemble.anchor_data(data, Path("/srv/lab"))
    assert OmegaConf.to_container(data) == {"path": "~/images", "root": "/data", "cache_dir": None}
    digits = OmegaConf.create({"name": "digits", "batch_size": 64})
    ensemble.anchor_data(digits, Path("/srv/lab"))
    assert OmegaConf.to_container(digits) == {"name": "digits", "batch_size": 64}


# --- option errors: one line and exit 2, before any run is evaluated ------------------------------------


def command_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        report.main(["ensemble", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(("name", "why"), [(".", "is a directory"), ("missing/e.csv", "no such directory")])
def test_a_csv_that_cannot_be_written_exits_2_before_evaluating(name, why, seeds, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ensemble, "RebuiltRun", lambda *args: pytest.fail("evaluated a run before checking --csv"))
    path = tmp_path / name
    err = command_error([str(seeds), "--csv", str(path)], capsys)
    assert err.startswith(f"trainlab ensemble: --csv {path}: {why}")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no file can be created")
def test_a_failed_csv_write_exits_2_with_its_reason(seeds, capsys):
    err = command_error([str(seeds / "0_seed=0"), str(seeds / "1_seed=1"), "--csv", "/proc/nope.csv"], capsys)
    assert err == "trainlab ensemble: --csv /proc/nope.csv: No such file or directory\n"


@pytest.mark.parametrize(("device", "cuda_devices", "message"), [
    ("bogus", 0, "--device bogus: not a device; choose auto, cpu, cuda, cuda:N or mps"),
    ("cuda", 0, "--device cuda: no CUDA device is available here; use --device cpu or auto"),
    ("cuda:3", 1, "--device cuda:3: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    ("mps", 0, "--device mps: MPS is not available here; use --device cpu or auto"),
])
def test_devices_that_cannot_be_used_exit_2_naming_the_option(device, cuda_devices, message, seeds, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert command_error([str(seeds), "--device", device], capsys) == f"trainlab ensemble: {message}\n"


# --- what a sweep or run lacks, or holds damaged: named, exit 2 with the fix -----------------------------


def test_a_completed_job_without_the_weights_is_left_out_and_named(seeds, tmp_path, capsys):
    """A completed job whose best.pt was deleted was left out of a sweep's ensemble without a word."""
    sweep = tmp_path / "sweep"
    shutil.copytree(seeds, sweep)
    (sweep / "2_seed=2" / "checkpoints" / "best.pt").unlink()
    capsys.readouterr()
    assert [m.run_dir.name for m in ensemble.ensemble([sweep]).members] == ["0_seed=0", "1_seed=1"]
    assert f"left out 1 job(s) of {sweep} without tested weights: 2_seed=2 (no best.pt)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"2_seed=2: no tested weights \(best.pt\) in "):
        ensemble.ensemble([sweep / "2_seed=2", sweep / "1_seed=1"])


def test_a_damaged_config_or_weights_file_exits_2_naming_it_and_the_fix(seeds, tmp_path, capsys):
    """A damaged .hydra/config.yaml gave a YAML traceback (exit 1); a damaged best.pt's message told to pass
    checkpoint.resume=, which this command has not."""
    run = tmp_path / "run"
    shutil.copytree(seeds / "0_seed=0", run)
    config = run / ".hydra" / "config.yaml"
    good = config.read_text()
    config.write_text("model: {name: mlp\n")
    err = command_error([str(run), str(seeds / "1_seed=1")], capsys)
    assert err.startswith(f"trainlab ensemble: {config} cannot be read (") and err.endswith(
        f"restore it, or leave {run} out\n")
    config.write_text("")
    assert "has no data or model group" in command_error([str(run), str(seeds / "1_seed=1")], capsys)
    config.write_text(good)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:2000])
    err = command_error([str(run), str(seeds / "1_seed=1")], capsys)
    assert err.startswith(f"trainlab ensemble: checkpoint {best} is corrupted or incomplete (")
    assert err.endswith(f"; choose another --checkpoint, or leave {run} out\n") and "checkpoint.resume" not in err


def test_the_csv_is_written_whole_or_not_at_all(seeds, tmp_path):
    """The CSV was opened for writing (emptied) before its rows were made: a failure mid-way left a truncated file
    in place of the previous one."""
    result = ensemble.ensemble([seeds / "0_seed=0", seeds / "1_seed=1"])
    path = tmp_path / "e.csv"
    ensemble.write_csv(result, path)
    whole = path.read_text()

    class Full(float):  # a write that fails on the last row, as a full disk does
        def __format__(self, spec):
            raise OSError(28, "No space left on device")

    result.acc = Full(result.acc)
    with pytest.raises(OSError, match="No space left"):
        ensemble.write_csv(result, path)
    assert path.read_text() == whole
    assert [p.name for p in tmp_path.iterdir()] == ["e.csv"]  # no temporary file left
