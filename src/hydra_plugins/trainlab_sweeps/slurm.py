"""hydra/launcher=slurm (and slurm_local): hydra-submitit-launcher, with jobs that resume when SLURM requeues them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

RESUME_OVERRIDE = "sweep.resume=true"  # left out of the job's directory name, so the requeued job finds its own


class _Resumable:
    """Mixed into submitit's launchers: trainlab's resolvers on the node; requeued jobs resume their last.pt."""

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> Any:
        from trainlab.config import register_configs  # trainlab's resolvers name the job's directory

        register_configs()
        self._keep_record(sweep_overrides, job_num, singleton_state)
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)  # type: ignore[misc]

    def _keep_record(self, sweep_overrides: list[str], job_num: int, singleton_state: dict) -> None:
        """The job directory's Hydra record as it is before run_job rewrites it (a requeued or resumed job's), to be
        put back if its resume is refused (trainlab.cli.restore_record)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.singleton import Singleton
        from hydra.core.utils import setup_globals
        from omegaconf import open_dict

        from trainlab.cli import keep_record

        Singleton.set_state(singleton_state)
        setup_globals()
        loader = self.hydra_context.config_loader  # type: ignore[attr-defined]
        config = loader.load_sweep_config(self.config, list(sweep_overrides))  # type: ignore[attr-defined]
        with open_dict(config):
            config.hydra.job.num = job_num
        HydraConfig.instance().set_config(config)
        keep_record(Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir))

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """On preemption or timeout, submitit requeues this: the same job, told to resume its own run."""
        overrides = [o for o in sweep_overrides if not o.startswith("sweep.resume=")] + [RESUME_OVERRIDE]
        return super().checkpoint(overrides, *args, **kwargs)  # type: ignore[misc]


class ResumableSlurmLauncher(_Resumable, SlurmLauncher):
    pass


class ResumableLocalLauncher(_Resumable, LocalLauncher):
    pass
