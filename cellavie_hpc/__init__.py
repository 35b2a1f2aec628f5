"""cellavie-hpc: train, scale and measure the CellAvIe holographic malaria-detection chain on Slurm clusters."""

__version__ = "0.1.0"
