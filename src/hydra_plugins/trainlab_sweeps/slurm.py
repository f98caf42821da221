"""hydra/launcher=slurm (and slurm_local): hydra-submitit-launcher, with jobs that resume when SLURM requeues them."""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

RESUME_OVERRIDE = "sweep.resume=true"  # left out of the job's directory name, so the requeued job finds its own


class _Resumable:
    """Mixed into submitit's launchers: trainlab's resolvers on the node; requeued jobs resume their last.pt."""

    def __call__(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        from trainlab.config import register_configs  # trainlab's resolvers name the job's directory

        register_configs()
        return super().__call__(sweep_overrides, *args, **kwargs)  # type: ignore[misc]

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        """On preemption or timeout, submitit requeues this: the same job, told to resume its own run."""
        overrides = [o for o in sweep_overrides if not o.startswith("sweep.resume=")] + [RESUME_OVERRIDE]
        return super().checkpoint(overrides, *args, **kwargs)  # type: ignore[misc]


class ResumableSlurmLauncher(_Resumable, SlurmLauncher):
    pass


class ResumableLocalLauncher(_Resumable, LocalLauncher):
    pass
