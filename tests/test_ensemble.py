"""`trainlab ensemble`: the mean of several runs' predicted probabilities on their common test split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
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
        assert member.loss == pytest.approx(tested["test/loss"], rel=1e-5)
        assert member.weights.name == "best.pt"
    assert result.examples == 359  # digits' fixed test split
    # -log of a mean of probabilities is at most the mean of -logs (Jensen), example by example
    assert result.loss <= sum(m.loss for m in result.members) / 3 + 1e-12
    assert len({m.loss for m in result.members}) == 3  # the seeds made different models


def test_a_run_with_itself_is_that_run(seeds):
    one = seeds / "1_seed=1"
    result = ensemble.ensemble([one, one])
    assert (result.loss, result.acc) == pytest.approx((result.members[0].loss, result.members[0].acc), abs=1e-12)


def test_the_command_prints_the_table_and_writes_the_csv(seeds, tmp_path, capsys):
    report.main(["ensemble", str(seeds / "0_seed=0"), str(seeds / "2_seed=2"), "--checkpoint", "last",
                 "--csv", str(tmp_path / "e.csv")])
    out = capsys.readouterr().out
    assert "ensemble of 2 runs on 359 test images" in out and "against the best member" in out
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    assert [r["member"] for r in rows] == [str(seeds / "0_seed=0"), str(seeds / "2_seed=2"), "ensemble"]
    assert [r["weights"] for r in rows[:2]] == ["last.pt", "last.pt"]


def test_runs_that_cannot_be_ensembled_are_refused_with_exit_2(seeds, tmp_path, capsys):
    other = trained(tmp_path / "synthetic", ["trainer.max_epochs=1", "data=synthetic", "data.num_samples=300",
                                             "data.shape=[1,8,8]"])
    with pytest.raises(ConfigError, match="was tested on other images than"):
        ensemble.ensemble([seeds / "0_seed=0", other])
    with pytest.raises(ConfigError, match="at least 2 runs"):
        ensemble.ensemble([seeds / "0_seed=0"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a run directory"):
        ensemble.ensemble([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="no swa weights"):
        ensemble.ensemble([seeds / "0_seed=0", seeds / "1_seed=1"], which="swa")
    with pytest.raises(SystemExit) as exit_info:
        report.main(["ensemble", str(tmp_path / "nowhere"), str(seeds)])
    assert exit_info.value.code == 2 and "nowhere: no such run or sweep directory" in capsys.readouterr().err
