"""The reference the stage-1 benches divide by: every iteration in one compiled call.

Shared by ``bench_stage1.py`` and ``bench_imagenet.py``. It does what stage 1
must do and nothing else: draw each batch's points with
``estimate_gradient_norm.tf_draw`` from the same stateless seeds (run seed,
image 0, iteration, part), clip, forward, backward for one target, the three
gradient norms with stage 1's formulas (L2 scaled by L-inf against float32
underflow) and the per-iteration maxima, all iterations in one ``tf.function``
call whose [niters, 3] result is copied to the host once. It leaves out what
stage 1 adds: NaN and zero-gradient counts, per-iteration results reaching
the host during the run, and the Python driver.
"""
from __future__ import annotations

import numpy as np


def reference_loop(model, sampler, x0: np.ndarray, c: int, j: int, nsamps: int, batch: int,
                   niters: int, seed: int, jit: bool = False, clip=(-0.5, 0.5)):
    """A zero-argument callable running ``niters`` iterations of ``nsamps`` points
    (batches of ``batch``; ``nsamps`` a multiple of it) and returning maxima [niters, 3]."""
    import tensorflow as tf

    from estimate_gradient_norm import tf_draw, tf_seed

    if nsamps % batch:
        raise ValueError("the reference needs nsamps to be a multiple of the batch size")
    parts = nsamps // batch
    seeds = tf.constant(np.array([[tf_seed(seed, 0, i, p) for p in range(parts)]
                                  for i in range(niters)], np.int64))
    x0_t = tf.constant(np.asarray(x0, np.float32).reshape(1, -1))
    shape = (batch,) + tuple(x0.shape)
    dim = int(np.prod(x0.shape))

    @tf.function(jit_compile=jit)
    def run_all(seeds):
        out = tf.TensorArray(tf.float32, size=niters)
        for i in tf.range(niters):
            best = tf.fill([3], -np.inf)
            for p in tf.range(parts):
                delta = tf_draw(sampler, seeds[i, p], batch, dim)
                x = tf.reshape(tf.clip_by_value(x0_t + delta, *clip), shape)
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    logits = model(x, training=False)
                    g = logits[:, c] - logits[:, j]
                grad = tf.abs(tf.reshape(tape.gradient(g, x), [batch, -1]))
                linf = tf.reduce_max(grad, 1)
                scaled = grad / tf.where(linf > 0, linf, 1.0)[:, None]
                l2 = linf * tf.sqrt(tf.reduce_sum(tf.square(scaled), 1))
                norms = tf.stack([tf.reduce_sum(grad, 1), l2, linf], axis=1)
                best = tf.maximum(best, tf.reduce_max(norms, axis=0))
            out = out.write(i, best)
        return out.stack()

    return lambda: run_all(seeds).numpy()
