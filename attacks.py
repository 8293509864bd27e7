"""Attack baselines for CLEVER: Carlini-Wagner L2 and iterative FGSM.

CLEVER estimates a lower bound on the distortion needed to change a
classifier's decision; attacks give upper bounds. The paper (ICLR 2018,
Table 2 to 4, docs/paper_tables.md) sets both side by side with

* Carlini-Wagner L2 (Carlini & Wagner, S&P 2017): tanh change of variables,
  Adam, binary search over the constant c, early abort, confidence kappa;
  1000 iterations (2000 on MNIST-like data), learning rate 0.01, 9 binary
  search steps from c = 1e-3;
* I-FGSM (Kurakin et al. 2016) for L-infinity with 50 iterations and, per
  image, the smallest eps of {0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0}
  that succeeds; and its L2 variant (normalised gradient steps, projection
  onto the L2 ball).

Everything works on batches of float32 NHWC images in ``[clip_min, clip_max]``
(default ``[-0.5, 0.5]``, the toolkit's data range) and on any Keras 3 model
or callable mapping such a batch to logits ``[N, K]``. The inner loops run
inside one ``tf.function`` per attack object, so a whole optimisation runs
as a single compiled ``tf.while_loop``.

Each attack returns an :class:`AttackResult`. Where an attack fails on an
image, its adversarial example is the input itself and its distortions are
``+inf``: "no upper bound found" is an infinitely large upper bound, so taking
the minimum over attacks or targets stays correct, and a plain mean over all
images becomes ``inf`` instead of silently dropping failures. Use
:meth:`AttackResult.mean_distortion` for the mean over successes.

Targets are integer class indices ``[N]``. Untargeted means any class other
than ``labels`` (by default the model's own prediction, as CLEVER uses the
predicted class c). An image that already satisfies the goal (untargeted: it
is misclassified; targeted: it is already classified as the target) counts as
a success with (near) zero distortion.
"""
from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from common import DATA_MAX, DATA_MIN, Norm, ToolError

log = logging.getLogger("clever.attacks")

__all__ = [
    "AttackName", "IFGSMLoss", "AttackResult", "AttackInputError",
    "CarliniWagnerL2", "IterativeFGSM", "carlini_wagner_l2", "ifgsm_linf", "ifgsm_l2",
    "distortions", "predict_logits", "paper_cw_iterations",
    "PAPER_EPS_GRID", "L2_EPS_GRID", "PAPER_CW_ITERATIONS",
]


class AttackName(enum.Enum):
    """The attacks of this module; ``value`` is the short name used in tables."""

    CW_L2 = "cw_l2"
    IFGSM_LINF = "ifgsm_li"
    IFGSM_L2 = "ifgsm_l2"


class IFGSMLoss(enum.Enum):
    """The loss whose gradient I-FGSM follows.

    ``CROSS_ENTROPY`` is the classic choice (Kurakin et al.; the EAD/CLEVER
    authors' I-FGM code). ``MARGIN`` is the logit difference of CW's f6
    (untargeted: max_{k != y} z_k - z_y; targeted: z_t - max_{k != t} z_k); on
    a linear classifier its sign gradient points exactly along the optimal
    L-infinity direction, which softmax probabilities may bend.
    """

    CROSS_ENTROPY = "xent"
    MARGIN = "margin"


#: I-FGSM L-infinity eps grid of the CLEVER paper (data range [-0.5, 0.5]).
PAPER_EPS_GRID: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0)

#: Default eps grid of the L2 variant. The paper gives no L2 grid; its
#: Table 2 reports I-FGSM L2 distortions up to about 5.6 on MNIST, and the
#: EAD authors' I-FGM searched L2 eps up to 10, so the grid spans 0.1 to 10
#: with roughly the same relative spacing as the L-infinity grid.
L2_EPS_GRID: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 10.0)

#: CW iterations used in the paper per dataset (docs/paper_tables.md).
PAPER_CW_ITERATIONS: dict[str, int] = {"mnist": 2000, "digits": 2000, "cifar": 1000,
                                       "imagenet": 1000}

# Binary search bookkeeping of Carlini's reference code: an upper bound of
# 1e10 means "no successful constant seen yet".
_NO_UPPER = 1e10
# Adam constants of TensorFlow 1's AdamOptimizer, which the CW reference used.
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
# atanh(+-1) is infinite: inputs on the box edges are pulled in by this factor.
_TANH_SHRINK = 0.999999
# Inputs this far outside the data range are rejected rather than clipped.
_RANGE_TOL = 1e-5


class AttackInputError(ToolError, ValueError):
    """Bad input to an attack (shape, range, labels); a ToolError for the CLIs."""


def paper_cw_iterations(dataset: str) -> int:
    """CW iterations of the paper for ``dataset`` (2000 MNIST-like, else 1000)."""
    return PAPER_CW_ITERATIONS.get(str(dataset).lower(), 1000)


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackResult:
    """What an attack found for N images.

    Attributes:
        attack: which attack produced it.
        targeted: whether ``targets`` were the goal (else: leave ``labels``).
        adv: [N, H, W, C] float32 adversarial examples within the data range;
            the unchanged input where ``success`` is False.
        success: [N] bool, True where ``adv`` is classified as the target
            (targeted) or not as the label (untargeted) by the model.
        l1, l2, linf: [N] float64 distortions ||adv - x||_p in input units;
            ``+inf`` where ``success`` is False.
        labels: [N] int64, the class of each input (given, or predicted).
        targets: [N] int64 target classes, or None when untargeted.
        eps: [N] float64, I-FGSM only: the grid eps that succeeded (inf where
            failed); None for CW.
        const: [N] float64, CW only: the constant c of the returned example
            (NaN where failed); None for I-FGSM.
    """

    attack: AttackName
    targeted: bool
    adv: np.ndarray
    success: np.ndarray
    l1: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    labels: np.ndarray
    targets: np.ndarray | None = None
    eps: np.ndarray | None = None
    const: np.ndarray | None = None

    def distortion(self, norm: Norm) -> np.ndarray:
        """[N] distortions in ``norm`` (inf for failures)."""
        return {Norm.L1: self.l1, Norm.L2: self.l2, Norm.LINF: self.linf}[norm]

    @property
    def success_rate(self) -> float:
        """Fraction of images attacked successfully (NaN for N = 0)."""
        return float(np.mean(self.success)) if self.success.size else math.nan

    def mean_distortion(self, norm: Norm) -> float:
        """Mean distortion over the successful images (NaN if none)."""
        values = self.distortion(norm)[self.success]
        return float(np.mean(values)) if values.size else math.nan


def distortions(adv: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L1, L2 and L-infinity norms of ``adv - x`` per image, each [N] float64."""
    delta = np.asarray(adv, np.float64) - np.asarray(x, np.float64)
    delta = delta.reshape(delta.shape[0], int(np.prod(delta.shape[1:])))
    return (np.abs(delta).sum(axis=1), np.sqrt(np.square(delta).sum(axis=1)),
            np.abs(delta).max(axis=1, initial=0.0))


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------
def _logits_fn(model) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function x -> float32 logits; Keras models run in inference mode."""
    import keras

    if isinstance(model, keras.layers.Layer):
        return lambda x: tf.cast(model(x, training=False), tf.float32)
    return lambda x: tf.cast(model(x), tf.float32)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def predict_logits(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits [N, K] float32 of ``model`` on ``x`` [N, H, W, C], in batches."""
    return _predict(tf.function(_logits_fn(model), reduce_retracing=True), x, batch_size)


def _predict(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
    out = [fn(tf.constant(x[sl])).numpy() for sl in _batches(len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _other_max(logits: tf.Tensor, onehot: tf.Tensor) -> tf.Tensor:
    """max_{k != class} logits[:, k], [B]; the class is where onehot is 1."""
    return tf.reduce_max(tf.where(onehot > 0, tf.fill(tf.shape(logits), -np.inf), logits), axis=1)


def _goal_margin(logits: tf.Tensor, onehot: tf.Tensor, targeted: bool) -> tf.Tensor:
    """[B] margin by which the goal is met; the goal is met where it is > 0.

    targeted: z_t - max_{k != t} z_k; untargeted: max_{k != y} z_k - z_y.
    """
    real = tf.reduce_sum(onehot * logits, axis=1)
    other = _other_max(logits, onehot)
    return real - other if targeted else other - real


def _per_image(mask: tf.Tensor, rank: int) -> tf.Tensor:
    """Reshape a [B] tensor to broadcast against [B, H, W, C]."""
    return tf.reshape(mask, [-1] + [1] * (rank - 1))


class _Prepared:
    """Validated inputs shared by the attacks."""

    def __init__(self, predict, x, labels, targets, clip_min: float, clip_max: float,
                 batch_size: int):
        x = np.asarray(x)
        if x.ndim < 2:
            raise AttackInputError(f"images must be [N, ...] with a batch axis, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise AttackInputError(f"images must be floating point, got {x.dtype}")
        x = x.astype(np.float32, copy=False)
        if not np.all(np.isfinite(x)):
            raise AttackInputError("images contain NaN or inf")
        if clip_max <= clip_min:
            raise AttackInputError(f"empty data range [{clip_min}, {clip_max}]")
        if x.size and (x.min() < clip_min - _RANGE_TOL or x.max() > clip_max + _RANGE_TOL):
            raise AttackInputError(
                f"images span [{x.min():.4g}, {x.max():.4g}], outside the data range "
                f"[{clip_min}, {clip_max}]; rescale them or pass their range as clip_min, clip_max "
                "(the default is [-0.5, 0.5], as collect_gradients.py --data_range)")
        self.x = np.clip(x, clip_min, clip_max)
        self.logits = _predict(predict, self.x, batch_size)
        n = len(self.x)
        self.num_classes = int(self.logits.shape[1]) if n else 0
        self.pred = self.logits.argmax(axis=1).astype(np.int64) if n else np.zeros(0, np.int64)
        self.labels = self.pred if labels is None else self._classes(labels, "labels")
        self.targets = None if targets is None else self._classes(targets, "targets")
        if self.targets is not None and labels is None:
            same = int(np.sum(self.targets == self.pred))
            if same:
                log.warning("%d of %d targets equal the predicted class: trivially successful",
                            same, n)

    def _classes(self, values, name: str) -> np.ndarray:
        arr = np.asarray(values)
        if arr.shape != (len(self.x),):
            raise AttackInputError(f"{name} must have shape [{len(self.x)}], got {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise AttackInputError(f"{name} must be integer class indices")
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise AttackInputError(f"{name} must be class indices in [0, {self.num_classes})")
        return arr

    @property
    def targeted(self) -> bool:
        return self.targets is not None

    def goal_classes(self) -> np.ndarray:
        """The class in the loss: the target, or the label to move away from."""
        return self.targets if self.targeted else self.labels

    def onehot(self, sl: slice) -> np.ndarray:
        return np.eye(self.num_classes, dtype=np.float32)[self.goal_classes()[sl]]


def _verify(predict, adv: np.ndarray, prep: _Prepared, found: np.ndarray,
            batch_size: int, name: AttackName) -> np.ndarray:
    """Re-run the model on the examples found; success only if the goal holds.

    The search decided on logits computed inside its loop; this guards the
    returned float32 arrays against any mismatch (a different batch shape can
    change the last bits of the logits of an example that sits on the boundary).
    """
    ok = found.copy()
    idx = np.flatnonzero(found)
    if idx.size == 0:
        return ok
    onehot = np.eye(prep.num_classes, dtype=np.float32)[prep.goal_classes()[idx]]
    for sl in _batches(idx.size, batch_size):
        logits = predict(tf.constant(adv[idx[sl]]))
        margin = _goal_margin(logits, tf.constant(onehot[sl]), prep.targeted).numpy()
        ok[idx[sl]] = margin > 0
    lost = int(found.sum() - ok.sum())
    if lost:
        log.warning("%s: %d example(s) found in the search do not re-verify; counted as failures",
                    name.value, lost)
    return ok


def _finish(name: AttackName, prep: _Prepared, adv: np.ndarray, found: np.ndarray,
            predict, batch_size: int, **params) -> AttackResult:
    success = _verify(predict, adv, prep, found, batch_size, name)
    adv = np.where(_np_per_image(success, adv.ndim), adv, prep.x).astype(np.float32)
    l1, l2, linf = distortions(adv, prep.x)
    for arr in (l1, l2, linf):
        arr[~success] = np.inf
    for key, arr in params.items():
        if arr is not None:
            arr[~success] = np.inf if key == "eps" else np.nan
    log.info("%s (%s): %d/%d successful, mean L2 %.5g, mean Linf %.5g", name.value,
             "targeted" if prep.targeted else "untargeted", int(success.sum()), len(success),
             np.mean(l2[success]) if success.any() else math.nan,
             np.mean(linf[success]) if success.any() else math.nan)
    return AttackResult(attack=name, targeted=prep.targeted, adv=adv, success=success,
                        l1=l1, l2=l2, linf=linf, labels=prep.labels.copy(),
                        targets=None if prep.targets is None else prep.targets.copy(), **params)


def _np_per_image(mask: np.ndarray, rank: int) -> np.ndarray:
    return mask.reshape([-1] + [1] * (rank - 1))


def _check_int(name: str, value, minimum: int) -> int:
    if int(value) != value or value < minimum:
        raise AttackInputError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_float(name: str, value, allow_zero: bool) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise AttackInputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


# --------------------------------------------------------------------------
# Carlini-Wagner L2
# --------------------------------------------------------------------------
class CarliniWagnerL2:
    """Carlini-Wagner L2 attack, batched and compiled.

    Minimises ||x' - x||_2^2 + c * max(0, margin + kappa) over
    x' = mid + half * tanh(w), so x' stays in the data range without
    clipping; margin is max_{k != t} z_k - z_t (targeted) or
    z_y - max_{k != y} z_k (untargeted). Adam (TensorFlow 1's formulation,
    as in the reference code) runs ``max_iterations`` steps per binary-search
    step from w = atanh(x); c starts at ``initial_const``, is multiplied by 10
    until an example is found and then bisected, per image. The smallest-L2
    example that met the goal with confidence kappa, over all steps, is
    returned.

    Early abort is decided per image (the reference code decided for the
    whole batch): every ``max_iterations // 10`` iterations an image whose
    loss did not fall below 0.9999 of the previous check stops updating. So
    results do not depend on which images share a batch, and the loop ends
    when every image has stopped.

    Args:
        model: Keras 3 model or callable, [B, H, W, C] float32 -> [B, K] logits.
        confidence: kappa >= 0, the logit margin the example must exceed.
        learning_rate: Adam step size in tanh space (paper: 0.01).
        binary_search_steps: steps of the search over c (paper code: 9).
        max_iterations: Adam steps per search step (paper: 1000, 2000 on
            MNIST-like data; see :func:`paper_cw_iterations`).
        initial_const: the first c (reference code: 1e-3).
        abort_early: stop an image's optimisation once its loss stalls.
        batch_size: images optimised together (memory/speed only).
        clip_min, clip_max: the data range of the model's inputs.
    """

    def __init__(self, model, *, confidence: float = 0.0, learning_rate: float = 1e-2,
                 binary_search_steps: int = 9, max_iterations: int = 1000,
                 initial_const: float = 1e-3, abort_early: bool = True, batch_size: int = 128,
                 clip_min: float = DATA_MIN, clip_max: float = DATA_MAX):
        self.model = model
        self.confidence = _check_float("confidence", confidence, allow_zero=True)
        self.learning_rate = _check_float("learning_rate", learning_rate, allow_zero=False)
        self.binary_search_steps = _check_int("binary_search_steps", binary_search_steps, 1)
        self.max_iterations = _check_int("max_iterations", max_iterations, 1)
        self.initial_const = _check_float("initial_const", initial_const, allow_zero=False)
        self.abort_early = bool(abort_early)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        # The reference code sets c to the best upper bound on the last step
        # when it searches 10 or more steps.
        self.repeat = self.binary_search_steps >= 10
        self._logits = _logits_fn(model)
        self._predict = tf.function(self._logits, reduce_retracing=True)
        self._search = tf.function(self._search_step, reduce_retracing=True)

    def __call__(self, x: np.ndarray, targets: Sequence[int] | None = None,
                 labels: Sequence[int] | None = None) -> AttackResult:
        """Attack images ``x`` [N, H, W, C] in the data range.

        Args:
            x: [N, H, W, C] float images in [clip_min, clip_max].
            targets: [N] target classes (targeted attack), or None (untargeted).
            labels: [N] classes of the inputs; default: the model's prediction.
                Untargeted attacks move away from them.
        Returns:
            An :class:`AttackResult` (``const`` holds c of each example).
        """
        prep = _Prepared(self._predict, x, labels, targets, self.clip_min, self.clip_max,
                         self.batch_size)
        n = len(prep.x)
        adv = prep.x.copy()
        found = np.zeros(n, bool)
        best_const = np.full(n, np.nan)
        for sl in _batches(n, self.batch_size):
            adv[sl], found[sl], best_const[sl] = self._attack_batch(prep.x[sl], prep.onehot(sl),
                                                                   prep.targeted)
        return _finish(AttackName.CW_L2, prep, adv, found, self._predict, self.batch_size,
                       const=best_const)

    def _attack_batch(self, x0: np.ndarray, onehot: np.ndarray, targeted: bool):
        b = len(x0)
        mid = (self.clip_max + self.clip_min) / 2.0
        half = (self.clip_max - self.clip_min) / 2.0
        w0 = np.arctanh(np.clip((x0 - mid) / half, -1.0, 1.0) * _TANH_SHRINK).astype(np.float32)
        lower = np.zeros(b)
        upper = np.full(b, _NO_UPPER)
        const = np.full(b, self.initial_const)
        best_l2 = tf.fill([b], tf.constant(np.inf, tf.float32))
        best_adv = tf.constant(x0)
        best_const = tf.fill([b], tf.constant(np.nan, tf.float32))
        x0_t, w0_t, onehot_t = tf.constant(x0), tf.constant(w0), tf.constant(onehot)
        for step in range(self.binary_search_steps):
            if self.repeat and step == self.binary_search_steps - 1:
                const = np.where(upper < _NO_UPPER, upper, const)
            best_l2, best_adv, best_const, step_ok = self._search(
                x0_t, w0_t, onehot_t, tf.constant(const, tf.float32), best_l2, best_adv,
                best_const, targeted=targeted)
            step_ok = step_ok.numpy()
            upper = np.where(step_ok, np.minimum(upper, const), upper)
            lower = np.where(step_ok, lower, np.maximum(lower, const))
            const = np.where(upper < _NO_UPPER, (lower + upper) / 2.0, const * 10.0)
            log.debug("cw step %d: %d/%d found in this step, %d/%d found so far", step,
                      int(step_ok.sum()), b, int(np.isfinite(best_l2.numpy()).sum()), b)
        found = np.isfinite(best_l2.numpy())
        return best_adv.numpy(), found, best_const.numpy().astype(np.float64)

    def _search_step(self, x0, w0, onehot, const, best_l2, best_adv, best_const, targeted: bool):
        """One binary-search step: Adam from w0 for up to max_iterations steps.

        Shapes: x0, w0, best_adv [B, H, W, C]; onehot [B, K]; const, best_l2
        (squared L2), best_const [B]. Returns the updated best_l2, best_adv,
        best_const and step_ok [B] (an example meeting the goal was seen).
        """
        rank = len(x0.shape)
        axes = list(range(1, rank))
        mid = (self.clip_max + self.clip_min) / 2.0
        half = (self.clip_max - self.clip_min) / 2.0
        kappa = tf.constant(self.confidence, tf.float32)
        lr = tf.constant(self.learning_rate, tf.float32)
        check_every = max(1, self.max_iterations // 10)
        b = tf.shape(x0)[0]

        def cond(i, mod, m, v, prev, active, best_l2, best_adv, best_const, step_ok):
            return tf.logical_and(i < self.max_iterations, tf.reduce_any(active))

        def body(i, mod, m, v, prev, active, best_l2, best_adv, best_const, step_ok):
            with tf.GradientTape() as tape:
                tape.watch(mod)
                adv = tf.tanh(w0 + mod) * half + mid
                logits = self._logits(adv)
                l2 = tf.reduce_sum(tf.square(adv - x0), axis=axes)
                # Goal met with confidence kappa where margin - kappa > 0.
                shortfall = kappa - _goal_margin(logits, onehot, targeted)
                loss_each = l2 + const * tf.nn.relu(shortfall)
                loss = tf.reduce_sum(loss_each)
            grad = tape.gradient(loss, mod)
            ok = shortfall < 0
            better = tf.logical_and(ok, l2 < best_l2)
            best_l2 = tf.where(better, l2, best_l2)
            best_adv = tf.where(_per_image(better, rank), adv, best_adv)
            best_const = tf.where(better, const, best_const)
            step_ok = tf.logical_or(step_ok, ok)
            if self.abort_early:
                check = tf.equal(i % check_every, 0)
                stalled = tf.logical_and(check, loss_each > prev * 0.9999)
                prev = tf.where(check, loss_each, prev)
                active = tf.logical_and(active, tf.logical_not(stalled))
            t = tf.cast(i + 1, tf.float32)
            m_new = _ADAM_BETA1 * m + (1.0 - _ADAM_BETA1) * grad
            v_new = _ADAM_BETA2 * v + (1.0 - _ADAM_BETA2) * tf.square(grad)
            lr_t = lr * tf.sqrt(1.0 - _ADAM_BETA2 ** t) / (1.0 - _ADAM_BETA1 ** t)
            mod_new = mod - lr_t * m_new / (tf.sqrt(v_new) + _ADAM_EPS)
            keep = _per_image(active, rank)
            return (i + 1, tf.where(keep, mod_new, mod), tf.where(keep, m_new, m),
                    tf.where(keep, v_new, v), prev, active, best_l2, best_adv, best_const,
                    step_ok)

        zeros = tf.zeros_like(w0)
        init = (tf.constant(0), zeros, zeros, zeros, tf.fill([b], tf.constant(np.inf, tf.float32)),
                tf.ones([b], tf.bool), best_l2, best_adv, best_const, tf.zeros([b], tf.bool))
        out = tf.while_loop(cond, body, init)
        return out[6], out[7], out[8], out[9]


def carlini_wagner_l2(model, x: np.ndarray, targets: Sequence[int] | None = None,
                      labels: Sequence[int] | None = None, **config) -> AttackResult:
    """One-shot :class:`CarliniWagnerL2` (``config``: its keyword arguments)."""
    return CarliniWagnerL2(model, **config)(x, targets=targets, labels=labels)


# --------------------------------------------------------------------------
# I-FGSM (L-infinity) and its L2 variant
# --------------------------------------------------------------------------
class IterativeFGSM:
    """Iterative fast gradient method with a per-image search over eps.

    For each eps of the grid in increasing order, the images not yet broken
    take ``iterations`` steps of size ``step_scale * eps / iterations`` along
    sign(grad) (L-infinity) or grad / ||grad||_2 (L2) of the loss, each step
    projected onto the eps-ball around the input and clipped to the data
    range. An image stops at its first iterate that meets the goal (so its
    distortion can be below eps) and at the first eps that succeeds; the
    result holds that iterate and that eps.

    The step eps / iterations is the one of the EAD/CLEVER authors' I-FGM; it
    reaches the ball's surface only after all iterations, so the first success
    along the path is found to within eps / iterations.

    Args:
        model: Keras 3 model or callable, [B, H, W, C] float32 -> [B, K] logits.
        norm: ``Norm.LINF`` (I-FGSM) or ``Norm.L2`` (its L2 variant).
        eps_grid: radii to try; default :data:`PAPER_EPS_GRID` for L-infinity,
            :data:`L2_EPS_GRID` for L2.
        iterations: steps per eps (paper: 50).
        step_scale: step size as a multiple of eps / iterations.
        loss: the loss followed (:class:`IFGSMLoss`), cross-entropy by default.
        stop_on_success: freeze an image at its first successful iterate; if
            False only the last iterate of each eps is checked.
        batch_size: images attacked together (memory/speed only).
        clip_min, clip_max: the data range of the model's inputs.
    """

    def __init__(self, model, *, norm: Norm = Norm.LINF, eps_grid: Sequence[float] | None = None,
                 iterations: int = 50, step_scale: float = 1.0,
                 loss: IFGSMLoss = IFGSMLoss.CROSS_ENTROPY, stop_on_success: bool = True,
                 batch_size: int = 128, clip_min: float = DATA_MIN, clip_max: float = DATA_MAX):
        if norm not in (Norm.LINF, Norm.L2):
            raise AttackInputError(f"I-FGSM supports the L-infinity and L2 norms, not {norm}")
        self.model = model
        self.norm = norm
        grid = (PAPER_EPS_GRID if norm is Norm.LINF else L2_EPS_GRID) if eps_grid is None else eps_grid
        self.eps_grid = tuple(sorted(_check_float("eps", e, allow_zero=False) for e in grid))
        if not self.eps_grid:
            raise AttackInputError("eps_grid is empty")
        self.iterations = _check_int("iterations", iterations, 1)
        self.step_scale = _check_float("step_scale", step_scale, allow_zero=False)
        self.loss = IFGSMLoss(loss)
        self.stop_on_success = bool(stop_on_success)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.name = AttackName.IFGSM_LINF if norm is Norm.LINF else AttackName.IFGSM_L2
        self._logits = _logits_fn(model)
        self._predict = tf.function(self._logits, reduce_retracing=True)
        self._run = tf.function(self._run_eps, reduce_retracing=True)

    def __call__(self, x: np.ndarray, targets: Sequence[int] | None = None,
                 labels: Sequence[int] | None = None) -> AttackResult:
        """Attack images ``x`` [N, H, W, C]; arguments as :meth:`CarliniWagnerL2.__call__`.

        Returns an :class:`AttackResult` whose ``eps`` holds the grid eps that
        succeeded per image (inf where none did).
        """
        prep = _Prepared(self._predict, x, labels, targets, self.clip_min, self.clip_max,
                         self.batch_size)
        n = len(prep.x)
        adv = prep.x.copy()
        found = np.zeros(n, bool)
        eps_used = np.full(n, np.inf)
        onehot_all = prep.onehot(slice(0, n))
        for eps in self.eps_grid:
            todo = np.flatnonzero(~found)
            if todo.size == 0:
                break
            for sl in _batches(todo.size, self.batch_size):
                idx = todo[sl]
                eps_t = tf.fill([idx.size], tf.constant(eps, tf.float32))
                out_adv, ok = self._run(tf.constant(prep.x[idx]), tf.constant(onehot_all[idx]),
                                        eps_t, targeted=prep.targeted)
                ok = ok.numpy()
                adv[idx[ok]] = out_adv.numpy()[ok]
                found[idx[ok]] = True
                eps_used[idx[ok]] = eps
            log.debug("%s eps %.4g: %d/%d found so far", self.name.value, eps, int(found.sum()), n)
        return _finish(self.name, prep, adv, found, self._predict, self.batch_size, eps=eps_used)

    def _loss(self, logits, onehot, targeted: bool):
        """[B] loss to ascend."""
        if self.loss is IFGSMLoss.MARGIN:
            return _goal_margin(logits, onehot, targeted)
        xent = tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits)
        return -xent if targeted else xent

    def _run_eps(self, x0, onehot, eps, targeted: bool):
        """``iterations`` steps within radius eps [B] around x0 [B, H, W, C].

        Returns (adv [B, H, W, C], ok [B] bool): the first iterate meeting the
        goal (or the last one checked) and whether it does.
        """
        rank = len(x0.shape)
        axes = list(range(1, rank))
        alpha = _per_image(eps * (self.step_scale / self.iterations), rank)
        radius = _per_image(eps, rank)
        b = tf.shape(x0)[0]
        last = self.iterations

        def cond(i, x, active, found, out):
            return tf.logical_and(i <= last, tf.reduce_any(active))

        def body(i, x, active, found, out):
            with tf.GradientTape() as tape:
                tape.watch(x)
                logits = self._logits(x)
                loss = tf.reduce_sum(self._loss(logits, onehot, targeted))
            grad = tape.gradient(loss, x)
            ok = _goal_margin(logits, onehot, targeted) > 0
            if not self.stop_on_success:
                ok = tf.logical_and(ok, tf.equal(i, last))
            record = tf.logical_and(ok, active)
            found = tf.logical_or(found, record)
            out = tf.where(_per_image(record, rank), x, out)
            active = tf.logical_and(active, tf.logical_not(record))
            if self.norm is Norm.LINF:
                step = tf.sign(grad)
                x_new = x + alpha * step
                eta = tf.clip_by_value(x_new - x0, -radius, radius)
            else:
                gnorm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=axes, keepdims=True))
                # A zero gradient gives a zero step, not NaN.
                step = grad / tf.maximum(gnorm, 1e-12)
                eta = x + alpha * step - x0
                enorm = tf.sqrt(tf.reduce_sum(tf.square(eta), axis=axes, keepdims=True))
                eta = eta * tf.minimum(1.0, radius / tf.maximum(enorm, 1e-12))
            # Clipping to the box only shrinks |eta| per coordinate, so the
            # result stays inside the eps-ball of either norm.
            x_new = tf.clip_by_value(x0 + eta, self.clip_min, self.clip_max)
            x = tf.where(_per_image(active, rank), x_new, x)
            return i + 1, x, active, found, out

        init = (tf.constant(0), x0, tf.ones([b], tf.bool), tf.zeros([b], tf.bool), x0)
        out = tf.while_loop(cond, body, init)
        return out[4], out[3]


def ifgsm_linf(model, x: np.ndarray, targets: Sequence[int] | None = None,
               labels: Sequence[int] | None = None, **config) -> AttackResult:
    """One-shot L-infinity :class:`IterativeFGSM` (``config``: its keyword arguments)."""
    return IterativeFGSM(model, norm=Norm.LINF, **config)(x, targets=targets, labels=labels)


def ifgsm_l2(model, x: np.ndarray, targets: Sequence[int] | None = None,
             labels: Sequence[int] | None = None, **config) -> AttackResult:
    """One-shot L2 :class:`IterativeFGSM` (``config``: its keyword arguments)."""
    return IterativeFGSM(model, norm=Norm.L2, **config)(x, targets=targets, labels=labels)
