"""The TensorFlow boundary of stage 1: gradient norms of g = f_c - f_j in batches.

:class:`GradientNormEstimator` compiles, once per model, ``tf.function``s
that return, for each target class j and each iteration, the maxima over the
iteration's points of the L1, L2 and L-infinity norms of grad g(x), counts of
NaN and all-zero gradients and (optionally) SLOPE estimates; with order 2,
the curvature estimate of largest magnitude from a power iteration run in the
graph. All targets of an image share the points and the forward pass; the
backward pass runs once per target.

Iterations run in chunks: with the in-graph sampler (``--sampler tf``) one
compiled call loops over a chunk's iterations and batches (drawing each
batch's points from its stateless seed) and returns [chunk, T, ...] arrays,
copied to the host once. With the shared-memory worker pool
(``--sampler shm``) each batch of points is one compiled call that folds its
statistics into accumulators kept on the device, copied once per chunk. The
chunk length adapts so that a chunk takes about ``CHUNK_SECONDS``.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from common import DEFAULT_DATA_RANGE, ToolError, derived_seed
from randsphere import BallSampler, SamplerPool

log = logging.getLogger("clever.estimate")

#: Order 2: a power-iteration run stops when the L2 norm, over the batch, of the change of
#: the Rayleigh quotients falls below this (the original tool's criterion).
POWER_TOL = 1e-3
#: The stateless random algorithm of every in-graph draw (the CPU/GPU kernels' default).
RNG_ALG = "philox"
#: --precision choices (see :func:`set_precision`).
PRECISIONS = ("float32", "tf32", "mixed_float16")
#: Target wall time of one chunk of iterations (one host copy): progress lines and the
#: progress bar advance, and Ctrl-C is honoured, at least about this often. Chunks are
#: powers of two, so one takes between half this and this. Each compiled call after a
#: long one pays a fixed 10-25 ms on a 2-core CPU (TensorFlow 2.21), so shorter chunks
#: cost throughput.
CHUNK_SECONDS = 1.0
#: The most iterations in one chunk (on a GPU, about a second of MNIST-size batches).
MAX_CHUNK = 1024

# Norm statistics are in the column order gradient L1, L2, L-infinity norm
# (keys G1_max, G2_max, Gi_max; slopes L1_max, L2_max, Li_max).


# --------------------------------------------------------------------------
# In-graph samplers (the twins of randsphere.BallSampler.draw)
# --------------------------------------------------------------------------
def tf_draw(sampler: BallSampler, seed: tf.Tensor, n: int, dim: int) -> tf.Tensor:
    """``n`` perturbations [n, dim] float32 in the sampler's ball, stateless in ``seed``.

    ``seed``: int64 [2]. Same distributions as :meth:`BallSampler.draw`. The
    generator is pinned (``RNG_ALG``): left to "auto_select", XLA picks
    another algorithm than the CPU and GPU kernels, and ``--jit_compile``
    would draw other points.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4, alg=RNG_ALG)
    r = float(sampler.radius)
    if sampler.norm == "li":
        return tf.random.stateless_uniform([n, dim], seeds[0], -r, r, alg=RNG_ALG)
    if sampler.norm == "l2":
        z = tf.random.stateless_normal([n, dim], seeds[0], alg=RNG_ALG)
        z = z / tf.norm(z, axis=1, keepdims=True)
        u = tf.random.stateless_uniform([n, 1], seeds[1], alg=RNG_ALG) ** (1.0 / dim)
        if sampler.uniform_ball:
            return z * (r * u)
        return z * (u * tf.random.stateless_uniform([n, 1], seeds[2], 0.0, r, alg=RNG_ALG))
    # l1
    if sampler.uniform_ball:
        e = -tf.math.log(tf.random.stateless_uniform([n, dim + 1], seeds[0], 1e-12, 1.0,
                                                     alg=RNG_ALG))
        out = e[:, :dim] / tf.reduce_sum(e, axis=1, keepdims=True) * r
    else:
        u = tf.sort(tf.random.stateless_uniform([n, dim - 1], seeds[0], alg=RNG_ALG), axis=1)
        edges = tf.concat([tf.zeros([n, 1]), u, tf.ones([n, 1])], axis=1)
        out = (edges[:, 1:] - edges[:, :-1]) * tf.random.stateless_uniform(
            [n, 1], seeds[1], 0.0, r, alg=RNG_ALG)
    signs = tf.where(tf.random.stateless_uniform([n, dim], seeds[3], alg=RNG_ALG) < 0.5, -1.0, 1.0)
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
    when every sample was NaN); with order 2, [T, 1] the curvature estimate
    of largest magnitude over the iteration's samples, with its sign (the
    original's H2_max: negative for negative curvature; stage 2 fits its
    magnitude). ``slope_max``: [T, 3] or None. ``nan`` and ``zero``: [T]
    numbers of samples with a NaN / an all-zero gradient (order 2: a NaN / a
    zero curvature estimate). ``seconds``: wall time of the iteration (the
    chunk's wall time divided by its iterations); ``wait``: of it, the time
    spent waiting for sampled points (the overhead the pool should hide).
    ``power_steps``: order 2 only, [T] the largest number of power-iteration
    steps one run took in this iteration (``power_iters`` when a run stopped
    at the cap without converging); None with order 1.
    """

    iteration: int
    grad_max: np.ndarray
    slope_max: np.ndarray | None
    nan: np.ndarray
    zero: np.ndarray
    seconds: float
    wait: float
    power_steps: np.ndarray | None = None


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
    power_capped: int = 0          # order 2: iterations whose power iteration hit power_iters


# --------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------
def set_precision(precision: str) -> None:
    """Apply ``precision`` to TensorFlow's matmul/convolution kernels (process-wide).

    TensorFlow turns TensorFloat-32 on by default on Ampere and newer GPUs; its
    10-bit mantissa perturbs the gradient norms whose maximum stage 2
    extrapolates, so "float32" turns it off explicitly. "mixed_float16" also
    keeps TF32 off for the float32 parts (norms, maxima, power iteration).
    """
    if precision not in PRECISIONS:
        raise ToolError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    tf.config.experimental.enable_tensor_float_32_execution(precision == "tf32")


def _float16_clone(model):
    """A copy of a Keras model computing in float16 (variables float32), same weights."""
    import keras

    if not isinstance(model, keras.Model):
        raise ToolError("--precision mixed_float16: needs a Keras model (a functional or "
                        "sequential keras.Model); this model is a plain callable")

    def clone_layer(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = "mixed_float16"
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer)
    except Exception as exc:  # subclassed models cannot be cloned layer by layer
        raise ToolError(f"--precision mixed_float16: cannot rebuild this model with a "
                        f"float16 policy ({type(exc).__name__}: {exc})") from None
    clone.set_weights(model.get_weights())
    return clone


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
        clip: the data range (lo, hi) every sample is clipped to (``--data_range``),
            or None for unbounded inputs (no clipping).
        compute_slope: also compute SLOPE maxima |g(x1)-g(x2)| / ||x1-x2||
            over the pairs (x_i, x_{i+B/2}) of each batch. L1_max uses the
            L-inf distance, L2_max the L2 and Li_max the L1 distance, so that
            each estimates the same Lipschitz constant as G1/G2/Gi_max.
        jit_compile: compile the iteration loops with XLA.
        order: 1 (gradient norms) or 2 (curvature by power iteration).
        power_iters: order 2: the most power-iteration steps of one run; a run
            stops earlier when the L2 norm, over the batch, of the change of
            the Rayleigh quotients falls below ``POWER_TOL``.
        precision: "float32" (TensorFloat-32 off), "tf32" or "mixed_float16"
            (the model computes in float16; gradients, norms, maxima and the
            power iteration's vectors stay float32).
    """

    def __init__(self, model, input_shape: Sequence[int], batch_size: int,
                 clip: tuple[float, float] | None = DEFAULT_DATA_RANGE,
                 compute_slope: bool = False,
                 jit_compile: bool = False, order: int = 1, power_iters: int = 500,
                 precision: str = "float32"):
        if int(order) not in (1, 2):
            raise ToolError(f"--order: must be 1 or 2, got {order}")
        if int(power_iters) < 1:
            raise ToolError(f"--power_iters: must be at least 1, got {power_iters}")
        set_precision(precision)
        self.precision = precision
        self.jit_compile = bool(jit_compile)
        self.model = model
        # What the compiled loops evaluate; the float32 model keeps g(x0) and the targets exact.
        self._net = _float16_clone(model) if precision == "mixed_float16" else model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dim = int(np.prod(self.input_shape))
        self.batch_size = int(batch_size)
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.compute_slope = bool(compute_slope)
        self.order = int(order)
        self.power_iters = int(power_iters)
        # Chunk length: None adapts it to CHUNK_SECONDS; an integer pins it (tests, benches).
        self.fixed_chunk: int | None = None
        self.last_chunk_ends: list[int] = []   # iterations done at each host copy (diagnostics)
        # Seconds per iteration last measured, per compiled loop: the next (image, target)
        # on the same loop starts at the chunk length that fits, not at 1.
        self._seconds_per_iteration: dict = {}
        self._chunk_fns: dict = {}
        self._step_fns: dict = {}
        self._grad_at = tf.function(self._gradient_norms)

    # -- the compiled core ------------------------------------------------
    def _logits(self, x):
        out = self._net(x, training=False)
        return out if out.dtype == tf.float32 else tf.cast(out, tf.float32)

    def _norm_rows(self, x, c, targets):
        """Per-sample gradient norms of every g_j.

        x: float32 [B, *input_shape]; c: int32 scalar, the predicted class;
        targets: int32 [T] (T static: one backward pass per target, sharing
        the forward pass). Returns norms [T, B, 3] (L1, L2, L-inf) and
        g [B, T] = f_c - f_j at each point.
        """
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            logits = self._logits(x)
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
        # Norms are >= 0 or NaN (never -inf), so a row's sum is NaN exactly when one of
        # its norms is, and 0 exactly when its gradient is all zero. No branch: a tf.cond
        # would copy its predicate to the host, a sync per batch on a GPU.
        total = tf.reduce_sum(norms, axis=2)                                     # [T, B]
        bad = tf.math.is_nan(total)
        nans = tf.reduce_sum(tf.cast(bad, tf.int32), axis=1)
        zeros = tf.reduce_sum(tf.cast(total == 0, tf.int32), axis=1)
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

    def _part(self, x, c, targets, seed):
        """Statistics of one model batch x [n, *input_shape]; ``seed`` int64 [2] is the
        batch's stateless seed (order 2 draws its power-iteration start from it).

        Returns (best [T, K], slope [T, K], nan [T], zero [T], power steps [T]) with
        K = 3 (order 1) or 1 (order 2).
        """
        if self.order == 1:
            maxima, slope, nans, zeros = self._stats(x, c, targets)
            return maxima, slope, nans, zeros, tf.zeros_like(nans)
        return self._curvature_stats(x, c, targets, seed)

    def _sampled_part(self, x0, c, targets, seed, sampler: BallSampler, n: int):
        delta = tf_draw(sampler, seed, n, self.dim)
        x = tf.reshape(x0, [1, -1]) + delta
        if self.clip is not None:
            x = tf.clip_by_value(x, *self.clip)
        x = tf.reshape(x, (n,) + self.input_shape)
        return self._part(x, c, targets, seed)

    # -- accumulation over the batches of one iteration ---------------------
    def _columns(self) -> int:
        return 3 if self.order == 1 else 1

    def _empty(self, num_targets: int):
        """The neutral accumulator: combining it with a batch's statistics gives them."""
        k = self._columns()
        # Order 1 keeps maxima (-inf: "no finite sample yet"); order 2 keeps the signed
        # value of largest magnitude (NaN: "no finite estimate yet").
        best = tf.fill([num_targets, k], -np.inf if self.order == 1 else np.nan)
        count = tf.zeros([num_targets], tf.int32)
        return best, tf.fill([num_targets, k], -np.inf), count, count, count

    def _combine(self, acc, out):
        if self.order == 1:
            best = tf.maximum(acc[0], out[0])
        else:
            take = tf.logical_or(tf.math.is_nan(acc[0]), tf.abs(out[0]) > tf.abs(acc[0]))
            best = tf.where(take, out[0], acc[0])
        return (best, tf.maximum(acc[1], out[1]), acc[2] + out[2], acc[3] + out[3],
                tf.maximum(acc[4], out[4]))

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
                g = tf.reduce_sum(self._logits(x) * weights[None, :])
            grad = inner.gradient(g, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            gv = tf.reduce_sum(grad * v)
        hv = outer.gradient(gv, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return hv, grad

    def _power_iteration(self, x, weights, shift, seed):
        """Dominant eigenvalue of (Hessian of g at x - shift I), per sample.

        x: [B, *input_shape]; weights: [K]; shift: float32 scalar; seed: int64
        [2], the stateless seed of the standard-normal start vectors (one per
        sample). Iterates v <- (H - shift) v / ||.|| until the L2 norm over the
        batch of the change of the Rayleigh quotients is below POWER_TOL, or
        ``power_iters`` steps. Returns (Rayleigh quotients [B], steps: int32).
        """
        b = tf.shape(x)[0]
        expand = (...,) + (None,) * len(self.input_shape)
        axes = list(range(1, len(self.input_shape) + 1))
        v = tf.random.stateless_normal(tf.shape(x), seed=seed, alg=RNG_ALG)
        v = v / tf.norm(tf.reshape(v, [b, -1]), axis=1)[expand]

        def step(i, v, lam, change):
            hv, _ = self._hvp(x, weights, v)
            hv = hv - shift * v
            new = tf.reduce_sum(hv * v, axis=axes)   # Rayleigh quotient (||v|| = 1)
            norm = tf.norm(tf.reshape(hv, [b, -1]), axis=1)
            # A zero Hessian (piecewise-linear region) keeps v: the estimate stays 0.
            v = tf.where((norm > 0)[expand], hv / tf.maximum(norm, 1e-30)[expand], v)
            return i + 1, v, new, tf.norm(new - lam)

        def running(i, v, lam, change):
            # A NaN change (NaN model output) stops the run: its samples are counted as NaN.
            return tf.logical_and(i < self.power_iters, change >= POWER_TOL)

        steps, _, lam, _ = tf.while_loop(
            running, step, (tf.constant(0), v, tf.zeros_like(x[(slice(None),) + (0,) * len(axes)]),
                              tf.constant(np.inf, tf.float32)),
            parallel_iterations=1)
        return lam, steps

    def _curvature_stats(self, x, c, targets, seed):
        """Second-order statistics of one batch, per target (docs/format.md).

        Power iteration gives each sample's dominant eigenvalue mu. If the
        batch's largest mu is positive, a second run on (H - s I), s = that
        maximum, reaches the most negative eigenvalue; a sample whose mu is
        positive takes the shifted estimate + s. Returns the estimate of
        largest magnitude, signed, [T, 1]; zeros [T, 1] (no slopes); NaN and
        zero-estimate counts [T]; and the most steps one run took [T].
        """
        num_classes = tf.shape(self._logits(x[:1]))[1]
        starts = tf.random.experimental.stateless_split(seed, 6, alg=RNG_ALG)  # rows 0-3: points
        best, nans, zeros, steps = [], [], [], []
        for t in range(targets.shape[0]):
            weights = tf.one_hot(c, num_classes) - tf.one_hot(targets[t], num_classes)
            mu, n1 = self._power_iteration(x, weights, tf.constant(0.0), starts[4])
            shift = tf.reduce_max(tf.where(tf.math.is_nan(mu), -np.inf, mu))

            def shifted(mu=mu, weights=weights, shift=shift):
                lam, n2 = self._power_iteration(x, weights, shift, starts[5])
                return tf.where(mu > 0, lam + shift, mu), n2

            est, n2 = tf.cond(shift > 0, shifted, lambda mu=mu: (mu, tf.constant(0)))
            bad = tf.math.is_nan(est)
            nans.append(tf.reduce_sum(tf.cast(bad, tf.int32)))
            zeros.append(tf.reduce_sum(tf.cast(tf.logical_and(~bad, est == 0), tf.int32)))
            mag = tf.where(bad, -1.0, tf.abs(est))
            pick = est[tf.argmax(mag)]
            best.append(tf.where(tf.reduce_all(bad), np.float32(np.nan), pick)[None])
            steps.append(tf.maximum(n1, n2))
        curv = tf.stack(best)
        return curv, tf.zeros_like(curv), tf.stack(nans), tf.stack(zeros), tf.stack(steps)

    def _gradient_norms(self, x, c, targets):
        """Gradient L1, L2, L-inf norms of g_j at each point: [B, T, 3]."""
        return tf.transpose(self._norm_rows(x, c, targets)[0], [1, 0, 2])

    # -- compiled loops -----------------------------------------------------
    def _sampled_chunk_fn(self, sampler: BallSampler, parts: tuple[int, ...], num_targets: int):
        """A compiled call running a chunk of iterations with in-graph sampling.

        fn(x0 [*input_shape], c, targets [T], seeds int64 [k, P, 2]) -> the
        per-iteration accumulators stacked: [k, T, K], [k, T, K], [k, T] x 3.
        """
        key = ("tf", sampler, parts, num_targets)
        if key in self._chunk_fns:
            return self._chunk_fns[key]
        n_full = sum(1 for n in parts if n == self.batch_size)
        rest = parts[-1] if parts[-1] != self.batch_size else 0
        empty = lambda: self._empty(num_targets)  # noqa: E731

        def one_iteration(x0, c, targets, seeds):  # seeds [P, 2]
            acc = empty()
            if n_full == 1:
                acc = self._combine(acc, self._sampled_part(x0, c, targets, seeds[0], sampler,
                                                            self.batch_size))
            elif n_full > 1:
                def body(p, *acc):
                    out = self._sampled_part(x0, c, targets, seeds[p], sampler, self.batch_size)
                    return (p + 1,) + self._combine(acc, out)

                acc = tuple(tf.while_loop(lambda p, *a: p < n_full, body,
                                          (tf.constant(0),) + acc, parallel_iterations=1)[1:])
            if rest:
                acc = self._combine(acc, self._sampled_part(x0, c, targets, seeds[n_full], sampler,
                                                            rest))
            return acc

        def chunk(x0, c, targets, seeds):
            k = tf.shape(seeds)[0]
            arrays = tuple(tf.TensorArray(a.dtype, size=k, element_shape=a.shape)
                           for a in empty())

            def body(i, arrays):
                acc = one_iteration(x0, c, targets, seeds[i])
                return i + 1, tuple(ta.write(i, a) for ta, a in zip(arrays, acc))

            # One iteration at a time: parallel iterations would multiply the activations' memory.
            _, arrays = tf.while_loop(lambda i, _: i < k, body, (tf.constant(0), arrays),
                                      parallel_iterations=1)
            return tuple(ta.stack() for ta in arrays)

        fn = tf.function(chunk, jit_compile=self.jit_compile, input_signature=[
            tf.TensorSpec(self.input_shape, tf.float32), tf.TensorSpec([], tf.int32),
            tf.TensorSpec([num_targets], tf.int32), tf.TensorSpec([None, len(parts), 2], tf.int64)])
        self._chunk_fns[key] = fn
        return fn

    def _points_step_fn(self, num_targets: int):
        """A compiled call folding one batch of pool points into the accumulator."""
        if num_targets in self._step_fns:
            return self._step_fns[num_targets]
        acc_spec = tuple(tf.TensorSpec(a.shape, a.dtype) for a in self._empty(num_targets))

        def step(acc, x, c, targets, seed):
            return self._combine(acc, self._part(x, c, targets, seed))

        fn = tf.function(step, jit_compile=self.jit_compile, input_signature=[
            acc_spec, tf.TensorSpec((None,) + self.input_shape, tf.float32),
            tf.TensorSpec([], tf.int32), tf.TensorSpec([num_targets], tf.int32),
            tf.TensorSpec([2], tf.int64)])
        self._step_fns[num_targets] = fn
        return fn

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

    def _next_chunk(self, current: int, seconds_per_iteration: float) -> int:
        """The next chunk length: a power of two (so XLA compiles few shapes) whose
        expected wall time is at most CHUNK_SECONDS, at most 4x the current one."""
        fit = CHUNK_SECONDS / max(seconds_per_iteration, 1e-9)
        k = 1
        while k * 2 <= min(fit, 4 * current, MAX_CHUNK):
            k *= 2
        return k

    def iterate(self, x0: np.ndarray, c: int, targets: Sequence[int], nsamps: int, niters: int,
                seed: int, img_id: int, sampler: BallSampler, pool: SamplerPool | None = None,
                start_iter: int = 0, sync_every: int | None = None) -> Iterator[IterationStats]:
        """Run iterations ``start_iter .. niters-1`` of ``nsamps`` points around ``x0``.

        Yields one :class:`IterationStats` per iteration, in order. Iterations
        run in chunks: one compiled call (in-graph sampler) or one compiled
        call per batch with the statistics kept on the device (pool), then one
        copy to the host. The chunk length starts at 1 and adapts so that a
        chunk takes about CHUNK_SECONDS (progress and Ctrl-C stay responsive).
        With ``sync_every=k`` a chunk never runs past an iteration i with
        (i+1) % k == 0. A later call with the same sampler, batches and
        number of targets starts from the time per iteration its predecessor
        measured. The points of batch (iteration i, part p) depend only
        on (seed, img_id, i, p) and the sampler, so results do not depend on
        the chunking. With ``pool``, points come from the worker pool (and
        carry its transformation); without, they are drawn in the graph.
        Closing the generator early is safe: the pool's pending batches are
        drained so the pool can serve the next image.
        """
        parts = self.parts(nsamps)
        num_targets = len(targets)
        c_t = tf.constant(int(c), tf.int32)
        t_t = tf.constant(list(targets), tf.int32)
        x0_t = tf.constant(np.asarray(x0, np.float32))
        if sync_every is not None and int(sync_every) < 1:
            raise ValueError(f"sync_every must be positive, got {sync_every}")
        self.last_chunk_ends = []
        stream = None
        open_jobs = [True]

        def jobs():  # lazily, so that an early close submits nothing more
            for i in range(start_iter, niters):
                for p, n in enumerate(parts):
                    if not open_jobs[0]:
                        return
                    yield (seed, img_id, i, p), n

        finished = False
        rate_key = ("pool" if pool is not None else sampler, tuple(parts), num_targets)
        try:
            if pool is not None:
                stream = pool.stream(x0, jobs())
                step = self._points_step_fn(num_targets)
            else:
                chunk_fn = self._sampled_chunk_fn(sampler, tuple(parts), num_targets)
            known = self._seconds_per_iteration.get(rate_key)
            it, k = start_iter, 1 if known is None else self._next_chunk(MAX_CHUNK, known)
            while it < niters:
                planned = self.fixed_chunk or k
                end = min(niters, it + planned)
                if sync_every:
                    end = min(end, (it // int(sync_every) + 1) * int(sync_every))
                t0 = time.perf_counter()
                wait = 0.0
                if stream is None:
                    seeds = np.array([[tf_seed(seed, img_id, i, p) for p in range(len(parts))]
                                      for i in range(it, end)], np.int64)
                    out = chunk_fn(x0_t, c_t, t_t, tf.constant(seeds))
                else:
                    accs = []
                    for i in range(it, end):
                        acc = self._empty(num_targets)
                        for p in range(len(parts)):
                            w0 = time.perf_counter()
                            batch = tf.constant(next(stream))  # the pool hands over its own copy
                            wait += time.perf_counter() - w0
                            acc = step(acc, batch, c_t, t_t,
                                       tf.constant(tf_seed(seed, img_id, i, p)))
                        accs.append(acc)
                    out = tuple(tf.stack(column) for column in zip(*accs))
                best, slope, nans, zeros, steps = (o.numpy() for o in out)  # the host copy
                elapsed = time.perf_counter() - t0
                self.last_chunk_ends.append(end)
                count = end - it
                best = best.astype(np.float64)
                best[best == -np.inf] = np.nan  # every sample of the iteration was NaN
                slope = slope.astype(np.float64) if self.compute_slope else None
                for q in range(count):
                    yield IterationStats(
                        it + q, best[q], None if slope is None else slope[q],
                        nans[q], zeros[q], elapsed / count, wait / count,
                        steps[q] if self.order == 2 else None)
                it = end
                if count == planned or rate_key not in self._seconds_per_iteration:
                    # A short tail chunk carries the call's fixed cost over few iterations.
                    self._seconds_per_iteration[rate_key] = elapsed / count
                k = self._next_chunk(self.fixed_chunk or k, elapsed / count)
            finished = True
        finally:
            if stream is not None:
                open_jobs[0] = False
                if not finished and sys.exc_info()[0] in (None, GeneratorExit):
                    # Closed early by the consumer: collect the batches already submitted,
                    # so the workers' pending replies do not reach the next stream.
                    for _ in stream:
                        pass
                stream.close()
