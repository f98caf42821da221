"""hparams_search=optuna: hydra-optuna-sweeper with its study stored in the sweep directory, resumable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    """A rerun into the same hydra.sweep.dir continues the stored study up to hydra.sweeper.n_trials trials.

    Trials left running by an interrupted search are marked failed; finished and failed trials count
    towards n_trials, and the new trials' job directories are numbered after the earlier ones.
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
                log.info(f"Resuming study {study.study_name}: {len(trials)} trials stored, {impl.n_trials} to go")
        return super().sweep(arguments)
