"""Sweeps: failed jobs, unique directories, the parallel and submitit launchers, Optuna, resume, the report."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_cfg, run_cli
from hydra_plugins.trainlab_sweeps import parallel
from hydra_plugins.trainlab_sweeps.slurm import RESUME_OVERRIDE, ResumableLocalLauncher
from trainlab import checkpoint, report
from trainlab.config import ConfigError, register_configs
from trainlab.sweep import objective_value

TINY = ["trainer.max_epochs=1", "model.hidden=[16]", "logger.tensorboard=false"]


def hydra_node(overrides: list[str]):
    """The `hydra` node of the config that `train -m <overrides>` composes."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra


def summaries(sweep: Path) -> dict[str, dict]:
    """Job directory name -> its summary.json."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- whole sweeps through the command line -----------------------------------------------------------


def test_a_failing_job_does_not_stop_the_sweep_and_the_report_names_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "data.batch_size=32,0,64", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    jobs = summaries(sweep)
    assert [s["status"] for s in jobs.values()] == ["completed", "failed", "completed"]
    failed = next(name for name, s in jobs.items() if s["status"] == "failed")
    assert "data.batch_size=0" in jobs[failed]["error"]
    output = result.stdout + result.stderr
    assert "1 of 3 jobs did not complete" in output and f"{failed}: failed (invalid config: data.batch_size=0: must be at least 1)" in output
    rows = read_csv(sweep / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]  # ranked, the failure last
    assert [r["rank"] for r in rows] == ["1", "2", ""]
    assert float(rows[0]["val/loss"]) <= float(rows[1]["val/loss"])
    assert rows[2]["reason"] == "invalid config: data.batch_size=0: must be at least 1"
    assert (sweep / "sweep_summary.md").read_text().count("| failed |") == 1
    assert (sweep / "sweep_val_loss.png").stat().st_size > 0


@pytest.mark.slow  # 8 s: two sweeps
def test_two_sweeps_started_together_get_their_own_directories(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = [sys.executable, "-m", "trainlab", "-m", "dry_run=true", "optimizer=adam"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 2  # seconds, then microseconds: "2025-01-01_12-00-00.123456"
    for sweep in sweeps:
        assert [p.name for p in sweep.iterdir() if p.is_dir()] == ["0_optimizer=adam"]


@pytest.mark.slow  # about 30 s on 2 busy cores: 4 fresh processes that each import torch
def test_parallel_launcher_runs_4_jobs_2_at_a_time_each_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.launcher.cpus=2",
                      "seed=0,1,2,3", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = summaries(sweep)
    assert len(jobs) == 4 and all(s["status"] == "completed" for s in jobs.values())
    pids = {s["process"]["pid"] for s in jobs.values()}
    assert len(pids) == 4 and os.getpid() not in pids  # a fresh process per job
    assert {s["process"]["torch_threads"] for s in jobs.values()} == {1}  # 2 cores shared by 2 jobs at a time
    assert "2 jobs at a time, 1 threads each" in result.stdout + result.stderr
    assert len(read_csv(sweep / "sweep_summary_over_seeds.csv")) == 1  # seeds were swept: one group


def test_submitit_local_launcher_runs_the_job_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=slurm_local", "data.batch_size=32", *TINY,
                      f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (job,) = summaries(sweep).values()
    assert job["status"] == "completed" and job["process"]["pid"] != os.getpid()
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # submitit's own record of the job


def test_a_requeued_slurm_job_resumes_its_own_run():
    launcher = ResumableLocalLauncher(submitit_folder="unused")
    args = (["optimizer=adam", "sweep.resume=false"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    delayed = launcher.checkpoint(*args)
    assert delayed.function is launcher
    assert delayed.args == (["optimizer=adam", RESUME_OVERRIDE], *args[1:])
    exclude = hydra_node(["hydra/launcher=slurm"]).job.config.override_dirname.exclude_keys
    assert "sweep.resume" in exclude  # the requeued job keeps its directory name, so it finds its last.pt


def test_slurm_launcher_documents_its_knobs():
    launcher = hydra_node(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).launcher
    assert launcher._target_ == "hydra_plugins.trainlab_sweeps.slurm.ResumableSlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.array_parallelism) == ("gpu", 1, 32)
    assert launcher.max_num_timeout > 0  # jobs that hit the time limit are requeued


OPTUNA = ["-m", "hparams_search=optuna", "hydra.sweeper.sampler.seed=1", "regularization.dropout=choice(0.0,1.5)",
          *TINY]  # dropout=1.5 is refused by validation: with this sampler seed, only the 2nd of 3 trials draws it


def test_optuna_search_records_a_failed_trial_as_failed(tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    result = run_cli([*OPTUNA, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    study = optuna.load_study(study_name="trainlab", storage=f"sqlite:///{sweep}/optuna.db")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE]
    assert study.trials[1].value is None and study.trials[1].params["regularization.dropout"] == 1.5
    for trial, summary in zip(study.trials, summaries(sweep).values()):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == pytest.approx(summary["best"]["val/loss"])  # sweep.objective=best/val/loss
        else:
            assert summary["status"] == "failed"
    space = study.trials[0].distributions
    assert isinstance(space["optimizer.lr"], optuna.distributions.LogUniformDistribution)
    assert isinstance(space["regularization.weight_decay"], optuna.distributions.LogUniformDistribution)
    assert isinstance(space["data.batch_size"], optuna.distributions.IntLogUniformDistribution)
    assert "1 of 3 jobs did not complete" in result.stdout + result.stderr


@pytest.mark.slow  # two searches
def test_an_interrupted_optuna_search_resumes_its_study(tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    run_cli([*OPTUNA, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    storage = f"sqlite:///{sweep}/optuna.db"
    study = optuna.load_study(study_name="trainlab", storage=storage)
    study.ask()  # a trial left running, as by a search killed mid-trial
    result = run_cli([*OPTUNA, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert "3 trials stored, 1 to go" in result.stdout + result.stderr
    study = optuna.load_study(study_name="trainlab", storage=storage)
    states = [t.state for t in study.trials]
    assert states[2] == optuna.trial.TrialState.FAIL and states[3] != optuna.trial.TrialState.RUNNING
    assert study.trials[3].params != study.trials[0].params  # a new point, not a replay of the first trial
    assert sorted(int(p.parent.name.split("_")[0]) for p in sweep.glob("*/summary.json")) == [0, 1, 3]


@pytest.mark.slow  # 26 s: a sweep and its resume
def test_sweep_resume_skips_completed_jobs_and_resumes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", "trainer.max_epochs=2", "model.hidden=[16]", "logger.tensorboard=false",
            f"hydra.sweep.dir={sweep}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    done, cut = sorted(p for p in sweep.iterdir() if p.is_dir())
    # Make job 1 look interrupted after its first epoch: its summary and its last.pt say so.
    last = cut / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    state.update(epoch=1, finished=False)
    torch.save(state, last)
    summary = json.loads((cut / "summary.json").read_text())
    (cut / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    before = (done / "summary.json").read_text()

    # A resume the job refuses (its last.pt says another optimizer) fails that job and leaves its Hydra record as it
    # was: Hydra rewrites it before the job starts, and trainlab report and ensemble rebuild the run from it.
    torch.save({**state, "optimizer_class": "Adam"}, last)
    record = {p.name: p.read_bytes() for p in (cut / ".hydra").iterdir()}
    (cut / ".hydra" / "overrides.yaml").write_bytes(b"- seed=1\n- the job's own record\n")
    record["overrides.yaml"] = (cut / ".hydra" / "overrides.yaml").read_bytes()
    result = run_cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert result.returncode == 1 and "was trained with Adam" in result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in (cut / ".hydra").iterdir()} == record
    torch.save(state, last)

    result = run_cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (done / "summary.json").read_text() == before  # skipped: not run again
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [done.name, cut.name]  # same directories
    resumed = json.loads((cut / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["epochs_run"] == 2
    assert "resumed from" in (cut / "train.log").read_text()
    assert [r["status"] for r in read_csv(sweep / "sweep_summary.csv")] == ["completed", "completed"]


# --- the report on a sweep of known results ----------------------------------------------------------


def fake_job(sweep: Path, name: str, overrides: list[str], status: str, val_loss: float | None = None,
             curve: list[float] = (), test_acc: float | None = None) -> None:
    """A job directory as a sweep leaves it: summary.json, metrics.csv and .hydra/config.yaml."""
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("early_stopping:\n  monitor: val/loss\n  mode: min\n")
    if status == "unfinished":
        (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        return
    best = {"epoch": len(curve), "val/loss": val_loss, "val/acc": 0.9} if val_loss is not None else None
    (job / "summary.json").write_text(json.dumps({
        "status": status, "stop_reason": "r", "best_epoch": len(curve) or None, "best": best,
        "test": {"test/loss": 0.5, "test/acc": test_acc} if test_acc is not None else None,
        "wall_time_s": 2.0, "overrides": overrides}))
    with (job / "metrics.csv").open("w") as handle:
        handle.write("epoch,val/loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(curve)))


@pytest.fixture
def known_sweep(tmp_path) -> Path:
    """optimizer=sgd,adam x seed=0,1,2: adam better on average; one sgd seed failed; one job never finished."""
    sweep = tmp_path / "sweep"
    results = {("sgd", 0): 0.40, ("sgd", 1): 0.50, ("adam", 0): 0.30, ("adam", 1): 0.20, ("adam", 2): 0.31}
    num = 0
    for optimizer in ("sgd", "adam"):
        for seed in (0, 1, 2):
            overrides = [f"optimizer={optimizer}", f"seed={seed}", "trainer.max_epochs=2"]
            name = f"{num}_optimizer={optimizer},seed={seed}"
            if (optimizer, seed) in results:
                loss = results[optimizer, seed]
                fake_job(sweep, name, overrides, "completed", loss, [loss * 2, loss], test_acc=1 - loss)
            else:
                fake_job(sweep, name, overrides, "diverged")
            num += 1
    fake_job(sweep, "6_optimizer=nadam,seed=0", ["optimizer=nadam", "seed=0", "trainer.max_epochs=2"],
             "unfinished")
    return sweep


def test_report_ranks_jobs_and_gives_mean_and_std_over_seeds(known_sweep):
    result = report.write_report(known_sweep)
    assert (result.metric, result.mode) == ("val/loss", "min")
    assert [j.name.split("_")[0] for j in result.jobs] == ["4", "3", "5", "0", "1", "2", "6"]
    assert [j.status for j in result.jobs[-2:]] == ["diverged", "unfinished"]
    assert result.varying == ["optimizer", "seed"]
    adam, sgd, nadam = result.groups
    assert adam.overrides == ["optimizer=adam", "trainer.max_epochs=2"]
    mean, std, n = adam.stats["val/loss"]
    assert (mean, std, n) == (pytest.approx(0.27), pytest.approx(statistics.stdev([0.3, 0.2, 0.31])), 3)
    assert sgd.stats["val/loss"] == (pytest.approx(0.45), pytest.approx(0.0707107, abs=1e-6), 2)
    assert sgd.stats["test/acc"][0] == pytest.approx(0.55)
    assert nadam.stats["val/loss"][2] == 0 and math.isnan(nadam.stats["val/loss"][0])

    rows = read_csv(known_sweep / "sweep_summary.csv")
    assert [(r["rank"], r["job"].split("_")[0], r["status"]) for r in rows][:3] == [
        ("1", "4", "completed"), ("2", "3", "completed"), ("3", "5", "completed")]
    assert rows[0]["val/loss"] == "0.2000" and rows[0]["test/acc"] == "0.8000"
    groups = read_csv(known_sweep / "sweep_summary_over_seeds.csv")
    assert [(g["rank"], g["completed"]) for g in groups] == [("1", "3/3"), ("2", "2/3"), ("", "0/1")]
    assert groups[0]["val/loss mean"] == "0.2700" and groups[0]["val/loss std"] == "0.0608"
    markdown = (known_sweep / "sweep_summary.md").read_text()
    assert "| 1 | optimizer=adam trainer.max_epochs=2 | 0 1 2 | 3/3 | 0.2700 ± 0.0608 |" in markdown
    assert (known_sweep / "sweep_val_loss.png").stat().st_size > 0


def test_report_by_another_metric_and_mode(known_sweep):
    result = report.build_report(known_sweep, metric="test/acc")
    assert result.mode == "max"
    assert [j.name.split("_")[0] for j in result.jobs][:3] == ["4", "3", "5"]
    with pytest.raises(ValueError, match="metric 'val/accuracy' is in no job's summary; choose one of"):
        report.build_report(known_sweep, metric="val/accuracy")


def test_a_metric_no_job_has_exits_2_even_where_every_job_failed(tmp_path, capsys):
    """--metric test/acc on a sweep whose jobs all failed exited 0 with no job ranked."""
    sweep = tmp_path / "sweep"
    for name in ("0_a", "1_b"):
        fake_job(sweep, name, [name], "failed")
    with pytest.raises(SystemExit) as stop:
        report.main(["report", str(sweep), "--metric", "test/acc"])
    assert stop.value.code == 2
    assert "metric 'test/acc' is in no job's summary; no job of this sweep has any value yet" in capsys.readouterr().err


def test_report_ranks_by_the_snapshot_ensemble_of_each_job(tmp_path):
    sweep = tmp_path / "sweep"
    for num, acc in enumerate((0.90, 0.95)):
        fake_job(sweep, f"{num}_seed={num}", [f"seed={num}"], "completed", 0.3, [0.3], test_acc=0.9)
        summary = json.loads((sweep / f"{num}_seed={num}" / "summary.json").read_text())
        summary["snapshot_ensemble"] = {"members": 3, "test/loss": 1 - acc, "test/acc": acc}
        (sweep / f"{num}_seed={num}" / "summary.json").write_text(json.dumps(summary))
    result = report.build_report(sweep, metric="test/snapshot_ensemble_acc")
    assert result.mode == "max" and [j.name for j in result.jobs] == ["1_seed=1", "0_seed=0"]
    assert result.jobs[0].values["test/snapshot_ensemble_loss"] == pytest.approx(0.05)


def test_the_plot_averages_the_completed_seeds_the_tables_do_and_skips_non_finite_points(tmp_path):
    """A seed with a NaN val/loss in its curve made statistics.stdev raise: no plot, no table, `trainlab report`
    exit 1; and a failed seed's curve went into its group's mean, with n counting it."""
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0_lr=0.1,seed=0", ["optimizer.lr=0.1", "seed=0"], "completed", 0.5, [0.9, 0.5, 0.4])
    fake_job(sweep, "1_lr=0.1,seed=1", ["optimizer.lr=0.1", "seed=1"], "failed", None, [3.0, 4.85])
    fake_job(sweep, "2_lr=0.1,seed=2", ["optimizer.lr=0.1", "seed=2"], "completed", 0.6, [0.7, float("nan"), 0.6])
    fake_job(sweep, "3_lr=1,seed=0", ["optimizer.lr=1", "seed=0"], "completed", 0.8, [0.8, float("inf")])
    result = report.write_report(sweep)
    assert (sweep / "sweep_val_loss.png").is_file()
    series = {label: (epochs, mean) for label, epochs, mean, _ in report.val_loss_series(result)}
    assert series["optimizer.lr=0.1 (n=2)"] == ([1, 2, 3], [pytest.approx(0.8), 0.5, pytest.approx(0.5)])
    assert series["optimizer.lr=1 (n=1)"] == ([1], [0.8])
    result.groups = None  # one line per job: a non-finite point is a gap
    lines = {label: mean for label, _, mean, _ in report.val_loss_series(result)}
    assert math.isnan(lines["2 optimizer.lr=0.1"][1]) and math.isnan(lines["3 optimizer.lr=1"][1])


def test_the_report_ignores_every_key_left_out_of_directory_names():
    """A sweep resumed with logger.grad_norm=false split each group of seeds in two: the report ignored only some
    of the keys conf/train.yaml leaves out of directory names."""
    excluded = OmegaConf.load(Path(CONF_DIR) / "train.yaml").hydra.job.config.override_dirname.exclude_keys
    assert {key for key in excluded if not key.startswith("hydra.")} <= set(report.IGNORED_KEYS)


def test_report_command(known_sweep, tmp_path, capsys):
    report.main(["report", str(known_sweep), "--metric", "val/acc"])
    out = capsys.readouterr().out
    assert "7 jobs ranked by best val/acc (max)" in out and "mean ± std over seeds" in out
    with pytest.raises(SystemExit) as exit_info:
        report.main(["report", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "no such sweep directory" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(SystemExit):
        report.main(["report", str(tmp_path / "file.txt")])
    assert "file.txt: is a file, not a sweep directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        report.main(["report", str(tmp_path / "empty")])
    assert "holds no job directories" in capsys.readouterr().err
    job = known_sweep / "0_optimizer=sgd,seed=0"  # one run: named as such, and its sweep when Hydra recorded one
    with pytest.raises(SystemExit):
        report.main(["report", str(job)])
    assert "is a single run's directory, and a report ranks the jobs of a sweep: give a sweep's directory" in (
        capsys.readouterr().err)
    (known_sweep / "multirun.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["report", str(job)])
    assert exit_info.value.code == 2 and f"give the sweep it belongs to, {known_sweep}" in capsys.readouterr().err


def test_report_without_swept_seeds_draws_one_line_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0_optimizer=sgd", ["optimizer=sgd"], "completed", 0.4, [0.9, 0.4], test_acc=0.8)
    fake_job(sweep, "1_optimizer=adam", ["optimizer=adam"], "failed")
    result = report.write_report(sweep)
    assert result.groups is None and not (sweep / "sweep_summary_over_seeds.csv").exists()
    assert [j.status for j in result.jobs] == ["completed", "failed"]
    assert result.jobs[0].curve == [(1, 0.9), (2, 0.4)]


# --- pure parts ---------------------------------------------------------------------------------------


def test_objective_is_read_from_the_summary():
    summary = {"best": {"epoch": 3, "val/loss": 0.25, "val/acc": 0.9}, "test": {"test/acc": 0.8}}
    assert objective_value(summary, "best/val/loss") == 0.25
    assert objective_value(summary, "test/test/acc") == 0.8
    assert objective_value({"best": None}, "best/val/loss") is None
    with pytest.raises(ConfigError, match="sweep.objective='val_loss'.*best/val/loss"):
        objective_value(summary, "val_loss")


def test_slots_give_each_worker_a_gpu_and_a_share_of_the_cores(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    # Hydra's plugin discovery re-executes plugin modules: look their names up at call time.
    slot_environments, LaunchError = parallel.slot_environments, parallel.LaunchError
    slots = slot_environments(n_jobs=None, gpus=[0, 2], jobs_per_gpu=2, cpus=16)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["4", "4", "6", "6"]  # physical ids, two jobs per GPU
    assert {s["OMP_NUM_THREADS"] for s in slots} == {"4"}
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slot_environments(3, None, 1, 6)] == ["4", "5", "6"]
    cpu = slot_environments(n_jobs=4, gpus=[], jobs_per_gpu=1, cpus=2)
    assert cpu == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}] * 4
    with pytest.raises(LaunchError, match=r"n_jobs=5: the pool has 2 GPU\(s\) x jobs_per_gpu=2 = 4 slots"):
        slot_environments(5, [0, 1], 2, 8)
    with pytest.raises(LaunchError, match=r"gpus=\[3\]: \[3\] not among the 3 visible GPU"):
        slot_environments(None, [3], 1, 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert [s.get("CUDA_VISIBLE_DEVICES") for s in slot_environments(None, None, 1, 4)] == [None, None]


def test_an_interrupted_job_stops_the_sweep_with_its_exit_code(tmp_path):
    from types import SimpleNamespace

    from trainlab.sweep import run_sweep_job

    cfg = compose_cfg(["trainer.max_epochs=1"])
    ran = []

    def interrupted(cfg, run_dir, overrides):
        ran.append(run_dir)
        return "interrupted", 143, SimpleNamespace(summary={"status": "interrupted"}, started=True)

    with pytest.raises(SystemExit) as stop:
        run_sweep_job(cfg, tmp_path / "0_seed=0", ["seed=0"], interrupted)
    assert stop.value.code == 143 and ran == [tmp_path / "0_seed=0"]


def test_report_tables_print_overrides_and_paths_as_they_are(tmp_path):
    from rich.console import Console

    sweep = tmp_path / "[bold]sweep"
    fake_job(sweep, "0_root=a", ["data.root=/d/[red]a"], "completed", 0.4, [0.4], test_acc=0.8)
    fake_job(sweep, "1_root=b", ["data.root=/d/[/b]"], "completed", 0.5, [0.5], test_acc=0.7)
    console = Console(width=300, record=True, color_system=None)
    report.write_report(sweep, console=console)
    out = console.export_text()
    assert "data.root=/d/[red]a" in out and "data.root=/d/[/b]" in out and f"{sweep}: 2 jobs ranked" in out
    assert f"in {sweep}" in out


def test_a_job_refused_for_its_config_is_reported_with_what_was_refused(tmp_path):
    """The sweep's list of failed jobs and the report's reason said only "invalid config"."""
    job = tmp_path / "sweep" / "0_data.train_size=5"
    job.mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps({
        "status": "failed", "stop_reason": "invalid config",
        "error": "invalid config:\n  - data.train_size=5: give at least 10"}))
    assert report.read_job(job).reason == "invalid config: data.train_size=5: give at least 10"
