"""The shared-memory pool hands over each batch before its slot goes back to a worker.

On a GPU a tensor made from a host array is copied to the device asynchronously, so a
batch that still aliased its shared slot could be overwritten by the worker's next job
before the copy ran. A pool that scribbles over a slot the moment it is handed back
makes that visible on a CPU: every batch a consumer keeps must still equal the points
drawn directly for its job.
"""
import numpy as np

from randsphere import BallSampler, SamplerPool, bpda_points

SHAPE = (4, 4, 1)


class _Scribbler:
    """A worker connection that fills a slot with NaN as the slot is handed back."""

    def __init__(self, pool, conn):
        self._pool, self._conn = pool, conn

    def send(self, msg):
        if msg[0] == "job":
            self._pool._slots[msg[1]] = np.nan
            self._pool.scribbled += 1
        self._conn.send(msg)

    def recv(self):
        return self._conn.recv()


class ScribblingPool(SamplerPool):
    scribbled = 0

    def _conn(self, slot):
        return _Scribbler(self, super()._conn(slot))


def test_kept_batches_survive_their_slot_being_refilled():
    sampler = BallSampler.create("l2")
    x0 = np.linspace(-0.4, 0.4, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    jobs = [((1215, 3, i, 0), 8) for i in range(9)]  # more jobs than the 2 slots
    with ScribblingPool(sampler, SHAPE, 8, nworkers=1) as pool:
        kept = list(pool.stream(x0, jobs))  # every batch held while the rest stream in
    assert pool.scribbled == len(jobs), "every slot was scribbled over as it was handed out"
    assert len(kept) == len(jobs)
    for (seed_parts, n), batch in zip(jobs, kept):
        np.testing.assert_array_equal(batch, bpda_points(sampler, x0, seed_parts, n, None))
