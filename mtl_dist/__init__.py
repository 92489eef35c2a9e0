"""mtl_dist: multi-task fine-tuning of a shared encoder, from one CPU to a Slurm cluster."""

__version__ = "0.1.0"
