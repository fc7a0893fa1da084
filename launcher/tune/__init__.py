"""Ray Tune sweeps; the only package that imports ray (always lazily).

- ``driver``: ``run_sweep(trial, grid, path, ...)``, a grid of trials on local Ray or on a Ray
  cluster, restored when interrupted; ``read_trials``;
- ``ray_cluster``: the Ray processes of one node of a SLURM job (``launcher.slurm.jobs.RaySweepJob``).
"""
