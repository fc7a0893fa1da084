"""SLURM dispatch through submitit; the only package that imports submitit.

- ``profiles``: cluster profiles (``$LAUNCH_CLUSTERS``, ``~/.config/launch/clusters/``, the
  shipped ones) and the resources one job asks for;
- ``submit``: ONE plan from a command's request to a dry-run text or a submitted job, for
  training runs, sweeps and resumes alike;
- ``jobs``: the job bodies submitit runs on the nodes (``TrainingJob``, ``RaySweepJob``): cheap
  to unpickle, they import torch only once they run;
- ``records``: ``RUN/launch.json``, the record of every submission and attempt;
- ``control``: status, cancel, logs and follow of a run's jobs.

Importing this package imports neither torch nor submitit: ``launch status|logs|cancel`` stay fast.
"""
