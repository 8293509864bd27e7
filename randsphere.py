"""Samplers for L2, L-infinity and L1 balls, and a shared-memory worker pool.

The samplers reproduce the original tool's schemes (docs/format.md) and, with
``uniform_ball=True``, sample uniformly in the ball of radius R as the paper
states. They are NumPy only; the TensorFlow twins used by ``--sampler tf``
live in ``estimate_gradient_norm.py`` and follow the same definitions.

:class:`SamplerPool` runs the samplers (and an input transformation, for
BPDA) in worker processes that fill shared-memory slots while the model works
on the previous batch. The segment is created with posix_ipc and unlinked
before any worker starts; workers get its file descriptor, so no process can
leave an entry in /dev/shm behind, even when killed with SIGKILL, and two
runs never share a name.
"""
from __future__ import annotations

import logging
import mmap
import multiprocessing as mp
import os
import secrets
import signal
from collections import deque
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Iterator, Sequence

import numpy as np

from common import DEFAULT_DATA_RANGE, SAMPLE_NORMS, ToolError, default_radius, derived_seed

log = logging.getLogger("clever.randsphere")


# --------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------
def _unit_l2_directions(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    z = rng.standard_normal((n, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z


def _l1_simplex_spacings(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Points uniform on the simplex {x >= 0, sum x = 1}: spacings of sorted uniforms."""
    u = np.sort(rng.random((n, dim - 1)), axis=1)
    edges = np.concatenate([np.zeros((n, 1)), u, np.ones((n, 1))], axis=1)
    return np.diff(edges, axis=1)


def _random_signs(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    return x * np.where(rng.random(x.shape) < 0.5, -1.0, 1.0)


@dataclass(frozen=True)
class BallSampler:
    """Perturbations around a point, in the ball of one norm.

    Attributes:
        norm: ``"l2"``, ``"li"`` or ``"l1"`` (the original's ``--sample_norm``).
        radius: the ball's radius R, in the model's input units.
        uniform_ball: False for the original tool's scheme (a direction times
            a scale uniform in [0, R], which concentrates samples near the
            centre); True for the uniform distribution on the ball.
    """

    norm: str = "l2"
    radius: float = default_radius("l2", DEFAULT_DATA_RANGE)
    uniform_ball: bool = False

    def __post_init__(self):
        if self.norm not in SAMPLE_NORMS:
            raise ToolError(f"--sample_norm: unknown norm {self.norm!r}; use one of "
                            + ", ".join(SAMPLE_NORMS))
        if not self.radius > 0:
            raise ToolError(f"--radius must be positive, got {self.radius}")

    @classmethod
    def create(cls, norm: str, radius: float | None = None, uniform_ball: bool = False,
               data_range: tuple[float, float] | None = DEFAULT_DATA_RANGE):
        """A sampler of radius ``radius``; unless given, the original default radius of
        ``norm`` times the width of ``data_range`` (ToolError for None: no default)."""
        return cls(norm, default_radius(norm, data_range) if radius is None else float(radius),
                   bool(uniform_ball))

    def draw(self, rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
        """``n`` perturbations of ``dim`` coordinates: float32 [n, dim], each in the ball."""
        r = self.radius
        if self.norm == "li":
            # The original cube sampler is already uniform in the L-infinity ball.
            out = rng.uniform(-r, r, (n, dim))
        elif self.norm == "l2":
            out = _unit_l2_directions(rng, n, dim)
            if self.uniform_ball:
                out *= r * rng.random((n, 1)) ** (1.0 / dim)
            else:
                # Original scheme: uniform in the unit ball, then a scale uniform in [0, R].
                out *= rng.random((n, 1)) ** (1.0 / dim) * rng.uniform(0, r, (n, 1))
        else:  # l1
            if self.uniform_ball:
                # First dim coordinates of a flat Dirichlet in dim+1 parts: uniform in
                # the corner {x >= 0, sum x <= 1}; random signs fill the L1 ball.
                e = rng.standard_exponential((n, dim + 1))
                out = e[:, :dim] / e.sum(axis=1, keepdims=True) * r
            else:
                out = _l1_simplex_spacings(rng, n, dim) * rng.uniform(0, r, (n, 1))
            out = _random_signs(rng, out)
        return out.astype(np.float32)

    def points(self, rng: np.random.Generator, x0: np.ndarray, n: int,
               clip: tuple[float, float] | None = DEFAULT_DATA_RANGE) -> np.ndarray:
        """``n`` points x0 + delta clipped to the data range ``clip`` (None: not clipped):
        float32 [n, *x0.shape]."""
        flat = np.asarray(x0, np.float32).reshape(1, -1)
        pts = self.draw(rng, n, flat.shape[1])
        pts += flat
        if clip is not None:
            np.clip(pts, clip[0], clip[1], out=pts)
        return pts.reshape((n,) + tuple(np.shape(x0)))


# --------------------------------------------------------------------------
# Shared-memory worker pool
# --------------------------------------------------------------------------
class _InheritedFd:
    """Pickles a file descriptor into a spawned child (duplicated for it)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return (_InheritedFd._rebuild, (reduction.DupFd(self.fd),))

    @staticmethod
    def _rebuild(dup) -> int:
        return dup.detach()


#: Last seed part of a job's transformation stream (defend_tv's masks), so that it is
#: independent of the job's sampling stream, derived_seed(*seed_parts).
TRANSFORM_STREAM = 0x7F5


def transform_rng(seed_parts: Sequence[int]) -> np.random.Generator:
    """The generator of a job's random transformation (defend_tv's masks).

    Derived from the job's seed parts (run seed, image, iteration, part) like
    the job's points, but a different stream: the masks of a job do not
    depend on the number of workers or on which worker runs it.
    """
    return np.random.default_rng(derived_seed(*seed_parts, TRANSFORM_STREAM))


def bpda_points(sampler: BallSampler, x0: np.ndarray, seed_parts: Sequence[int], n: int,
                transform: str | None,
                clip: tuple[float, float] | None = DEFAULT_DATA_RANGE) -> np.ndarray:
    """The points the model sees for one job: float32 [n, *x0.shape].

    T(clip(x0 + delta)) clipped again, where delta are the sampler's
    perturbations drawn with derived_seed(*seed_parts) around the
    UNtransformed x0 (BPDA, docs/format.md); clip(x0 + delta) without a
    transformation. ``clip``: the data range (lo, hi), which T maps to its
    [0, 1] and back; None (unbounded inputs): no clipping, and no T. What a
    pool worker writes for the job.
    """
    pts = sampler.points(np.random.default_rng(derived_seed(*seed_parts)), x0, n, clip)
    if not transform:
        return pts
    import defense  # lazily: only --transform runs need Pillow

    out = defense.apply_transform(transform, pts, rng=transform_rng(seed_parts), data_range=clip)
    return np.clip(out, clip[0], clip[1], out=out)


def _worker_main(fd_arg, nbytes: int, nslots: int, slot_points: int, input_shape: tuple,
                 conn, sampler: BallSampler, transform: str | None,
                 clip: tuple[float, float] | None) -> None:
    """A sampling worker: waits for jobs, writes points into its slots."""
    # Ctrl-C goes to the whole process group; the parent decides and tells us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = fd_arg if isinstance(fd_arg, int) else fd_arg.detach()
    mem = mmap.mmap(fd, nbytes)
    os.close(fd)
    dim = int(np.prod(input_shape))
    slots = np.frombuffer(mem, dtype=np.float32).reshape(nslots, slot_points, dim)
    x0 = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone, whatever the way it died
        if msg[0] == "stop":
            break
        if msg[0] == "image":
            x0 = msg[1]
            continue
        _, slot, seed_parts, n = msg
        try:
            pts = bpda_points(sampler, x0, seed_parts, n, transform, clip)
            slots[slot, :n] = pts.reshape(n, dim)
            conn.send(("done", slot))
        except Exception as err:  # report, the parent turns it into a ToolError
            conn.send(("error", slot, f"{type(err).__name__}: {err}"))
    del slots
    mem.close()


class SamplerPool:
    """Worker processes that sample batches of points into shared memory.

    Use as a context manager. ``stream(x0, jobs)`` yields the batches of one
    image in job order, while the next ones are being filled (double
    buffering: two slots per worker).

    Args:
        sampler: the ball sampler.
        input_shape: shape of one model input (no batch axis).
        slot_points: points per batch (the model batch size).
        nworkers: worker processes (at least 1).
        transform: name of a ``defense`` transformation applied to every point
            (BPDA: the model is evaluated at T(clip(x0 + delta)), clipped again),
            or None. Random transformations (defend_tv) draw from
            :func:`transform_rng` of the job's seed parts.
        clip: the data range (lo, hi) every point is clipped to, or None
            (unbounded inputs: no clipping).
    """

    def __init__(self, sampler: BallSampler, input_shape: Sequence[int], slot_points: int,
                 nworkers: int = 1, transform: str | None = None,
                 clip: tuple[float, float] | None = DEFAULT_DATA_RANGE,
                 slots_per_worker: int = 2):
        import posix_ipc

        self.input_shape = tuple(int(s) for s in input_shape)
        self.dim = int(np.prod(self.input_shape))
        self.slot_points = int(slot_points)
        self.nworkers = max(1, int(nworkers))
        self.nslots = self.nworkers * max(2, int(slots_per_worker))
        self.name = f"/clever-{os.getpid()}-{secrets.token_hex(6)}"
        nbytes = self.nslots * self.slot_points * self.dim * 4
        self._procs: list = []
        self._conns: list = []
        self._mem = None
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, size=nbytes)
        try:
            self._mem = mmap.mmap(shm.fd, nbytes)
        finally:
            # Unlinked at once: the fd and the mappings keep the memory alive, the name
            # is gone, so nothing can be left in /dev/shm whatever happens later.
            shm.unlink()
        self._fd = shm.fd
        self._slots = np.frombuffer(self._mem, dtype=np.float32).reshape(
            self.nslots, self.slot_points, self.dim)
        ctx = mp.get_context("spawn")  # never fork a process that runs TensorFlow
        try:
            for _ in range(self.nworkers):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_worker_main, daemon=True,
                                   args=(_InheritedFd(self._fd), nbytes, self.nslots,
                                         self.slot_points, self.input_shape, child, sampler,
                                         transform, clip))
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        except BaseException:
            self.close()
            raise
        finally:
            shm.close_fd()
        log.debug("sampler pool %s: %d workers, %d slots of %d points", self.name,
                  self.nworkers, self.nslots, self.slot_points)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (for monitoring)."""
        return [p.pid for p in self._procs]

    # -- protocol ---------------------------------------------------------
    def _conn(self, slot: int):
        return self._conns[slot % self.nworkers]

    def _wait(self, slot: int) -> None:
        try:
            msg = self._conn(slot).recv()
        except (EOFError, OSError):
            raise ToolError("a sampling worker process died; rerun to resume") from None
        if msg[0] == "error":
            raise ToolError(f"sampling worker failed: {msg[2]}")
        assert msg == ("done", slot), msg

    def stream(self, x0: np.ndarray, jobs: Sequence[tuple[tuple[int, ...], int]]
               ) -> Iterator[np.ndarray]:
        """Yield the points of each job: float32 [n, *input_shape] arrays of their own.

        ``x0`` is the UNtransformed input: the perturbations are drawn around
        it and the pool's transformation is applied to the clipped points
        (:func:`bpda_points`).

        ``jobs`` are (seed parts, n) pairs with n <= slot_points. Each batch is
        copied out of its shared slot before the slot goes back to its worker,
        so a consumer may keep it as long as it likes: a tensor made from it on
        a GPU is copied to the device asynchronously, after the generator may
        have resumed and the worker refilled the slot.
        """
        x0 = np.ascontiguousarray(x0, dtype=np.float32)
        for conn in self._conns:
            conn.send(("image", x0))
        pending = deque()
        todo = iter(jobs)

        def submit(slot):
            job = next(todo, None)
            if job is not None:
                seed_parts, n = job
                if n > self.slot_points:
                    raise ValueError(f"job of {n} points exceeds slot size {self.slot_points}")
                self._conn(slot).send(("job", slot, tuple(int(s) for s in seed_parts), int(n)))
                pending.append((slot, int(n)))

        for slot in range(self.nslots):
            submit(slot)
        while pending:
            slot, n = pending.popleft()
            self._wait(slot)
            points = self._slots[slot, :n].reshape((n,) + self.input_shape).copy()
            submit(slot)  # the slot is free once copied: the worker refills it meanwhile
            yield points

    def close(self) -> None:
        """Stop the workers and release the memory (idempotent)."""
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        if self._mem is not None:
            self._slots = None
            try:
                self._mem.close()
            except BufferError:  # a caller still holds a view; the OS frees it at exit
                pass
            self._mem = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
