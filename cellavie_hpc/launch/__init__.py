"""Launch: sweeps, submitit submission, sbatch rendering, and the job environment (rank, world size)."""
