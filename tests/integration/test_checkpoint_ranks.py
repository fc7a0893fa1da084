"""Two ranks (gloo on CPU): each hashes the files it wrote when a checkpoint is sealed, and a resume is
verified by rank 0 alone, which shares its verdict."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from launcher import checkpoint
from tests.helpers import make_image_folder, tiny_experiment


def train_then_resume(rank: int, world: int, port: int, raw: dict, run: str, logs: str) -> None:
    """One rank: train 3 steps with a checkpoint each, then build a new trainer and resume it."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    from launcher.experiment import experiment_from_dict
    from launcher.trainer import Trainer

    hashed: dict[str, list[str]] = {"train": [], "resume": []}
    phase = "train"
    sha256 = checkpoint._sha256
    checkpoint._sha256 = lambda path: hashed[phase].append(str(path)) or sha256(path)
    Trainer(experiment_from_dict(raw), Path(run)).fit()
    phase = "resume"
    trainer = Trainer(experiment_from_dict(raw), Path(run))
    resumed = trainer.resume()
    Path(logs, f"rank_{rank}.json").write_text(json.dumps({**hashed, "step": trainer.state.step, "resumed": resumed}))


def test_each_rank_hashes_what_it_wrote_and_rank_0_alone_verifies_a_resume(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "images", per_class=8)
    raw = tiny_experiment("mae", images, train={"num_epochs": 1, "checkpoint_every": 1, "num_checkpoints_kept": 3})
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        train_then_resume, args=(2, port, raw, str(run), str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    ranks = [json.loads((tmp_path / f"rank_{k}.json").read_text()) for k in range(2)]
    assert all(r["resumed"] and r["step"] == 3 for r in ranks)

    # Sealing: each file of each of the 3 checkpoints hashed once, by the rank that wrote it.
    names = {k: [Path(p).name for p in r["train"]] for k, r in enumerate(ranks)}
    assert names[1] == ["random_states_1.pkl"] * 3
    assert "random_states_1.pkl" not in names[0] and len(names[0]) == 3 * len(set(names[0]))
    assert all(Path(p).parent.name.startswith(checkpoint.TMP_PREFIX) for r in ranks for p in r["train"])
    # The resume: rank 0 read the newest checkpoint once; rank 1 took its word.
    newest = checkpoint.checkpoint_path(run, 3)
    assert sorted(ranks[0]["resume"]) == sorted(str(p) for p in newest.iterdir() if p.name != checkpoint.MANIFEST)
    assert ranks[1]["resume"] == []
