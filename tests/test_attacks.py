"""Known-answer tests of attacks.py.

On a linear classifier z = W^T x + b the distance from x0 (class c) to the
half-space where class j beats c is g_j(x0) / ||w_c - w_j||_q in norm p (q the
dual norm), g_j = z_c - z_j. The untargeted minimum is the minimum over j
(the decision cell of c is an intersection of those half-spaces); a targeted
minimum equals the pairwise distance when, at the optimal point, no third
class beats j (checked per case below). The images sit in the middle of the
data range and the distances are small, so the box never interferes.
"""
import numpy as np
import pytest
import tensorflow as tf

import keras

import attacks
from attacks import AttackInputError, AttackName, IFGSMLoss, IterativeFGSM, CarliniWagnerL2
from common import Norm

D_SIDE = 8
DIM = D_SIDE * D_SIDE
K = 5
N_LINEAR = 10
#: Designed L-infinity distances from the bias image (zero) to classes 1..4.
DESIGN_LINF = np.array([0.0, 0.04, 0.07, 0.06, 0.09])
CW_REL_TOL = 0.02


class Linear:
    """A linear classifier with its exact minimal distortions."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        # Large logits (sd 5 per weight) make softmax nearly one-hot, so the
        # cross-entropy gradient of I-FGSM points like the logit difference.
        self.W = rng.normal(0.0, 5.0, (DIM, K)).astype(np.float32)
        self.b = np.array([-DESIGN_LINF[j] * np.abs(self.W[:, 0] - self.W[:, j]).sum()
                           for j in range(K)], np.float32)
        self.x = rng.uniform(-0.1, 0.1, (N_LINEAR, D_SIDE, D_SIDE, 1)).astype(np.float32)
        self.keras_model = keras.Sequential([keras.Input((D_SIDE, D_SIDE, 1)),
                                             keras.layers.Flatten(), keras.layers.Dense(K)])
        self.keras_model.layers[-1].set_weights([self.W, self.b])
        self.z = self.x.reshape(N_LINEAR, -1).astype(np.float64) @ self.W + self.b
        self.c = self.z.argmax(axis=1)

    def callable_model(self, x):
        return tf.matmul(tf.reshape(x, [-1, DIM]), self.W) + self.b

    def margin(self, i: int, j: int) -> float:
        return float(self.z[i, self.c[i]] - self.z[i, j])

    def w(self, i: int, j: int) -> np.ndarray:
        return (self.W[:, self.c[i]] - self.W[:, j]).astype(np.float64)

    def pair_distance(self, i: int, j: int, norm: Norm, kappa: float = 0.0) -> float:
        """Distance to the half-space z_j - z_c >= kappa, in ``norm``."""
        return (self.margin(i, j) + kappa) / np.linalg.norm(self.w(i, j), {
            Norm.L2: 2, Norm.LINF: 1}[norm])

    def untargeted(self, norm: Norm) -> np.ndarray:
        return np.array([min(self.pair_distance(i, j, norm) for j in range(K) if j != self.c[i])
                         for i in range(N_LINEAR)])

    def optimum(self, i: int, j: int, norm: Norm, kappa: float = 0.0) -> np.ndarray:
        """The closest point of the half-space, pushed 0.01% beyond it."""
        w = self.w(i, j)
        d = 1.0001 * self.pair_distance(i, j, norm, kappa)
        step = -w / np.linalg.norm(w) if norm is Norm.L2 else -np.sign(w)
        return self.x[i].reshape(-1) + d * step

    def targeted_is_pairwise(self, i: int, j: int, norm: Norm, kappa: float = 0.0) -> bool:
        """True where the pairwise distance is the exact targeted minimum."""
        xs = self.optimum(i, j, norm, kappa)
        zs = xs @ self.W + self.b
        others = np.delete(zs, j)
        return bool(zs[j] - others.max() >= kappa and np.abs(xs).max() < 0.5)

    def all_targets(self):
        """Every (image, target != class) pair, as repeated images and targets."""
        idx = np.repeat(np.arange(N_LINEAR), K - 1)
        tgt = np.array([j for i in range(N_LINEAR) for j in range(K) if j != self.c[i]])
        return idx, tgt


@pytest.fixture(scope="module")
def linear():
    lin = Linear(seed=3)
    # The fixture must be what the docstring promises: inputs mid-range,
    # every image correctly predicted by both model forms.
    assert np.abs(lin.x).max() <= 0.1
    np.testing.assert_allclose(lin.keras_model(lin.x).numpy(), lin.z, rtol=1e-4, atol=1e-3)
    return lin


def _assert_consistent(result, x, clip=(-0.5, 0.5)):
    """Shapes, range, and distortions that match the returned examples."""
    assert result.adv.shape == x.shape and result.adv.dtype == np.float32
    assert result.adv.min() >= clip[0] and result.adv.max() <= clip[1]
    delta = (result.adv.astype(np.float64) - x).reshape(len(x), -1)
    ok = result.success
    np.testing.assert_allclose(result.l2[ok], np.linalg.norm(delta, axis=1)[ok], rtol=1e-6)
    np.testing.assert_allclose(result.l1[ok], np.abs(delta).sum(axis=1)[ok], rtol=1e-6)
    np.testing.assert_allclose(result.linf[ok], np.abs(delta).max(axis=1)[ok], rtol=1e-6)
    for arr in (result.l1, result.l2, result.linf):
        assert np.all(np.isinf(arr[~ok]))
    np.testing.assert_array_equal(result.adv[~ok], x[~ok])


# --------------------------------------------------------------------------
# Carlini-Wagner L2 on the linear classifier
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["keras", "callable"])
def test_cw_untargeted_matches_exact_minimum(linear, kind):
    model = linear.keras_model if kind == "keras" else linear.callable_model
    res = attacks.carlini_wagner_l2(model, linear.x, max_iterations=1000)
    exact = linear.untargeted(Norm.L2)
    assert res.attack is AttackName.CW_L2 and not res.targeted and res.targets is None
    assert res.success.all()
    np.testing.assert_array_equal(res.labels, linear.c)
    _assert_consistent(res, linear.x)
    # No example can beat the true minimum (float32 slack only) ...
    assert np.all(res.l2 >= exact * (1 - 1e-4))
    # ... and CW finds it to within 2%.
    assert np.all(res.l2 <= exact * (1 + CW_REL_TOL)), res.l2 / exact
    pred = linear.keras_model(res.adv).numpy().argmax(axis=1)
    assert np.all(pred != linear.c)


def test_cw_targeted_matches_exact_minimum(linear):
    idx, tgt = linear.all_targets()
    x = linear.x[idx]
    res = attacks.carlini_wagner_l2(linear.keras_model, x, targets=tgt, max_iterations=1000)
    assert res.targeted and res.success.all()
    np.testing.assert_array_equal(res.targets, tgt)
    _assert_consistent(res, x)
    pair = np.array([linear.pair_distance(i, j, Norm.L2) for i, j in zip(idx, tgt)])
    exact = np.array([linear.targeted_is_pairwise(i, j, Norm.L2) for i, j in zip(idx, tgt)])
    # The pairwise distance is a lower bound for every target ...
    assert np.all(res.l2 >= pair * (1 - 1e-4))
    # ... and the exact minimum where no third class gets in the way.
    assert exact.sum() >= len(tgt) // 3, "fixture has too few exact targeted cases"
    assert np.all(res.l2[exact] <= pair[exact] * (1 + CW_REL_TOL)), res.l2[exact] / pair[exact]
    pred = linear.keras_model(res.adv).numpy().argmax(axis=1)
    np.testing.assert_array_equal(pred, tgt)


def test_cw_confidence_adds_kappa_to_the_margin(linear):
    kappa = 2.0
    idx, tgt = linear.all_targets()
    keep = np.array([linear.targeted_is_pairwise(i, j, Norm.L2, kappa) for i, j in zip(idx, tgt)])
    idx, tgt = idx[keep][:8], tgt[keep][:8]
    assert len(idx) >= 4
    res = attacks.carlini_wagner_l2(linear.keras_model, linear.x[idx], targets=tgt,
                                    confidence=kappa, max_iterations=1000)
    assert res.success.all()
    exact = np.array([linear.pair_distance(i, j, Norm.L2, kappa) for i, j in zip(idx, tgt)])
    assert np.all(res.l2 >= exact * (1 - 1e-4))
    assert np.all(res.l2 <= exact * (1 + CW_REL_TOL)), res.l2 / exact
    logits = linear.keras_model(res.adv).numpy()
    margin = logits[np.arange(len(tgt)), tgt] - np.where(np.eye(K)[tgt] > 0, -np.inf, logits).max(1)
    assert np.all(margin >= kappa * (1 - 1e-3))


def test_cw_already_adversarial_costs_nothing(linear):
    # Labels other than the prediction: the input already leaves its "label".
    wrong = (linear.c[:3] + 1) % K
    res = attacks.carlini_wagner_l2(linear.keras_model, linear.x[:3], labels=wrong,
                                    max_iterations=20, binary_search_steps=1)
    assert res.success.all()
    assert np.all(res.l2 < 1e-5)


def test_cw_results_do_not_depend_on_batching(linear):
    cfg = dict(max_iterations=200, binary_search_steps=4)
    whole = CarliniWagnerL2(linear.keras_model, batch_size=64, **cfg)(linear.x[:4])
    single = CarliniWagnerL2(linear.keras_model, batch_size=1, **cfg)(linear.x[:4])
    np.testing.assert_array_equal(whole.success, single.success)
    np.testing.assert_allclose(whole.l2, single.l2, rtol=1e-4)


# --------------------------------------------------------------------------
# I-FGSM on the linear classifier
# --------------------------------------------------------------------------
def _grid_index_above(grid, value):
    """Index of the smallest grid eps >= value."""
    return int(np.searchsorted(np.asarray(grid), value, side="left"))


@pytest.mark.parametrize("loss", list(IFGSMLoss))
def test_ifgsm_linf_targeted_finds_exact_grid_step(linear, loss):
    idx, tgt = linear.all_targets()
    keep = np.array([linear.targeted_is_pairwise(i, j, Norm.LINF) for i, j in zip(idx, tgt)])
    assert keep.sum() >= len(tgt) // 3
    idx, tgt = idx[keep], tgt[keep]
    x = linear.x[idx]
    attack = IterativeFGSM(linear.keras_model, loss=loss)
    assert attack.eps_grid == attacks.PAPER_EPS_GRID and attack.iterations == 50
    res = attack(x, targets=tgt)
    assert res.attack is AttackName.IFGSM_LINF and res.success.all()
    _assert_consistent(res, x)
    exact = np.array([linear.pair_distance(i, j, Norm.LINF) for i, j in zip(idx, tgt)])
    expected_eps = np.array(attacks.PAPER_EPS_GRID)[
        [_grid_index_above(attacks.PAPER_EPS_GRID, e) for e in exact]]
    # The smallest grid eps above the exact minimum succeeds, no smaller one.
    np.testing.assert_array_equal(res.eps, expected_eps)
    # Steps of eps/50 along the optimal direction stop within one step of it.
    assert np.all(res.linf >= exact * (1 - 1e-4))
    assert np.all(res.linf <= exact + res.eps / 50 + 1e-6)
    np.testing.assert_array_equal(linear.keras_model(res.adv).numpy().argmax(1), tgt)


@pytest.mark.parametrize("loss", list(IFGSMLoss))
def test_ifgsm_linf_untargeted_within_one_grid_step(linear, loss):
    res = attacks.ifgsm_linf(linear.keras_model, linear.x, loss=loss)
    exact = linear.untargeted(Norm.LINF)
    assert res.success.all()
    _assert_consistent(res, linear.x)
    assert np.all(res.linf >= exact * (1 - 1e-4))
    got = np.array([attacks.PAPER_EPS_GRID.index(e) for e in res.eps])
    first = np.array([_grid_index_above(attacks.PAPER_EPS_GRID, e) for e in exact])
    # The distortion lies below the grid value above the exact minimum, or the next one.
    assert np.all(got <= first + 1), (got, first)
    assert np.all(res.linf <= res.eps + 1e-7)


@pytest.mark.parametrize("loss", list(IFGSMLoss))
def test_ifgsm_l2_targeted_finds_exact_grid_step(linear, loss):
    idx, tgt = linear.all_targets()
    keep = np.array([linear.targeted_is_pairwise(i, j, Norm.L2) for i, j in zip(idx, tgt)])
    idx, tgt = idx[keep], tgt[keep]
    x = linear.x[idx]
    grid = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)
    res = attacks.ifgsm_l2(linear.keras_model, x, targets=tgt, eps_grid=grid, loss=loss)
    assert res.attack is AttackName.IFGSM_L2 and res.success.all()
    _assert_consistent(res, x)
    exact = np.array([linear.pair_distance(i, j, Norm.L2) for i, j in zip(idx, tgt)])
    expected = np.array(grid)[[_grid_index_above(grid, e) for e in exact]]
    np.testing.assert_array_equal(res.eps, expected)
    assert np.all(res.l2 >= exact * (1 - 1e-4))
    assert np.all(res.l2 <= exact + res.eps / 50 + 1e-6)


def test_ifgsm_batching_and_failure_reporting(linear):
    small = IterativeFGSM(linear.keras_model, batch_size=3)(linear.x)
    large = IterativeFGSM(linear.keras_model, batch_size=64)(linear.x)
    np.testing.assert_array_equal(small.eps, large.eps)
    np.testing.assert_allclose(small.adv, large.adv, atol=1e-6)
    # A grid far below the exact minimum cannot succeed: failures are reported
    # as inf distortions, the input returned unchanged.
    fail = attacks.ifgsm_linf(linear.keras_model, linear.x, eps_grid=(1e-4,))
    assert not fail.success.any()
    assert np.all(np.isinf(fail.linf)) and np.all(np.isinf(fail.eps))
    assert np.isnan(fail.mean_distortion(Norm.LINF)) and fail.success_rate == 0.0
    _assert_consistent(fail, linear.x)


def test_cw_failure_reporting(linear):
    # One short step with a tiny constant cannot reach the boundary.
    res = attacks.carlini_wagner_l2(linear.keras_model, linear.x[:3], max_iterations=5,
                                    binary_search_steps=1, initial_const=1e-6)
    assert not res.success.any()
    assert np.all(np.isnan(res.const)) and np.all(np.isinf(res.l2))
    _assert_consistent(res, linear.x[:3])


def test_input_validation(linear):
    attack = IterativeFGSM(linear.keras_model)
    with pytest.raises(AttackInputError, match="outside the data range"):
        attack(linear.x + 1.0)
    with pytest.raises(AttackInputError, match="targets must have shape"):
        attack(linear.x, targets=[1, 2])
    with pytest.raises(AttackInputError, match="class indices"):
        attack(linear.x, targets=np.full(N_LINEAR, K))
    with pytest.raises(AttackInputError):
        IterativeFGSM(linear.keras_model, norm=Norm.L1)
    with pytest.raises(AttackInputError):
        CarliniWagnerL2(linear.keras_model, max_iterations=0)


def test_paper_iterations():
    assert attacks.paper_cw_iterations("mnist") == 2000
    assert attacks.paper_cw_iterations("digits") == 2000
    assert attacks.paper_cw_iterations("cifar") == 1000


# --------------------------------------------------------------------------
# A small trained nonlinear model (sklearn digits, 8x8)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_mlp():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0 - 0.5).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1500], y[:1500], epochs=15, batch_size=64, verbose=0)
    pred = model.predict(x[1500:], verbose=0).argmax(axis=1)
    correct = np.flatnonzero(pred == y[1500:]) + 1500
    assert len(correct) > 0.85 * (len(x) - 1500), "the test model failed to train"
    pick = correct[:12]
    return model, x[pick], y[pick]


def _targets_other_than(y, shift=3):
    return (y + shift) % 10


@pytest.mark.parametrize("mode", ["untargeted", "targeted"])
def test_all_attacks_succeed_on_trained_model(digits_mlp, mode):
    model, x, y = digits_mlp
    targets = _targets_other_than(y) if mode == "targeted" else None
    results = [
        # CW's tanh variables move pixels at the box edges (the digits'
        # background) slowly: it needs the paper's iteration budget.
        attacks.carlini_wagner_l2(model, x, targets=targets, labels=y, max_iterations=1000,
                                  binary_search_steps=6),
        attacks.ifgsm_linf(model, x, targets=targets, labels=y),
        attacks.ifgsm_l2(model, x, targets=targets, labels=y),
    ]
    for res in results:
        assert res.success.all(), (res.attack, res.success)
        _assert_consistent(res, x)
        pred = model.predict(res.adv, verbose=0).argmax(axis=1)
        if targets is None:
            assert np.all(pred != y)
        else:
            np.testing.assert_array_equal(pred, targets)
        assert np.all(res.l2 > 0)


def test_cw_paper_defaults_code_path(digits_mlp):
    model, x, y = digits_mlp
    attack = CarliniWagnerL2(model)
    assert (attack.max_iterations, attack.binary_search_steps, attack.learning_rate,
            attack.initial_const, attack.confidence, attack.abort_early) == (1000, 9, 0.01,
                                                                           1e-3, 0.0, True)
    res = attack(x)
    assert res.success.all()
    np.testing.assert_array_equal(res.labels, y)
    _assert_consistent(res, x)
    assert np.all(res.const > 0)
    # CW minimises L2 directly: with the paper's budget it needs no more than
    # the I-FGSM-L2 radius that worked, and less L2 on average.
    fgm = attacks.ifgsm_l2(model, x)
    assert fgm.success.all()
    assert np.all(res.l2 <= fgm.eps + 1e-6)
    assert res.mean_distortion(Norm.L2) < fgm.mean_distortion(Norm.L2)


def test_other_data_range_gives_the_same_attack(digits_mlp):
    # The same model seen through inputs in [0, 1]: the geometry is unchanged,
    # so the eps found and the distortions must be too.
    model, x, y = digits_mlp
    shifted = lambda u: model(u - 0.5, training=False)  # noqa: E731
    base = attacks.ifgsm_linf(model, x)
    moved = attacks.ifgsm_linf(shifted, x + 0.5, clip_min=0.0, clip_max=1.0)
    np.testing.assert_array_equal(base.eps, moved.eps)
    np.testing.assert_allclose(base.linf, moved.linf, atol=1e-5)
    _assert_consistent(moved, x + 0.5, clip=(0.0, 1.0))
