"""Running the run list elsewhere than the local DVC queue (SLURM)."""
