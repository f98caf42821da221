"""How sweeps and searches end: every trial failed, an objective that cannot work, a resumed seeded search, and a stop
signal that arrives during a run's test, after its last training step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF_DIR, compose_cfg, run_cli
from trainlab.config import ConfigError, register_configs

TINY = ["data=synthetic", "data.num_samples=400", "data.shape=[1,8,8]", "trainer.max_epochs=1", "model.hidden=[16]",
        "logger.tensorboard=false"]
SEARCH = ["-m", "hparams_search=optuna", *TINY]


def trials(sweep: Path) -> list:
    import optuna

    return optuna.load_study(study_name="trainlab", storage=f"sqlite:///{sweep}/optuna.db").trials


@pytest.mark.slow  # 14 s; test_sweeps.py's optuna test covers a failed trial in the default run
def test_a_search_whose_trials_all_fail_ends_with_the_report_and_exit_1(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SEARCH, "hydra.sweeper.n_trials=2", "trainer.max_epochs=0", f"hydra.sweep.dir={sweep}"]
    for attempt in ("first", "rerun into the same directory"):
        result = run_cli(args, cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 1, (attempt, output)
        assert "Traceback" not in output and "Record does not exist" not in output
        assert "2 of 2 jobs did not complete" in output and output.count(": failed (invalid config: trainer.max_epochs=0") == 2
        assert result.stdout.strip().splitlines()[-1].endswith(  # the last word
            "no trial succeeded: none of the 2 jobs gave sweep.objective=best/val/loss a value, so the search has no "
            "best parameters")
        assert (sweep / "sweep_summary.csv").read_text().count(",failed,") == 2
    assert len(trials(sweep)) == 2 and not (sweep / "optimization_results.yaml").exists()


@pytest.mark.parametrize("override, message", [
    ("sweep.objective=best/val/los", "sweep.objective=best/val/los: no summary.json holds it; choose one of "
                                     "best/val/loss, best/val/acc, best/val/balanced_acc, test/test/loss, "
                                     "test/test/acc, test/test/balanced_acc"),
    ("sweep.objective=best/val/acc", "sweep.objective=best/val/acc improves when it gets higher, but "
                                     "hydra.sweeper.direction=minimize searches for its lowest value; set "
                                     "hydra.sweeper.direction=maximize"),
])
def test_an_objective_that_cannot_work_is_refused_before_any_trial(tmp_path, override, message):
    sweep = tmp_path / "sweep"
    result = run_cli([*SEARCH, override, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert not sweep.exists()  # nothing trained, no directory made


def test_objective_check_reads_the_monitor_and_the_direction():
    from hydra import compose, initialize_config_dir

    from trainlab.sweep import check_objective

    def cfg(*overrides: str):
        register_configs()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=["hparams_search=optuna", *overrides],
                           return_hydra_config=True)

    check_objective(cfg("sweep.objective=best/val/acc", "hydra.sweeper.direction=maximize"))
    check_objective(cfg("sweep.objective=test/test/loss"))
    check_objective(cfg("sweep.objective=best/train/loss", "early_stopping.monitor=train/loss"))
    with pytest.raises(ConfigError, match="choose one of best/val/loss, best/val/acc, best/val/balanced_acc, test/"):
        check_objective(cfg("sweep.objective=best/train/loss"))  # not in summary.json unless monitored
    with pytest.raises(ConfigError, match="set hydra.sweeper.direction=minimize"):
        check_objective(cfg("sweep.objective=test/test/loss", "hydra.sweeper.direction=maximize"))
    check_objective(compose_cfg(["sweep.objective=best/val/acc"]))  # a job's config: no sweeper to check


@pytest.mark.slow  # 18 s: two searches
def test_a_resumed_seeded_search_proposes_new_points(tmp_path):
    seeded = [*SEARCH, "hydra.sweeper.sampler.seed=0"]
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    assert run_cli([*seeded, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={resumed}"], cwd=tmp_path).returncode == 0
    result = run_cli([*seeded, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={resumed}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_cli([*seeded, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={fresh}"], cwd=tmp_path).returncode == 0
    first, second = (t.params for t in trials(resumed))
    assert second != first  # before: the re-seeded sampler replayed trial 0
    assert [t.params for t in trials(fresh)] == [first]  # a fresh seeded search stays repeatable
    assert "1 trials stored, 1 to go; the sampler continues with seed" in result.stdout


# --- a stop signal during the test phase ---------------------------------------------------------------

SIGNAL_IN_TEST = """\
import os, signal, sys
from trainlab import run
from trainlab.cli import main

tested = run.Run.test
def test(self):  # the signal arrives after the last training step, while the test runs
    os.kill(os.getpid(), signal.{signal})
    tested(self)
run.Run.test = test
sys.argv = ["train", *sys.argv[1:]]
main()
"""


def train_signalled_in_test(args: list[str], cwd: Path, signal_name: str = "SIGINT") -> subprocess.CompletedProcess:
    script = cwd / "signal_in_test.py"
    script.write_text(SIGNAL_IN_TEST.format(signal=signal_name))
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_signalled_during_its_test_finishes_it_and_exits_like_an_interrupted_run(tmp_path, monkeypatch,
                                                                                        signum, code):
    from trainlab import run
    from trainlab.run import execute

    tested = run.Run.test

    def test(self):
        os.kill(os.getpid(), signum)
        tested(self)

    monkeypatch.setattr(run.Run, "test", test)
    status, exit_code, done = execute(compose_cfg(TINY), tmp_path / "run", TINY)
    assert (status, exit_code) == ("completed", code)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test"]["test/acc"] is not None


@pytest.mark.slow  # 14 s: a sweep and its resume
def test_a_sweep_signalled_during_a_jobs_test_stops_after_that_job_and_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    result = train_signalled_in_test(args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 130, output
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0"]  # job 1 never started
    assert json.loads((jobs[0] / "summary.json").read_text())["status"] == "completed"
    assert f"hydra.sweep.dir={sweep} sweep.resume=true" in output and "(it finished first: completed)" in output
    assert not (sweep / "sweep_summary.csv").exists()  # stopped like an interrupted sweep: no report
    result = run_cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sweep.resume: skipped, completed in an earlier sweep" in result.stdout + result.stderr
    assert [json.loads(p.read_text())["status"] for p in sorted(sweep.glob("*/summary.json"))] == ["completed"] * 2


def test_a_single_run_signalled_during_its_test_writes_its_summary_and_exits_143(tmp_path):
    result = train_signalled_in_test([*TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, "SIGTERM")
    assert result.returncode == 143, result.stdout + result.stderr
    assert "SIGTERM after training: the run finished its test and summary.json" in result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


SIGNAL_BETWEEN_JOBS = """\
import os, signal, sys
from trainlab import sweep
from trainlab.cli import main

recorded = sweep._record_process
def record(run_dir):  # the job's run has ended and its handlers are gone; the next job has not started
    recorded(run_dir)
    os.kill(os.getpid(), signal.SIGTERM)
sweep._record_process = record
sys.argv = ["train", *sys.argv[1:]]
main()
"""


def test_a_sweep_signalled_between_two_jobs_exits_143_with_the_command_that_continues_it(tmp_path):
    """Between jobs (outside any run's handlers) SIGTERM ended a basic-launcher sweep on the spot, saying nothing."""
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    script = tmp_path / "signal_between_jobs.py"
    script.write_text(SIGNAL_BETWEEN_JOBS)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 143 and "Traceback" not in output, output
    assert "interrupted (SIGTERM) outside the training loop" in output, output
    assert f"continue the sweep with the same command plus hydra.sweep.dir={sweep} sweep.resume=true" in output
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0"]  # job 1 never started
    result = run_cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [json.loads(p.read_text())["status"] for p in sorted(sweep.glob("*/summary.json"))] == ["completed"] * 2


@pytest.mark.slow  # 10 s: three sweeps
def test_a_sweep_into_a_directory_whose_jobs_trained_is_refused_unless_resumed(tmp_path):
    """Every job was refused (its directory holds a run) and the report showed the old results, exit 0."""
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]
    assert run_cli(args, cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2
    assert f"hydra.sweep.dir={sweep} already holds a sweep (2 jobs trained); continue it with sweep.resume=true" in (
        result.stdout + result.stderr)
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before  # nothing written
    assert run_cli([*args, "sweep.resume=true"], cwd=tmp_path).returncode == 0


def test_a_sweep_that_fails_before_any_job_leaves_no_directory(tmp_path):
    """Hydra writes multirun.yaml before it composes the jobs; an unknown option among the values failed after."""
    result = run_cli(["-m", "optimizer=adamm,sgd", *TINY], cwd=tmp_path)
    assert result.returncode == 2 and "optimizer/adamm" in result.stderr
    assert not (tmp_path / "outputs").exists()
