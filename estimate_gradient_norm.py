"""The TensorFlow boundary of stage 1: gradient norms of g = f_c - f_j in batches.

:class:`GradientNormEstimator` compiles, once per model, a ``tf.function``
that takes a batch of points and returns, for each target class j, the
batch maxima of the L1, L2 and L-infinity norms of grad g(x), counts of NaN
and all-zero gradients and (optionally) SLOPE estimates. All targets of an
image share the points and the forward pass; the backward pass runs once per
target. Points come either from the shared-memory worker pool
(``--sampler shm``) or are drawn inside the graph (``--sampler tf``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from common import DATA_MAX, DATA_MIN, derived_seed
from randsphere import BallSampler, SamplerPool

log = logging.getLogger("clever.estimate")

# Norm statistics are in the column order gradient L1, L2, L-infinity norm
# (keys G1_max, G2_max, Gi_max; slopes L1_max, L2_max, Li_max).


# --------------------------------------------------------------------------
# In-graph samplers (the twins of randsphere.BallSampler.draw)
# --------------------------------------------------------------------------
def tf_draw(sampler: BallSampler, seed: tf.Tensor, n: int, dim: int) -> tf.Tensor:
    """``n`` perturbations [n, dim] float32 in the sampler's ball, stateless in ``seed``.

    ``seed``: int64 [2]. Same distributions as :meth:`BallSampler.draw`.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    r = float(sampler.radius)
    if sampler.norm == "li":
        return tf.random.stateless_uniform([n, dim], seeds[0], -r, r)
    if sampler.norm == "l2":
        z = tf.random.stateless_normal([n, dim], seeds[0])
        z = z / tf.norm(z, axis=1, keepdims=True)
        u = tf.random.stateless_uniform([n, 1], seeds[1]) ** (1.0 / dim)
        if sampler.uniform_ball:
            return z * (r * u)
        return z * (u * tf.random.stateless_uniform([n, 1], seeds[2], 0.0, r))
    # l1
    if sampler.uniform_ball:
        e = -tf.math.log(tf.random.stateless_uniform([n, dim + 1], seeds[0], 1e-12, 1.0))
        out = e[:, :dim] / tf.reduce_sum(e, axis=1, keepdims=True) * r
    else:
        u = tf.sort(tf.random.stateless_uniform([n, dim - 1], seeds[0]), axis=1)
        edges = tf.concat([tf.zeros([n, 1]), u, tf.ones([n, 1])], axis=1)
        out = (edges[:, 1:] - edges[:, :-1]) * tf.random.stateless_uniform([n, 1], seeds[1], 0.0, r)
    signs = tf.where(tf.random.stateless_uniform([n, dim], seeds[3]) < 0.5, -1.0, 1.0)
    return out * signs


def tf_seed(*parts: int) -> np.ndarray:
    """An int64 [2] stateless seed from integers (run seed, image, iteration, part)."""
    return derived_seed(*parts).generate_state(2, dtype=np.uint32).astype(np.int64)


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------
@dataclass
class IterationStats:
    """Maxima over the N_s points of one iteration, for each of T targets.

    ``grad_max``: [T, 3] maxima of the gradient's L1, L2, L-inf norms (NaN
    when every sample was NaN); with order 2, [T, 1] maxima of the negative
    curvature magnitude H. ``slope_max``: [T, 3] or None. ``nan`` and
    ``zero``: [T] numbers of samples with a NaN / an all-zero gradient.
    ``seconds``: wall time of the iteration; ``wait``: of it, the time spent
    waiting for sampled points (the overhead the pool should hide).
    """

    iteration: int
    grad_max: np.ndarray
    slope_max: np.ndarray | None
    nan: np.ndarray
    zero: np.ndarray
    seconds: float
    wait: float


@dataclass
class TargetResult:
    """Stage-1 output of one (image, target): what one .mat file holds."""

    target: int
    g_x0: float
    grad_max: np.ndarray          # [Niters, 3]
    slope_max: np.ndarray         # [Niters, 3], zeros unless compute_slope
    nan_batches: int = 0
    zero_batches: int = 0
    nan_samples: int = 0
    zero_samples: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------
class GradientNormEstimator:
    """Compiled gradient-norm statistics of one model.

    Args:
        model: a callable (Keras model) mapping float32 [B, *input_shape] to
            logits [B, K].
        input_shape: one input's shape, without the batch axis.
        batch_size: points per model call.
        clip: the data range every sample is clipped to.
        compute_slope: also compute SLOPE maxima |g(x1)-g(x2)| / ||x1-x2||
            over the pairs (x_i, x_{i+B/2}) of each batch. L1_max uses the
            L-inf distance, L2_max the L2 and Li_max the L1 distance, so that
            each estimates the same Lipschitz constant as G1/G2/Gi_max.
    """

    def __init__(self, model, input_shape: Sequence[int], batch_size: int,
                 clip: tuple[float, float] = (DATA_MIN, DATA_MAX), compute_slope: bool = False,
                 jit_compile: bool = False, order: int = 1, power_iters: int = 20):
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dim = int(np.prod(self.input_shape))
        self.batch_size = int(batch_size)
        self.clip = (float(clip[0]), float(clip[1]))
        self.compute_slope = bool(compute_slope)
        self.order = int(order)
        self.power_iters = int(power_iters)
        core = self._stats if self.order == 1 else self._curvature_stats
        self._from_points = tf.function(core, jit_compile=jit_compile)
        self._from_sampler = tf.function(self._sampled_stats, jit_compile=jit_compile)
        self._grad_at = tf.function(self._gradient_norms)

    # -- the compiled core ------------------------------------------------
    def _norm_rows(self, x, c, targets):
        """Per-sample gradient norms of every g_j.

        x: float32 [B, *input_shape]; c: int32 scalar, the predicted class;
        targets: int32 [T] (T static: one backward pass per target, sharing
        the forward pass). Returns norms [T, B, 3] (L1, L2, L-inf) and
        g [B, T] = f_c - f_j at each point.
        """
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            logits = self.model(x, training=False)
        num_classes = tf.shape(logits)[1]
        weights = (tf.one_hot(c, num_classes)[None, :]
                   - tf.one_hot(targets, num_classes))       # [T, K]: g_j = w_j . logits
        rows = []
        for t in range(targets.shape[0]):
            # A non-differentiable model (e.g. input quantisation) has no gradient path:
            # that is a zero gradient, counted by the caller, not an error.
            grad = tape.gradient(logits, x, output_gradients=tf.broadcast_to(
                weights[t][None, :], tf.shape(logits)),
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            absg = tf.abs(tf.reshape(grad, [tf.shape(grad)[0], -1]))
            linf = tf.reduce_max(absg, axis=1)
            # L2 scaled by L-inf: squares of tiny gradients (1e-20) underflow in float32.
            scaled = absg / tf.where(linf > 0, linf, 1.0)[:, None]
            l2 = linf * tf.sqrt(tf.reduce_sum(tf.square(scaled), axis=1))
            rows.append(tf.stack([tf.reduce_sum(absg, axis=1), l2, linf], axis=1))
        del tape
        return tf.stack(rows), tf.linalg.matmul(logits, weights, transpose_b=True)

    def _stats(self, x, c, targets):
        """Statistics of one batch (see :meth:`_norm_rows` for the arguments).

        Returns grad_max [T, 3], slope_max [T, 3], nan [T], zero [T].
        """
        norms, g = self._norm_rows(x, c, targets)
        bad = tf.reduce_any(tf.math.is_nan(norms), axis=2)                       # [T, B]
        nans = tf.reduce_sum(tf.cast(bad, tf.int32), axis=1)
        zeros = tf.reduce_sum(tf.cast(tf.logical_and(~bad, norms[:, :, 2] == 0), tf.int32), axis=1)
        # A NaN sample must not hide the finite ones: it is counted, not maximised.
        maxima = tf.reduce_max(tf.where(bad[:, :, None], -np.inf, norms), axis=1)  # [T, 3]
        slope = self._slopes(x, g) if self.compute_slope else tf.zeros_like(maxima)
        return maxima, slope, nans, zeros

    def _slopes(self, x, g):
        half = tf.shape(x)[0] // 2
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        dx = flat[:half] - flat[half:2 * half]
        dist = tf.stack([tf.reduce_max(tf.abs(dx), axis=1), tf.norm(dx, axis=1),
                         tf.reduce_sum(tf.abs(dx), axis=1)], axis=1)  # [h, 3]
        dg = tf.abs(g[:half] - g[half:2 * half])                   # [h, T]
        slope = dg[:, :, None] / tf.maximum(dist[:, None, :], 1e-30)
        return tf.reduce_max(slope, axis=0)                        # [T, 3]

    def _sampled_stats(self, x0, c, targets, seed, sampler: BallSampler, n: int):
        delta = tf_draw(sampler, seed, n, self.dim)
        x = tf.clip_by_value(tf.reshape(x0, [1, -1]) + delta, *self.clip)
        x = tf.reshape(x, (n,) + self.input_shape)
        if self.order == 1:
            return self._stats(x, c, targets)
        return self._curvature_stats(x, c, targets)

    # -- second order -------------------------------------------------------
    def _hvp(self, x, weights, v):
        """Hessian-vector products of g = weights . logits, per sample.

        x, v: [B, *input_shape]; weights: [K]. Returns (H v, grad g), both
        shaped like x. Samples are independent, so differentiating the sum
        over the batch gives every sample's own derivatives.
        """
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                g = tf.reduce_sum(self.model(x, training=False) * weights[None, :])
            grad = inner.gradient(g, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gv = tf.reduce_sum(grad * v)
        hv = outer.gradient(gv, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return hv, grad

    def _power_iteration(self, x, weights, shift):
        """Dominant eigenvalue of (Hessian of g - shift I) per sample: [B].

        ``shift``: [B]. Power iteration from a fixed random start; the
        Rayleigh quotient of the last iterate is the estimate.
        """
        b = tf.shape(x)[0]
        axes = list(range(1, len(self.input_shape) + 1))
        v = tf.random.stateless_normal(tf.shape(x), seed=[7, 11])
        v = v / tf.norm(tf.reshape(v, [b, -1]), axis=1)[(...,) + (None,) * len(axes)]
        lam = tf.zeros([b])
        for _ in range(self.power_iters):
            hv, _ = self._hvp(x, weights, v)
            hv = hv - shift[(...,) + (None,) * len(axes)] * v
            lam = tf.reduce_sum(hv * v, axis=axes)
            norm = tf.norm(tf.reshape(hv, [b, -1]), axis=1)
            # A zero Hessian (piecewise-linear region) keeps v: lam stays 0.
            v = tf.where((norm > 0)[(...,) + (None,) * len(axes)],
                         hv / tf.maximum(norm, 1e-30)[(...,) + (None,) * len(axes)], v)
        return lam

    def _curvature_stats(self, x, c, targets):
        """Batch maxima of the negative-curvature magnitude H of g, per target.

        H(x) = max(0, -lambda_min(Hessian of g at x)): power iteration gives
        the largest-magnitude eigenvalue mu; if it is positive, a second run
        on (Hessian - mu I) finds lambda_min - mu (SPEC section 1).
        Returns curv_max [T, 1], zeros [T, 1] (no slopes), nan [T], zero [T].
        """
        num_classes = tf.shape(self.model(x[:1], training=False))[1]
        maxima, nans, zeros = [], [], []
        b = tf.shape(x)[0]
        for t in range(targets.shape[0]):
            weights = tf.one_hot(c, num_classes) - tf.one_hot(targets[t], num_classes)
            mu = self._power_iteration(x, weights, tf.zeros([b]))
            shifted = self._power_iteration(x, weights, tf.maximum(mu, 0.0))
            lam_min = tf.where(mu > 0, shifted + mu, mu)
            h = tf.maximum(-lam_min, 0.0)
            bad = tf.math.is_nan(h)
            nans.append(tf.reduce_sum(tf.cast(bad, tf.int32)))
            zeros.append(tf.reduce_sum(tf.cast(tf.logical_and(~bad, h == 0), tf.int32)))
            maxima.append(tf.reduce_max(tf.where(bad, -np.inf, h))[None])
        curv = tf.stack(maxima)
        return curv, tf.zeros_like(curv), tf.stack(nans), tf.stack(zeros)

    def _gradient_norms(self, x, c, targets):
        """Gradient L1, L2, L-inf norms of g_j at each point: [B, T, 3]."""
        return tf.transpose(self._norm_rows(x, c, targets)[0], [1, 0, 2])

    # -- host-side driver ---------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, K] of a batch of inputs [N, *input_shape], in batches."""
        out = [np.asarray(self.model(tf.constant(x[i:i + self.batch_size]), training=False))
               for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out, axis=0)

    def gradient_norms_at(self, x: np.ndarray, c: int, targets: Sequence[int]) -> np.ndarray:
        """Gradient L1, L2, L-inf norms of g_j at one input x: float64 [T, 3]."""
        out = self._grad_at(tf.constant(np.asarray(x, np.float32)[None]),
                            tf.constant(int(c), tf.int32), tf.constant(list(targets), tf.int32))
        return out.numpy()[0].astype(np.float64)

    def parts(self, nsamps: int) -> list[int]:
        """Sizes of the model batches that make up one iteration of ``nsamps`` points."""
        full, rest = divmod(int(nsamps), self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    def iterate(self, x0: np.ndarray, c: int, targets: Sequence[int], nsamps: int, niters: int,
                seed: int, img_id: int, sampler: BallSampler, pool: SamplerPool | None = None,
                start_iter: int = 0) -> Iterator[IterationStats]:
        """Run ``niters`` iterations of ``nsamps`` points around ``x0``.

        Yields one :class:`IterationStats` per iteration. The points of batch
        (iteration i, part p) depend only on (seed, img_id, i, p) and the
        sampler, so results do not depend on batch scheduling.
        With ``pool``, points come from the worker pool (and carry its
        transformation); without, they are drawn in the graph.
        """
        parts = self.parts(nsamps)
        c_t = tf.constant(int(c), tf.int32)
        t_t = tf.constant(list(targets), tf.int32)
        x0_t = tf.constant(np.asarray(x0, np.float32))
        stream = None
        if pool is not None:
            jobs = [((seed, img_id, it, p), n) for it in range(start_iter, niters)
                    for p, n in enumerate(parts)]
            stream = pool.stream(x0, jobs)
        for it in range(start_iter, niters):
            t0 = time.perf_counter()
            wait = 0.0
            acc = None
            for p, n in enumerate(parts):
                if stream is not None:
                    w0 = time.perf_counter()
                    batch = tf.constant(next(stream))  # copies out of the shared slot
                    wait += time.perf_counter() - w0
                    out = self._from_points(batch, c_t, t_t)
                else:
                    out = self._from_sampler(x0_t, c_t, t_t, tf.constant(tf_seed(seed, img_id, it, p)),
                                             sampler, n)
                acc = out if acc is None else (tf.maximum(acc[0], out[0]), tf.maximum(acc[1], out[1]),
                                               acc[2] + out[2], acc[3] + out[3])
            grad_max = acc[0].numpy().astype(np.float64)
            grad_max[np.isneginf(grad_max)] = np.nan  # every sample was NaN
            yield IterationStats(it, grad_max,
                                 acc[1].numpy().astype(np.float64) if self.compute_slope else None,
                                 acc[2].numpy(), acc[3].numpy(), time.perf_counter() - t0, wait)
        if stream is not None:
            stream.close()
