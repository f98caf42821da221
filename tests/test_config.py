"""Every option of every group composes and builds; the command line refuses bad input before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR, GROUPS, compose_cfg, run_cli
from trainlab.augment import build_augment, build_v2_transform
from trainlab.config import AUGMENT_POLICIES, ConfigError, validate
from trainlab.data import build_data
from trainlab.initialization import initialize
from trainlab.models import build_model
from trainlab.optim import build_optimizer
from trainlab.schedules import build_scheduler

# Options that need another group's choice: instance norm is for feature maps (the default model is an MLP).
NEEDS = {("normalization", "instance"): ["model=cnn", "model.width=8"],
         **{("augmentation", policy): ["data.loader=dataloader"] for policy in AUGMENT_POLICIES}}
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))]
# Data options that read files (absent offline) are composed and validated here; tests/test_data.py writes tiny
# files in each one's real format and builds and trains every one of them.
FILE_DATA = {"mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "svhn", "image_folder"}
NEEDS[("data", "image_folder")] = ["data.path=images"]


def test_every_group_of_the_product_card_exists():
    expected = {"data", "model", "optimizer", "scheduler", "normalization", "regularization", "augmentation",
                "initialization", "trainer", "early_stopping", "checkpoint", "logger"}
    assert expected <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_builds(group, option):
    cfg = compose_cfg([f"{group}={option}", *NEEDS.get((group, option), [])])
    validate(cfg)
    if cfg.data.name in FILE_DATA:
        pytest.skip("reads dataset files: composed and validated; built and trained in tests/test_data.py")
    data = build_data(cfg.data)
    model = build_model(cfg, data.input_shape, data.num_classes)
    initialize(model, cfg.initialization, model.activation)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=10, max_epochs=cfg.trainer.max_epochs)
    images = data.train.images[:8].float()
    if cfg.augmentation.policy is None:  # the device path: one batched function
        augment = build_augment(cfg.augmentation, data.num_classes, data.input_shape)
        if augment is not None:
            out, targets = augment(images, data.train.labels[:8], torch.Generator().manual_seed(0))
            assert out.shape == images.shape and targets.shape[0] == 8
    else:  # torchvision's per-image policies exist only on the DataLoader path
        assert build_v2_transform(cfg.augmentation)(data.train.images[0]).shape == images.shape[1:]
    logits = model(images)
    assert logits.shape == (8, data.num_classes)
    assert scheduler.get_last_lr()[0] > 0


def test_digits_split_sizes_follow_the_fractions():
    data = build_data(compose_cfg(["data.val_fraction=0.25"]).data)
    assert len(data.test) == round(0.2 * 1797)
    assert len(data.val) == round(0.25 * (1797 - len(data.test)))
    assert len(data.train) + len(data.val) + len(data.test) == 1797


def test_derived_values_are_interpolations():
    cfg = compose_cfg(["seed=7"])
    assert cfg.data.split_seed == 7
    assert compose_cfg(["seed=7", "data.split_seed=3"]).data.split_seed == 3


def test_target_outside_the_allowlist_is_refused():
    cfg = compose_cfg(["model._target_=os.system"])
    with pytest.raises(ConfigError, match="os.system"):
        validate(cfg)


def test_help_lists_groups_and_options(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    for group, option in OPTIONS:
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{group}:"))
        assert option in line
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_the_config_without_running(tmp_path):
    result = run_cli(["--cfg", "job", "optimizer=adam"], cwd=tmp_path)
    assert result.returncode == 0
    assert "torch.optim.Adam" in result.stdout and "max_epochs: 30" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.max_epoch=3"], "Key 'max_epoch' not in 'TrainerConfig'"),
        (["optimizer=adamm"], "Could not find 'optimizer/adamm'"),
        (["trainer.max_epochs=three"], "trainer.max_epochs"),
    ],
    ids=["misspelt-key", "unknown-option", "wrong-type"],
)
def test_hydra_refuses_bad_overrides_before_any_work_with_exit_2(tmp_path, args, message):
    """Hydra's own exit code for these is 1, that of an error during a run."""
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.max_epochs=0"], "trainer.max_epochs=0: must be at least 1"),  # refused by validate
        (["trainer.device=cuda:7"], "trainer.device=cuda:7"),  # refused while the run is built
    ],
    ids=["bad-value", "missing-device"],
)
def test_invalid_config_exits_2_and_leaves_no_run_directory(tmp_path, args, message):
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model._target_=os.system"], "'os.system' is not allowed"),
        (["model=cnn", "model.depth=21"], "model.depth=21"),
        (["optimizer=adam", "optimizer.betas=[0.9]"], "optimizer.betas=[0.9]: must be a list of 2 numbers"),
        (["model.hidden=[0]"], "model.hidden=[0]: give the hidden layers' widths"),
        (["trainer.on_nonfinite=skip", "trainer.nonfinite_check=interval"],
         "on_nonfinite=skip skips a step before its update, which needs each step's verdict"),
    ],
    ids=["target-allowlist", "bad-depth", "short-betas", "zero-width", "skip-needs-step"],
)
def test_invalid_config_fails_with_exit_code_2_before_training(tmp_path, args, message):
    """The same path as the command line's (whose exit and clean directory the test above checks), in-process."""
    from trainlab.run import execute

    status, code, run = execute(compose_cfg(args), tmp_path / "run", args)
    assert (status, code) == ("failed", 2) and not run.started
    assert message in run.summary["error"]
    # refused by validate, before a device was chosen (it said "auto"), or while building, on the device chosen
    assert run.summary["device"] == (None if not hasattr(run, "device") else str(run.device))
    assert (run.summary["device"] is None) == (args[0] in ("model._target_=os.system", "optimizer=adam",
                                                            "trainer.on_nonfinite=skip"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+trainer.max_epoch=3"], "trainer.max_epoch: no such key; did you mean trainer.max_epochs?"),
        (["+sede=1"], "sede: no such key; did you mean seed?"),
        (["+data.val_frac=0.2"], "data.val_frac: no such key; did you mean data.val_fraction?"),
        (["+model.hiden=[32]"], "model.hiden: no such key; did you mean model.hidden?"),
        (["model=cnn", "+model.hidden=[32]"], "model.hidden: no such key"),
        (["normalization=batch", "+normalization.num_groups=4"], "normalization.num_groups: no such key"),
        (["+sweep.objectiv=best/val/acc"], "sweep.objectiv: no such key; did you mean sweep.objective?"),
    ],
    ids=["schema", "root", "data", "model-target", "other-models-key", "other-options-key", "plain-group"],
)
def test_keys_added_with_plus_must_exist(overrides, message):
    """Hydra suggests `+key=value` for a key it does not know; a misspelt one would then train with the default."""
    with pytest.raises(ConfigError, match="invalid config") as error:
        validate(compose_cfg(overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=abc"], "optimizer.lr='abc': must be a number"),
        (["optimizer=adam", "optimizer.betas=[0.9,0.99,0.999]"], "must be a list of 2 numbers, e.g. [0.9, 0.999]"),
        (["optimizer=adam", "optimizer.amsgrad=3"], "optimizer.amsgrad=3: must be true or false"),
        (["model=cnn", "model.residual=maybe"], "model.residual='maybe': must be true or false"),
        (["model.negative_slope=abc"], "model.negative_slope='abc': must be a number"),
        (["normalization.eps=abc"], "normalization.eps='abc': must be a number > 0"),
        (["normalization.momentum=2"], "normalization.momentum=2: is the weight of each new batch"),
        (["normalization=group", "normalization.num_groups=abc"], "normalization.num_groups='abc': must be a whole"),
        (["initialization=constant", "initialization.value=abc"], "initialization.value='abc': must be a number"),
        (["initialization=normal", "initialization.std=abc"], "initialization.std='abc': must be a number > 0"),
    ],
    ids=["lr", "betas", "amsgrad", "residual", "slope", "norm-eps", "norm-momentum", "groups", "init-value",
         "init-std"],
)
def test_wrongly_typed_values_are_named_before_anything_is_built(overrides, message):
    """A wrong type in a group torch builds would otherwise fail deep inside torch, naming neither key nor fix."""
    with pytest.raises(ConfigError, match="invalid config") as error:
        validate(compose_cfg(overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["normalization.momentum=0"], "normalization.momentum=0: is the weight of each new batch in the running "
                                       "statistics, in (0, 1] (null: an equal-weight average of all batches); 0 would "
                                       "keep them at mean 0, variance 1"),
        (["regularization.ema_warmup=true"], "regularization.ema_warmup=True: ramps the decay of an EMA, and "
                                             "regularization.ema_decay is null (no EMA)"),
        (["regularization.swa_lr=0.5"], "regularization.swa_lr=0.5: is the lr of the SWA epochs, and "
                                        "regularization.swa_start is null (no SWA)"),
        (["model=cnn", "normalization.name=none"],
         "normalization.name=none: an option of normalization is chosen as normalization=none (the config group, "
         "which brings that option's keys); normalization.name= renames the option composed and keeps its keys "
         "(normalization.momentum, normalization.eps). Write normalization=none"),
        (["seed=9223372036854775808"], "seed=9223372036854775808: a seed is a whole number from 0 to 2**32 - 1"),
        (["seed=-1"], "seed=-1: a seed is a whole number from 0 to 2**32 - 1"),
        (["data=synthetic", "data.seed=4294967296"], "data.seed=4294967296: a seed is a whole number from 0 to 2**32"),
    ],
    ids=["norm-momentum-0", "ema-warmup-alone", "swa-lr-alone", "norm-name", "seed-2**63", "seed-negative",
         "data-seed-2**32"],
)
def test_values_that_would_do_nothing_or_harm_silently_are_refused(overrides, message):
    """Each ran with exit 0: momentum 0 froze the running statistics (val/loss 1.52 against 0.11), the other two
    changed nothing; normalization.name=none was refused naming keys the user never typed. seed=2**63 failed in
    torch.manual_seed after the run directory was made (exit 1)."""
    with pytest.raises(ConfigError, match="invalid config") as error:
        validate(compose_cfg(overrides))
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 2  # that one problem alone


def test_a_wrong_kind_only_where_the_default_says_what_is_right():
    validate(compose_cfg(["optimizer=adam", "optimizer.betas=[0.8,0.99]", "optimizer.lr=1", "+optimizer.foreach=true",
                          "normalization.momentum=null"]))  # a whole number is a number; foreach's default is null


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hidden=abc"], "model.hidden='abc': give the hidden layers' widths as a list of whole numbers"),
        (["model.hidden=[64,2.5]"], "model.hidden=[64, 2.5]"),
        (["model=cnn", "model.width=0"], "model.width=0: must be a whole number >= 1"),
        (["model=cnn", "model.stages=1.5"], "model.stages=1.5: must be a whole number >= 1"),
    ],
    ids=["hidden-text", "hidden-fraction", "width", "stages"],
)
def test_model_sizes_must_be_whole_numbers(overrides, message):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as error:
        build_model(cfg, (1, 8, 8) if cfg.model.get("hidden") is not None else (3, 8, 8), 10)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.decay_norm_and_bias=abc"], "optimizer.decay_norm_and_bias='abc': must be true or false"),
        (["optimizer=momentum_schedule", "optimizer.momentum_start=abc"], "optimizer.momentum_start='abc': must be a"),
    ],
    ids=["decay-norm-and-bias", "momentum-start"],
)
def test_trainlab_optimizer_keys_refuse_wrong_types(overrides, message):
    with pytest.raises(ConfigError) as error:
        build_optimizer(compose_cfg(overrides), torch.nn.Linear(2, 2))
    assert message in str(error.value)


def test_regular_install_ships_the_config_tree(tmp_path):
    """A non-editable install (a built wheel) runs `train --cfg job` from an unrelated directory."""
    import subprocess
    import sys
    import zipfile

    import shutil

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # build from a copy: setuptools leaves build/ behind in the tree it builds
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("trainlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for group, option in OPTIONS:
        assert f"trainlab/conf/{group}/{option}.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    code = "import sys, trainlab, trainlab.cli; print(trainlab.__file__); sys.argv = ['train', '--cfg', 'job']; trainlab.cli.main()"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(target))  # the wheel's copy, not the source checkout
    assert "trainlab.models.MLP" in result.stdout


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_trains_two_steps(group, option, train_inprocess):
    """Each option through the whole run: with batches of 512, one epoch of digits is two optimizer steps."""
    if compose_cfg([f"{group}={option}", *NEEDS.get((group, option), [])]).data.name in FILE_DATA:
        pytest.skip("reads dataset files: trained on tiny files in tests/test_data.py")
    overrides = [f"{group}={option}", "trainer.max_epochs=1", "data.batch_size=512", "logger.tensorboard=false",
                 *NEEDS.get((group, option), [])]
    if (group, option) == ("data", "synthetic"):
        overrides += ["data.num_samples=1600", "data.shape=[3,8,8]"]  # 1024 training images: two batches
    status, code, run = train_inprocess(overrides)
    assert (status, code) == ("completed", 0), run.summary.get("error")
    assert run.step == 2
    assert 0.0 <= run.summary["test"]["test/acc"] <= 1.0


def test_a_refused_run_leaves_the_users_own_directories(tmp_path):
    """Only the default outputs/runs and outputs, when the refused run leaves them empty, are removed with it."""
    (tmp_path / "mine" / "project").mkdir(parents=True)
    result = run_cli(["data.batch_size=0", f"hydra.run.dir={tmp_path / 'mine' / 'project' / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["project"]
    assert not (tmp_path / "mine" / "project" / "run").exists()


@pytest.mark.parametrize("again", [["model=cnn"], pytest.param(["dry_run=true"], marks=pytest.mark.slow)],
                         ids=["new-run", "dry-run"])
def test_a_refused_run_in_a_directory_that_holds_one_writes_nothing_there(tmp_path, again):
    """Refused inside the run, it came after Hydra had rewritten the old run's .hydra/ record and train.log."""
    run_dir = tmp_path / "run"
    assert run_cli(["trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_cli([*again, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 2 and f"{run_dir} already holds a run (metrics.csv" in result.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args, key", [(["trainer.max_epochs=1"], "hydra.run.dir"),
                                       (["-m", "seed=0,1", "trainer.max_epochs=1"], "hydra.sweep.dir")])
def test_a_run_or_sweep_directory_that_cannot_be_made_exits_2_with_one_line(tmp_path, args, key):
    """Hydra made it and failed with a traceback, exit 1."""
    (tmp_path / "afile").write_text("")
    where = tmp_path / "afile" / "out"
    result = run_cli([*args, f"{key}={where}"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"train: cannot make the directory {where} (Not a directory); choose another {key}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
