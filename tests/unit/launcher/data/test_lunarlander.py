"""LunarLander generation with gymnasium and its memory-mapped reader."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.box2d.lunar_lander import heuristic
from PIL import Image

from launcher.data import lunarlander_generate
from launcher.data.lunarlander import LunarLanderFrames
from launcher.data.lunarlander_generate import STATE_FIELDS, episode_seeds, generate_lunarlander
from launcher.errors import ConfigError, DataError

# Small episodes so a couple of hundred frames hold several of them.
ARGS = dict(num_frames=240, size=64, agent="random", seed=3, max_episode_steps=40)


ARRAY_FILES = ("frames.npy", "states.npy", "episodes.npy", "steps.npy")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data set generated in-process, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("ll") / "data"
    return generate_lunarlander(root, num_workers=1, **ARGS)


def _write_fake(root: Path, states: np.ndarray, episodes: np.ndarray, size: int = 64) -> Path:
    """A hand-made data set with chosen states and episode ids (frames are blank)."""
    root.mkdir()
    n = len(states)
    np.save(root / "frames.npy", np.zeros((n, size, size, 3), np.uint8))
    np.save(root / "states.npy", np.asarray(states, np.float32))
    np.save(root / "episodes.npy", np.asarray(episodes, np.int64))
    steps = np.concatenate([np.arange(c) for c in np.unique(episodes, return_counts=True)[1]])
    np.save(root / "steps.npy", steps.astype(np.int32))
    meta = {
        "format_version": lunarlander_generate.FORMAT_VERSION,
        "num_frames": n,
        "size": size,
        "state_fields": list(STATE_FIELDS),
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_files_shapes_dtypes_and_meta(dataset: Path) -> None:
    assert sorted(p.name for p in dataset.iterdir()) == sorted([*ARRAY_FILES, "meta.json"])
    frames = np.load(dataset / "frames.npy", mmap_mode="r")
    assert frames.dtype == np.uint8 and frames.shape == (240, 64, 64, 3)
    assert np.load(dataset / "states.npy").dtype == np.float32
    assert np.load(dataset / "states.npy").shape == (240, 8)
    assert np.load(dataset / "episodes.npy").dtype == np.int64
    assert np.load(dataset / "steps.npy").dtype == np.int32
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["env_id"] == "LunarLander-v3"
    assert meta["gymnasium_version"] == gym.__version__
    assert (
        meta["state_fields"]
        == list(STATE_FIELDS)
        == ["x", "y", "vx", "vy", "angle", "angular_velocity", "left_leg_contact", "right_leg_contact"]
    )
    for key in ("num_frames", "size", "agent", "seed", "max_episode_steps"):
        assert meta[key] == ARGS[key]
    assert meta["num_workers"] == 1 and meta["format_version"] == lunarlander_generate.FORMAT_VERSION
    assert "created" in meta
    # Frames are real renders, not blank: sky (black), moon (white) and the purple lander.
    assert frames.min() == 0 and frames.max() == 255


def test_reader_gives_the_stored_rows(dataset: Path) -> None:
    data = LunarLanderFrames(dataset)
    states = np.load(dataset / "states.npy")
    assert len(data) == 240 and data.size == 64 and data.meta["seed"] == 3
    frame = data.frame(17)
    assert frame.dtype == np.uint8 and frame.shape == (64, 64, 3)
    np.testing.assert_array_equal(frame, np.load(dataset / "frames.npy")[17])
    assert data.state(17).dtype == np.float32
    np.testing.assert_array_equal(data.state(17), states[17])
    assert data.episode(239) == int(np.load(dataset / "episodes.npy")[239])
    assert isinstance(data.frames, np.memmap)


def test_episodes_reset(dataset: Path) -> None:
    episodes = np.load(dataset / "episodes.npy")
    steps = np.load(dataset / "steps.npy")
    ids = np.unique(episodes)
    assert len(ids) >= 5  # at most 41 frames per episode
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    assert np.all(np.diff(episodes) >= 0)
    starts = np.flatnonzero(np.diff(episodes)) + 1
    assert np.all(steps[starts] == 0) and steps[0] == 0
    # Within an episode the counter goes up by one; a reset frame plus at most 40 steps.
    same = np.diff(episodes) == 0
    assert np.all(np.diff(steps)[same] == 1)
    assert steps.max() <= 40


@pytest.mark.parametrize("agent", ["heuristic", "random"])
def test_frame_and_state_describe_the_same_instant(tmp_path: Path, agent: str) -> None:
    """Replay the first two seeded episodes by hand: reset/step, then render, then compare."""
    seed, steps_per_episode = 11, 5
    out = generate_lunarlander(
        tmp_path / "d",
        12,
        agent=agent,
        num_workers=1,
        seed=seed,
        max_episode_steps=steps_per_episode,
    )
    data = LunarLanderFrames(out)
    env = gym.make("LunarLander-v3", render_mode="rgb_array", max_episode_steps=steps_per_episode)
    i = 0
    for episode in range(2):
        env_seed, action_seed = episode_seeds(seed, episode)
        obs, _ = env.reset(seed=env_seed)
        env.action_space.seed(action_seed)
        for step in range(steps_per_episode + 1):
            expected = Image.fromarray(env.render()).resize((64, 64), Image.Resampling.BICUBIC)
            np.testing.assert_array_equal(data.frame(i), np.asarray(expected))
            np.testing.assert_array_equal(data.state(i), obs)
            assert (data.episode(i), int(data.steps[i])) == (episode, step)
            action = heuristic(env, obs) if agent == "heuristic" else env.action_space.sample()
            obs, _, terminated, truncated, _ = env.step(action)
            i += 1
        assert truncated or terminated
    env.close()


def test_lander_pixels_sit_where_the_state_says(dataset: Path) -> None:
    """Independent of seeding: the purple lander's centroid matches the stored (x, y)."""
    data = LunarLanderFrames(dataset)
    errors = []
    for i in range(len(data)):
        x, y = data.state(i)[:2]
        if not (abs(x) < 0.9 and -0.3 < y < 1.3):
            continue
        f = data.frame(i).astype(int)
        lander = (f[..., 2] > f[..., 0] + 40) & (f[..., 2] > f[..., 1] + 40)
        rows, cols = np.nonzero(lander)
        # Screen is 600x400 px, 30 px per unit; y=0 is the helipad plus the leg length.
        expected_col = (x + 1) * 32 - 0.5
        expected_row = (400 - (y * 200 + 100 + 18)) / 400 * 64 - 0.5
        errors.append((cols.mean() - expected_col, rows.mean() - expected_row))
    errors = np.abs(np.array(errors))
    assert len(errors) > 100
    assert np.median(errors) < 0.75 and errors.max() < 4


def test_same_arrays_whatever_the_number_of_workers(dataset: Path, tmp_path: Path) -> None:
    out = generate_lunarlander(tmp_path / "d", num_workers=2, **ARGS)
    for name in ARRAY_FILES:
        assert (out / name).read_bytes() == (dataset / name).read_bytes(), name
    assert json.loads((out / "meta.json").read_text())["num_workers"] == 2


def test_a_different_seed_gives_different_frames(dataset: Path, tmp_path: Path) -> None:
    out = generate_lunarlander(tmp_path / "d", 20, num_workers=1, seed=4, max_episode_steps=40)
    assert not np.array_equal(np.load(out / "states.npy"), np.load(dataset / "states.npy")[:20])


def test_refuses_to_overwrite(dataset: Path) -> None:
    before = (dataset / "frames.npy").read_bytes()
    match = r"already exists.*Delete it or choose another --out"
    with pytest.raises(ConfigError, match=match) as err:
        generate_lunarlander(dataset, 10, num_workers=1)
    assert str(dataset) in str(err.value)
    assert (dataset / "frames.npy").read_bytes() == before


def test_refuses_a_non_empty_directory_but_fills_an_empty_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="taken"):
        generate_lunarlander(taken, 3, num_workers=1)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.INFO, logger="launcher.data.lunarlander_generate"):
        generate_lunarlander(empty, 3, num_workers=1)
    assert len(LunarLanderFrames(empty)) == 3
    assert "3/3 frames (100%)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = lunarlander_generate._run_episode
    calls = []

    def fail_on_third(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(lunarlander_generate, "_run_episode", fail_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_lunarlander(tmp_path / "d", 200, num_workers=1, max_episode_steps=20)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []  # neither `d` nor the hidden partial directory


def test_interrupted_pool_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = lunarlander_generate._write_episode
    calls = []

    def fail_on_second(*args: object) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(lunarlander_generate, "_write_episode", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        generate_lunarlander(tmp_path / "d", 200, num_workers=2, max_episode_steps=20)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(size=70), r"size 70 is not supported.*--size 64 or --size 80"),
        (dict(size=48), "size 48 is not supported"),
        (dict(size=65), "size 65 is not supported"),
        (dict(agent="greedy"), "unknown LunarLander agent 'greedy'"),
        (dict(num_workers=0), "--workers must be at least 1"),
        (dict(num_frames=0), "--frames must be at least 1"),
        (dict(seed=-1), "--seed must be a non-negative"),
        (dict(max_episode_steps=0), "max_episode_steps must be at least 1"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = dict(num_frames=10, num_workers=1) | kwargs
    with pytest.raises(ConfigError, match=match):
        generate_lunarlander(tmp_path / "d", **args)
    assert list(tmp_path.iterdir()) == []


def test_larger_valid_size(tmp_path: Path) -> None:
    data = LunarLanderFrames(generate_lunarlander(tmp_path / "d", 2, size=80, num_workers=1))
    assert data.size == 80 and data.frame(1).shape == (80, 80, 3)


def test_reader_error_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*launch data lunarlander --frames"):
        LunarLanderFrames(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["states.npy", "meta.json", "frames.npy"])
def test_reader_error_missing_file(dataset: Path, tmp_path: Path, name: str) -> None:
    root = Path(shutil.copytree(dataset, tmp_path / "copy"))
    (root / name).unlink()
    with pytest.raises(DataError, match=rf"{name} is missing.*Delete .*launch data lunarlander"):
        LunarLanderFrames(root)


@pytest.mark.parametrize(
    ("meta_text", "match"),
    [
        ("{not json", "cannot be read as JSON"),
        ("[1, 2]", "lacks format_version"),
        ('{"format_version": 1}', "lacks num_frames, size, state_fields"),
    ],
)
def test_reader_error_corrupt_meta(dataset: Path, tmp_path: Path, meta_text: str, match: str) -> None:
    root = Path(shutil.copytree(dataset, tmp_path / "copy"))
    (root / "meta.json").write_text(meta_text)
    with pytest.raises(DataError, match=match):
        LunarLanderFrames(root)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(format_version=99), "format version 99, but this code reads version 1"),
        (dict(num_frames=241), r"meta.json implies"),
        (dict(size=80), r"frames.npy holds uint8 \(240, 64, 64, 3\)"),
        (dict(state_fields=["x", "y"]), "lists state fields"),
    ],
)
def test_reader_error_meta_disagrees(dataset: Path, tmp_path: Path, change: dict, match: str) -> None:
    root = Path(shutil.copytree(dataset, tmp_path / "copy"))
    meta = json.loads((root / "meta.json").read_text()) | change
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=match):
        LunarLanderFrames(root)


def test_reader_error_truncated_array(dataset: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(dataset, tmp_path / "copy"))
    data = (root / "states.npy").read_bytes()
    (root / "states.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="states.npy"):
        LunarLanderFrames(root)


def test_on_screen_mask_bounds_are_inclusive(tmp_path: Path) -> None:
    xy = [(0, 0), (-1, -0.59), (1, 1.41), (1.01, 0), (-1.01, 0), (0, -0.6), (0, 1.42), (0.5, 2)]
    states = np.zeros((len(xy), 8), np.float32)
    states[:, :2] = xy
    data = LunarLanderFrames(_write_fake(tmp_path / "d", states, np.zeros(len(xy))))
    np.testing.assert_array_equal(data.on_screen_mask(), [True, True, True, False, False, False, False, False])


def lander_pixels(frames: np.ndarray) -> np.ndarray:
    """Per frame, the pixels of the lander's violet body (blue well above green), which nothing else is."""
    rgb = frames.astype(np.int16)
    return ((rgb[..., 2] - rgb[..., 1] > 40) & (rgb[..., 2] > 120)).sum(axis=(1, 2))


def test_the_on_screen_mask_matches_where_the_rendered_lander_is(tmp_path: Path) -> None:
    """The random agent often flies off the top: every frame the mask keeps shows the lander, and a
    frame it drops shows at most a part of it (its centre is past an edge)."""
    root = tmp_path / "frames"
    generate_lunarlander(root, num_frames=400, size=64, seed=3, num_workers=1)
    data = LunarLanderFrames(root)
    pixels, mask = lander_pixels(np.asarray(data.frames)), data.on_screen_mask()
    assert 0 < mask.sum() < len(mask)  # some of each
    assert pixels[mask].min() > 0
    assert pixels[~mask].max() < np.median(pixels[mask])


def test_split_by_episode_keeps_episodes_whole(dataset: Path) -> None:
    data = LunarLanderFrames(dataset)
    episodes = np.load(dataset / "episodes.npy")
    first, second = data.split_by_episode(0.25)
    np.testing.assert_array_equal(np.sort(np.concatenate([first, second])), np.arange(240))
    assert not set(episodes[first]) & set(episodes[second])
    assert episodes[first].max() < episodes[second].min()  # the last episodes are held out
    num_episodes = len(np.unique(episodes))
    assert len(np.unique(episodes[second])) == max(1, round(0.25 * num_episodes))


def test_split_by_episode_counts(tmp_path: Path) -> None:
    episodes = np.repeat(np.arange(10), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    data = LunarLanderFrames(_write_fake(tmp_path / "d", np.zeros((39, 8)), episodes))
    first, second = data.split_by_episode(0.2)
    np.testing.assert_array_equal(np.unique(episodes[second]), [8, 9])
    np.testing.assert_array_equal(first, np.arange(31))
    # A tiny fraction still holds out one episode, a large one still keeps one.
    assert set(episodes[data.split_by_episode(0.01)[1]]) == {9}
    assert set(episodes[data.split_by_episode(0.99)[0]]) == {0}
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="fraction"):
            data.split_by_episode(bad)


def test_split_by_episode_needs_two_episodes(tmp_path: Path) -> None:
    data = LunarLanderFrames(_write_fake(tmp_path / "d", np.zeros((4, 8)), np.zeros(4)))
    with pytest.raises(DataError, match="single episode"):
        data.split_by_episode(0.5)


def _in_own_mounts(tmp_path: Path, mount_options: str, *launch_args: str) -> tuple[int, str, list[str]]:
    """``launch ARGS`` with ``tmp_path/disk`` a tmpfs of its own: (exit code, stderr, what is left in disk/small).

    A mount namespace of our own (``unshare -rm``) needs no privileges where user namespaces are allowed.
    """
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a tmpfs of the test's own")
    disk = tmp_path / "disk"
    disk.mkdir()
    (tmp_path / "small").mkdir()
    launch = f"import sys; from launcher.cli import main; sys.exit(main({list(launch_args)!r}))"
    script = (
        f'mount -t tmpfs -o {mount_options} tmpfs "{disk}" || exit 99; '
        f'"{sys.executable}" -c "$0" 2>"{tmp_path}/err"; code=$?; ls -A "{disk}" > "{tmp_path}/left"; exit $code'
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, launch], cwd=tmp_path, timeout=300)
    if proc.returncode == 99:
        pytest.skip("this machine does not let an unprivileged mount namespace mount a tmpfs")
    return proc.returncode, (tmp_path / "err").read_text(), (tmp_path / "left").read_text().split()


def test_a_full_disk_is_one_paragraph_naming_the_space_and_leaves_nothing(tmp_path: Path) -> None:
    # 300 frames of 64 x 64 take 3.5 MiB: more than the 1 MB disk, which once killed the process with SIGBUS.
    code, err, left = _in_own_mounts(
        tmp_path, "size=1m", "data", "lunarlander", "--frames", "300", "--out", "disk/small/g", "--workers", "1"
    )
    assert code == 2, err
    (message,) = [line for line in err.splitlines() if line.startswith("launch data: error: ")]
    assert "no space on the disk of disk/small" in message and "need 3.5 MiB" in message
    assert "--out on a larger disk" in message and "Traceback" not in err
    assert left == []  # no `.g.partial-*`, not even the folder `small` this call made


def test_a_read_only_folder_is_one_paragraph(tmp_path: Path) -> None:
    code, err, left = _in_own_mounts(tmp_path, "ro", "data", "lunarlander", "--frames", "3", "--out", "disk/g")
    assert code == 2 and "cannot write the LunarLander set into disk (Read-only file system" in err
    assert "Traceback" not in err and left == []


def test_an_out_below_a_file_is_one_paragraph(tmp_path: Path, capsys) -> None:
    from tests.helpers import launch

    (tmp_path / "FILE").write_text("")
    assert launch("data lunarlander --frames 3 --workers 1 --out", tmp_path / "FILE" / "x") == 2
    assert "cannot write the LunarLander set into" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_a_frame_stride_keeps_every_nth_step_of_the_same_episodes(tmp_path: Path) -> None:
    every = generate_lunarlander(tmp_path / "every", 60, num_workers=1, seed=4, agent="random", max_episode_steps=30)
    strided = generate_lunarlander(
        tmp_path / "strided", 20, num_workers=1, seed=4, agent="random", max_episode_steps=30, frame_stride=3
    )
    full, sparse = LunarLanderFrames(every), LunarLanderFrames(strided)
    assert json.loads((strided / "meta.json").read_text())["frame_stride"] == 3
    first = np.flatnonzero(np.asarray(sparse.episodes) == 0)
    assert np.asarray(sparse.steps)[first].tolist() == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30][: len(first)]
    # The same seeded episode: the states at those steps are the full set's. The frames are too,
    # but for the engine's flame: gymnasium ages its particles only when a frame is drawn.
    same = np.flatnonzero(np.asarray(full.episodes) == 0)[::3][: len(first)]
    np.testing.assert_array_equal(np.asarray(sparse.states)[first], np.asarray(full.states)[same])
    differ = (np.asarray(sparse.frames)[first] != np.asarray(full.frames)[same]).any(axis=-1)
    assert differ.mean() < 0.01
