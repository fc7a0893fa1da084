"""Generating LunarLander frame data sets with gymnasium, in worker processes.

A data set is a directory holding ``frames.npy`` (uint8 [N, size, size, 3]), ``states.npy``
(float32 [N, 8]), ``episodes.npy`` (int64 [N]), ``steps.npy`` (int32 [N]) and ``meta.json``.
Row i of every array describes one instant: the frame rendered right after a reset or step
and the observation that reset or step returned. The rows are episodes 0, 1, 2, ... of a
seeded stream laid end to end, the last one cut where ``num_frames`` is reached. This module
writes that format and defines it (``ARRAYS``, ``STATE_FIELDS``); ``lunarlander.py`` reads it.

Unlike the reference generator (perceptual-autoencoders.md, sections 4 and 8), frames and
states are not shifted by one step, episodes are reset when they end, and every episode is
seeded, so the same arguments give the same arrays whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image

from launcher.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ENV_ID = "LunarLander-v3"
FORMAT_VERSION = 1
STATE_FIELDS: tuple[str, ...] = (
    "x",
    "y",
    "vx",
    "vy",
    "angle",
    "angular_velocity",
    "left_leg_contact",
    "right_leg_contact",
)
# mixed: even episodes the heuristic pilot (it flies to the pad and lands), odd ones random
# actions (they mostly fall and crash): together more varied states than either.
AGENTS: tuple[str, ...] = ("random", "heuristic", "mixed")
MIN_SIZE = 64
SIZE_STEP = 16

# Name -> (dtype, shape after the leading N axis, or None for "depends on size").
ARRAYS: dict[str, tuple[np.dtype, tuple[int, ...] | None]] = {
    "frames": (np.dtype(np.uint8), None),
    "states": (np.dtype(np.float32), (len(STATE_FIELDS),)),
    "episodes": (np.dtype(np.int64), ()),
    "steps": (np.dtype(np.int32), ()),
}


def array_shape(name: str, num_frames: int, size: int) -> tuple[int, ...]:
    """The shape array `name` has in a data set of `num_frames` frames of `size` pixels."""
    row_shape = ARRAYS[name][1]
    return (num_frames, *(row_shape if row_shape is not None else (size, size, 3)))


def episode_seeds(seed: int, episode: int) -> tuple[int, int]:
    """The (environment reset seed, action-space seed) of one episode of a data set.

    Public so that an episode can be replayed by hand: ``env.reset(seed=env_seed)``,
    ``env.action_space.seed(action_seed)``, then the agent's actions.
    """
    env_seed, action_seed = np.random.SeedSequence(seed, spawn_key=(episode,)).generate_state(2)
    return int(env_seed), int(action_seed)


def resize_frame(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize one rendered HWC uint8 frame to size x size with PIL bicubic (aspect is not kept)."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))


def _check_generate_args(
    num_frames: int,
    size: int,
    agent: str,
    num_workers: int,
    seed: int,
    max_episode_steps: int | None,
) -> None:
    """Raise ConfigError naming the first bad argument of generate_lunarlander."""
    if num_frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {num_frames}.")
    if size < MIN_SIZE or (size - MIN_SIZE) % SIZE_STEP != 0:
        below = max(MIN_SIZE, MIN_SIZE + (size - MIN_SIZE) // SIZE_STEP * SIZE_STEP)
        raise ConfigError(
            f"LunarLander frame size {size} is not supported: sizes are {MIN_SIZE} + "
            f"{SIZE_STEP}*n (64, 80, 96, ...). Use for example --size {below} or "
            f"--size {below + SIZE_STEP}."
        )
    if agent not in AGENTS:
        raise ConfigError(f"unknown LunarLander agent {agent!r}; choose one of {', '.join(AGENTS)}.")
    if num_workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {num_workers}.")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}.")
    if max_episode_steps is not None and max_episode_steps < 1:
        raise ConfigError(
            f"max_episode_steps must be at least 1 (or None for gymnasium's default of 1000), got {max_episode_steps}."
        )


def _check_out_free(out: Path) -> None:
    """Refuse an `out` that is a file or a non-empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"{out} already exists and is not an empty directory; generating a data set there "
            f"would overwrite it. Delete it or choose another --out."
        )


@dataclass
class _Episode:
    """The rows one episode contributes, in step order: frames and observations."""

    episode: int
    frames: np.ndarray
    states: np.ndarray
    steps: np.ndarray  # the step of the episode each frame shows


@dataclass
class _Runner:
    """One environment and the settings needed to play seeded episodes on it."""

    env: Any
    agent: str
    size: int
    seed: int
    stop: EventType | None = None  # set by the parent once no running episode can be needed
    frame_stride: int = 1  # keep (render) every frame_stride-th step of an episode

    @classmethod
    def create(
        cls,
        agent: str,
        size: int,
        seed: int,
        max_episode_steps: int | None,
        stop: EventType | None = None,
        frame_stride: int = 1,
    ) -> _Runner:
        """Make a headless rgb_array environment (imports gymnasium lazily: it is slow to load)."""
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import gymnasium as gym

        env = gym.make(ENV_ID, render_mode="rgb_array", max_episode_steps=max_episode_steps)
        return cls(env=env, agent=agent, size=size, seed=seed, stop=stop, frame_stride=frame_stride)


def _run_episode(runner: _Runner, episode: int, max_frames: int) -> _Episode:
    """Play one seeded episode, keeping at most `max_frames` of its (frame, state) pairs.

    Only every ``runner.frame_stride``-th step is rendered and kept (rendering is what costs):
    a set of many short glimpses of many episodes costs what a set of few long ones does. The
    states are those of every step; the engine's flame looks a little longer in a strided set,
    since gymnasium ages its particles only when a frame is drawn.
    """
    from gymnasium.envs.box2d.lunar_lander import heuristic

    env = runner.env
    env_seed, action_seed = episode_seeds(runner.seed, episode)
    obs, _ = env.reset(seed=env_seed)
    env.action_space.seed(action_seed)
    frames, states, steps = [], [], []
    done, step = False, 0
    while True:
        # Render before the next step, so the frame shows the instant `obs` describes.
        if step % runner.frame_stride == 0:
            frames.append(resize_frame(env.render(), runner.size))
            states.append(obs)
            steps.append(step)
        if done or len(frames) >= max_frames:
            break
        if runner.stop is not None and runner.stop.is_set():
            break  # the parent has all it needs; this result will be thrown away
        piloted = runner.agent == "heuristic" or (runner.agent == "mixed" and episode % 2 == 0)
        action = heuristic(env, obs) if piloted else env.action_space.sample()
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        step += 1
    return _Episode(episode, np.stack(frames), np.asarray(states, dtype=np.float32), np.asarray(steps, np.int32))


_worker_runner: _Runner | None = None


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies, however it dies (Linux; elsewhere nothing).

    A generator killed with SIGKILL cannot stop its workers; without this they would live on,
    each holding an environment, until killed by hand.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call: nobody will be told
        os._exit(1)


def _init_worker(
    agent: str, size: int, seed: int, max_episode_steps: int | None, stop: EventType, frame_stride: int
) -> None:
    """Worker initializer: one environment per worker process, reused across episodes."""
    global _worker_runner
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    _worker_runner = _Runner.create(agent, size, seed, max_episode_steps, stop, frame_stride)


def _run_episode_in_worker(episode: int, max_frames: int) -> _Episode:
    """Worker task: play one episode on this worker's environment."""
    assert _worker_runner is not None, "_init_worker did not run"
    return _run_episode(_worker_runner, episode, max_frames)


class _ProgressLog:
    """Logs generation progress about every 10%."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.next_tenth = 1

    def update(self, done: int, num_episodes: int) -> None:
        """Log if `done` frames crossed the next 10% mark."""
        if done * 10 < self.next_tenth * self.total:
            return
        self.next_tenth = done * 10 // self.total + 1
        elapsed = time.perf_counter() - self.start
        logger.info(
            "LunarLander: %d/%d frames (%d%%), %d episodes, %.1f s, %.0f frames/s",
            done,
            self.total,
            100 * done // self.total,
            num_episodes,
            elapsed,
            done / max(elapsed, 1e-9),
        )


def _write_episode(arrays: dict[str, np.ndarray], offset: int, result: _Episode) -> int:
    """Copy one episode's rows into the open memmaps at `offset`; return the rows written."""
    n = min(len(result.frames), len(arrays["frames"]) - offset)
    rows = slice(offset, offset + n)
    arrays["frames"][rows] = result.frames[:n]
    arrays["states"][rows] = result.states[:n]
    arrays["episodes"][rows] = result.episode
    arrays["steps"][rows] = result.steps[:n]
    return n


def _fill(
    arrays: dict[str, np.ndarray],
    submit: Callable[[int, int], Callable[[], _Episode]],
    window: int,
) -> int:
    """Write episodes 0, 1, 2, ... in order until the arrays are full; return the episode count.

    `submit(episode, max_frames)` starts an episode and returns a function that waits for it.
    Each episode is asked for at most the frames that could still be needed, which is never
    fewer than it will be allowed to write, so results do not depend on `window` or timing.
    """
    num_frames = len(arrays["frames"])
    progress = _ProgressLog(num_frames)
    pending: deque[Callable[[], _Episode]] = deque()
    next_episode = written = num_episodes = 0
    while written < num_frames:
        while len(pending) < window:
            # Every episode still pending will write at least one row.
            max_frames = num_frames - written - len(pending)
            if max_frames <= 0:
                break
            pending.append(submit(next_episode, max_frames))
            next_episode += 1
        written += _write_episode(arrays, written, pending.popleft()())
        num_episodes += 1
        progress.update(written, num_episodes)
    return num_episodes


def _needed_bytes(num_frames: int, size: int) -> int:
    """The disk space a set of ``num_frames`` frames of ``size`` pixels takes (array headers aside)."""
    return sum(
        int(np.prod(array_shape(name, num_frames, size))) * dtype.itemsize for name, (dtype, _) in ARRAYS.items()
    )


def _reserve(path: Path, num_frames: int, size: int) -> None:
    """Allocate a memory-mapped array's file on disk now.

    A memory map over a sparse file takes its disk blocks at the first write of each page; on a
    full disk that write kills the process with SIGBUS, with no message and no cleanup. Allocated
    here, a full disk is an ``OSError`` before the first frame.
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            free = shutil.disk_usage(path.parent).free
            raise DataError(
                f"no space on the disk of {path.parent.parent} for the LunarLander set: {num_frames} frames of "
                f"{size}x{size} need {_needed_bytes(num_frames, size) / 2**20:.1f} MiB and "
                f"{free / 2**20:.1f} MiB are free there ({e.strerror}). Free some space or pass an --out on a "
                f"larger disk (or fewer --frames); nothing was kept."
            ) from None


def _generate_into(
    tmp: Path,
    num_frames: int,
    size: int,
    agent: str,
    num_workers: int,
    seed: int,
    max_episode_steps: int | None,
    frame_stride: int = 1,
) -> dict[str, Any]:
    """Write the arrays into `tmp` chunk by chunk; return the meta.json contents."""
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, _) in ARRAYS.items():
        shape = array_shape(name, num_frames, size)
        arrays[name] = open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        _reserve(tmp / f"{name}.npy", num_frames, size)

    if num_workers == 1:
        runner = _Runner.create(agent, size, seed, max_episode_steps, frame_stride=frame_stride)

        def submit_here(episode: int, max_frames: int) -> Callable[[], _Episode]:
            result = _run_episode(runner, episode, max_frames)
            return lambda: result

        try:
            num_episodes = _fill(arrays, submit_here, window=1)
        finally:
            runner.env.close()
    else:
        # spawn: forking a process that may already hold pygame/SDL state is unsafe.
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        executor = ProcessPoolExecutor(
            num_workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(agent, size, seed, max_episode_steps, stop, frame_stride),
        )

        def submit_to_pool(episode: int, max_frames: int) -> Callable[[], _Episode]:
            return executor.submit(_run_episode_in_worker, episode, max_frames).result

        try:
            # Two tasks per worker keep every worker busy while the head of the queue is awaited.
            num_episodes = _fill(arrays, submit_to_pool, window=2 * num_workers)
        finally:
            # Episodes started but no longer needed are cut short and dropped.
            stop.set()
            executor.shutdown(wait=True, cancel_futures=True)

    for array in arrays.values():
        array.flush()
    del arrays

    import gymnasium

    return {
        "format_version": FORMAT_VERSION,
        "env_id": ENV_ID,
        "gymnasium_version": gymnasium.__version__,
        "num_frames": num_frames,
        "num_episodes": num_episodes,
        "size": size,
        "agent": agent,
        "seed": seed,
        "num_workers": num_workers,
        "max_episode_steps": max_episode_steps,
        "frame_stride": frame_stride,
        "state_fields": list(STATE_FIELDS),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def generate_lunarlander(
    out: Path,
    num_frames: int,
    *,
    size: int = 64,
    agent: Literal["random", "heuristic", "mixed"] = "random",
    num_workers: int = 2,
    seed: int = 0,
    max_episode_steps: int | None = None,
    frame_stride: int = 1,
) -> Path:
    """Generate a LunarLander frame data set in `out` and return `out`.

    Everything is written into a hidden sibling directory that is renamed to `out` only when
    complete, so an interrupted run never leaves a partial data set under `out` (a hard kill
    may leave the hidden ``.NAME.partial-*`` sibling behind, which is safe to delete).
    With num_workers > 1 the episodes are played in spawned processes, so a script that
    calls this needs the usual ``if __name__ == "__main__":`` guard.
    """
    out = Path(out)
    _check_generate_args(num_frames, size, agent, num_workers, seed, max_episode_steps)
    if frame_stride < 1:
        raise ConfigError(f"frame_stride must be at least 1 (every step), got {frame_stride}.")
    _check_out_free(out)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        _remove_empty(made)
        raise DataError(
            f"cannot write the LunarLander set into {out.parent} ({e.strerror}: {e.filename}); --out must be a "
            f"new or empty folder inside a folder you can write. Choose another --out."
        ) from None
    _remove_abandoned_partials(out)
    logger.info(
        "generating %d LunarLander frames (%dx%d, %s agent, seed %d, %d workers) into %s",
        num_frames,
        size,
        size,
        agent,
        seed,
        num_workers,
        out,
    )
    start = time.perf_counter()
    try:
        meta = _generate_into(tmp, num_frames, size, agent, num_workers, seed, max_episode_steps, frame_stride)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _check_out_free(out)  # someone may have written there while we were generating
        # Replaces an empty directory atomically; fails rather than merge into a non-empty one.
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    logger.info(
        "wrote %d frames in %d episodes to %s in %.1f s",
        num_frames,
        meta["num_episodes"],
        out,
        time.perf_counter() - start,
    )
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed generation made, innermost first, where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove_abandoned_partials(out: Path) -> None:
    """Delete what generators of ``out`` that were killed outright (no cleanup) left behind."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by a generator that was killed", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def frame_size_for(img_size: int) -> int:
    """The frame size to generate for a model of ``img_size`` pixels: itself when valid, else 64."""
    return img_size if img_size >= MIN_SIZE and (img_size - MIN_SIZE) % SIZE_STEP == 0 else MIN_SIZE
