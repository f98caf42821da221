"""trainlab's Hydra plugins: a local parallel launcher with a device pool, SLURM jobs that resume when requeued,
and an Optuna sweeper whose study lives in the sweep directory."""
