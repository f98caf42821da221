"""hparams_search=optuna: hydra-optuna-sweeper with its study stored in the sweep directory, resumable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def resumed_seed(seed: int, stored: int) -> int:
    """The sampler's seed for a search resumed with `stored` trials: the seed alone would replay its first trials.
    Mixed (numpy's SeedSequence), so that it is no other search's plain seed either."""
    import numpy as np

    return int(np.random.SeedSequence([seed, stored]).generate_state(1)[0])


class ResumableOptunaSweeper(OptunaSweeper):
    """A rerun into the same hydra.sweep.dir continues the stored study up to hydra.sweeper.n_trials trials.

    Trials left running by an interrupted search are marked failed; finished and failed trials count
    towards n_trials, and the new trials' job directories are numbered after the earlier ones. A seeded
    sampler continues with a seed derived from its seed and the trials stored, so the new trials are new
    points (and a resumed search is as repeatable as a fresh one). A search in which no trial succeeded
    ends without best parameters; the report callback then names the failed jobs and exits 1.
    """

    def sweep(self, arguments: list[str]) -> Any:
        import optuna

        impl = self.sweeper
        Path(str(impl.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # the SQLite file lives there
        if impl.storage is not None:
            study = optuna.create_study(study_name=impl.study_name, storage=impl.storage, load_if_exists=True,
                                        directions=impl._get_directions())
            trials = study.get_trials(deepcopy=False)
            for trial in trials:
                if trial.state == optuna.trial.TrialState.RUNNING:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            if trials:
                impl.n_trials = max(0, impl.n_trials - len(trials))
                impl.job_idx = max(impl.job_idx, len(trials))
                seeded = ""
                seed = OmegaConf.select(impl.config, "hydra.sweeper.sampler.seed", default=None)
                if seed is not None:
                    new_seed = resumed_seed(seed, len(trials))
                    impl.sampler = instantiate(impl.config.hydra.sweeper.sampler, seed=new_seed)
                    seeded = f"; the sampler continues with seed {new_seed} (from seed {seed} and {len(trials)} trials)"
                log.info(f"Resuming study {study.study_name}: {len(trials)} trials stored, {impl.n_trials} to go"
                         + seeded)
        try:
            return super().sweep(arguments)
        except ValueError:  # optuna's study.best_trial, read at the end, when no trial completed
            if not self._no_trial_succeeded():
                raise
            return None

    def _no_trial_succeeded(self) -> bool:
        """Whether the stored study's trials all ended and none completed (so it has no best trial)."""
        import optuna

        impl = self.sweeper
        if impl.storage is None:
            return False
        states = {t.state for t in optuna.load_study(study_name=impl.study_name, storage=impl.storage).trials}
        State = optuna.trial.TrialState
        return bool(states) and not states & {State.COMPLETE, State.RUNNING}
