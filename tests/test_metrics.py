"""Metrics against scikit-learn (random scores, ties, perfect separation, edge cases)."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from leakpipe.pipeline.math import metrics
from leakpipe.pipeline.report import registry


def cases():
    r = np.random.default_rng(0)
    yield "random", r.normal(size=200), r.random(200) < 0.3
    yield "heavy ties", r.integers(0, 4, 150).astype(float), r.random(150) < 0.5
    yield "perfect", np.r_[np.arange(10.0), 100 + np.arange(5.0)], np.r_[np.zeros(10, bool), np.ones(5, bool)]
    yield "inverted", np.r_[np.arange(10.0), -100 + np.arange(5.0)], np.r_[np.zeros(10, bool), np.ones(5, bool)]
    yield "all tied", np.ones(20), np.arange(20) % 3 == 0


@pytest.mark.parametrize("name,scores,positive", list(cases()), ids=[c[0] for c in cases()])
def test_roc_matches_sklearn(name, scores, positive):
    assert metrics.point(metrics.auroc, scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    fpr, tpr, thr = metrics.roc_curve(scores, positive)
    f2, t2, th2 = roc_curve(positive, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr, th2)
    # the trapezoid under our curve is the rank AUC (ties count one half)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.point(metrics.auroc, scores, positive), abs=1e-12)


def test_eer_and_fpr95_on_known_cases():
    sep = np.r_[np.zeros(10), np.ones(10)], np.r_[np.zeros(10, bool), np.ones(10, bool)]
    assert metrics.point(metrics.eer, *sep) == 0.0 and metrics.point(metrics.fpr_at_tpr, *sep) == 0.0
    assert (
        metrics.point(metrics.eer, -sep[0], sep[1]) == 1.0 and metrics.point(metrics.fpr_at_tpr, -sep[0], sep[1]) == 1.0
    )
    # identical distributions (all tied): EER 0.5 at the chance diagonal, FPR@95 = 1
    tied = np.ones(40), np.arange(40) % 2 == 0
    assert metrics.point(metrics.eer, *tied) == pytest.approx(0.5) and metrics.point(metrics.fpr_at_tpr, *tied) == 1.0


def test_eer_is_where_fpr_equals_fnr():
    r = np.random.default_rng(1)
    s = np.r_[r.normal(1, 1, 4000), r.normal(0, 1, 4000)]
    pos = np.r_[np.ones(4000, bool), np.zeros(4000, bool)]
    fpr, tpr, _ = roc_curve(pos, s)
    k = np.argmin(np.abs(fpr - (1 - tpr)))
    assert metrics.point(metrics.eer, s, pos) == pytest.approx((fpr[k] + 1 - tpr[k]) / 2, abs=2e-3)
    # two unit Gaussians one sigma apart: EER = Phi(-0.5) = 0.3085
    assert metrics.point(metrics.eer, s, pos) == pytest.approx(0.3085, abs=0.015)
    # FPR at 95% TPR for the same pair: threshold 1 - 1.645, FPR = 1 - Phi(-0.645) = 0.7405
    assert metrics.point(metrics.fpr_at_tpr, s, pos) == pytest.approx(0.7405, abs=0.02)


def ovl(a, b):
    """OVL's point estimate: its weights cover both samples."""
    return metrics.point(metrics.ovl, a, b, n=len(a) + len(b))


def test_ovl_of_known_densities():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 4000), rng.normal(1, 1, 4000)
    assert ovl(a, b) == pytest.approx(2 * 0.3085, abs=0.03)  # 2 Phi(-d/2)
    assert ovl(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ovl(a, a + 100) < 1e-6
    assert np.isnan(ovl(a[:1], b))
    assert 0 <= ovl(np.ones(5), np.ones(5) * 2) <= 1  # constant samples do not crash


def _true_ovl(fa, fb, lo, hi, points):
    from scipy import integrate

    return integrate.quad(lambda x: min(fa(x), fb(x)), lo, hi, points=points, limit=1000)[0]


OVL_CASES = {  # name: (sample a, sample b, density a, density b, integration range and break points)
    # the case: Scott's rule on these samples gave 0.037 for a true overlap of 0.101
    "narrow mode inside a wide mixture": (
        lambda r, n: r.normal(-100, 2, n),
        lambda r, n: np.where(r.random(n) < 0.1, r.normal(-100, 2, n), r.normal(-250, 50, n)),
        lambda x: stats.norm.pdf(x, -100, 2),
        lambda x: 0.1 * stats.norm.pdf(x, -100, 2) + 0.9 * stats.norm.pdf(x, -250, 50),
        -600,
        100,
        [-100, -250],
    ),
    "heavy tails (Student t, 2 dof)": (
        lambda r, n: stats.t.rvs(2, size=n, random_state=r),
        lambda r, n: stats.t.rvs(2, loc=3, size=n, random_state=r),
        lambda x: stats.t.pdf(x, 2),
        lambda x: stats.t.pdf(x, 2, loc=3),
        -2000,
        2000,
        [0, 1.5, 3],
    ),
    "bimodal against unimodal": (
        lambda r, n: np.where(r.random(n) < 0.5, r.normal(-3, 0.5, n), r.normal(3, 0.5, n)),
        lambda r, n: r.normal(0, 2, n),
        lambda x: 0.5 * stats.norm.pdf(x, -3, 0.5) + 0.5 * stats.norm.pdf(x, 3, 0.5),
        lambda x: stats.norm.pdf(x, 0, 2),
        -15,
        15,
        [-3, 0, 3],
    ),
    "shifted normals": (
        lambda r, n: r.normal(0, 1, n),
        lambda r, n: r.normal(2, 1, n),
        stats.norm.pdf,
        lambda x: stats.norm.pdf(x, 2),
        -10,
        12,
        [1],
    ),
}


@pytest.mark.parametrize("name", list(OVL_CASES))
def test_ovl_matches_numerical_integration_of_known_mixtures(name):
    """Measured at n = 2000 (seed 0): errors 0.009, 0.002, 0.008, 0.002 against quad()."""
    sample_a, sample_b, fa, fb, lo, hi, points = OVL_CASES[name]
    rng = np.random.default_rng(0)
    truth = _true_ovl(fa, fb, lo, hi, points)
    assert ovl(sample_a(rng, 2000), sample_b(rng, 2000)) == pytest.approx(truth, abs=0.02)


def test_ovl_of_two_samples_of_one_distribution_is_near_one():
    """Two finite samples never overlap fully; measured 0.96 at n = 2000."""
    rng = np.random.default_rng(0)
    assert ovl(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000)) > 0.93


def test_absent_class_and_single_class():
    y = np.array([0, 0, 1, 1])
    s = np.random.default_rng(0).random((4, 3))
    aucs = metrics.point(metrics.per_class_auc, s, y)
    assert np.isnan(aucs[2]) and not np.isnan(aucs[:2]).any()  # class 2 absent: documented NaN
    assert metrics.point(metrics.macro_auc, s, y) == pytest.approx(aucs[:2].mean())
    single = registry.evaluate(registry.CLOSED, registry.Closed(s, np.zeros(4, int), 3), 3)  # no AUC, no crash
    assert np.isnan(single["macro_auc"]) and single["top1"] == (s.argmax(1) == 0).mean()
    empty = metrics.point(metrics.top1, np.zeros(0, bool), n=0)
    assert np.isnan(empty)
    assert np.isnan(metrics.point(metrics.auroc, np.ones(3), np.ones(3, bool)))
    assert np.isnan(metrics.point(metrics.eer, np.ones(3), np.ones(3, bool)))


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.point(metrics.auroc, np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="shapes"):
        metrics.roc_curve(np.ones(3), np.ones(2, bool))


def test_confusion_and_closed_set_match_sklearn():
    r = np.random.default_rng(3)
    s, y = r.random((300, 5)), r.integers(0, 5, 300)
    got = registry.evaluate(registry.CLOSED, registry.Closed(s, y, 5), 5)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(s.argmax(1), y, 5), confusion_matrix(y, s.argmax(1), labels=range(5))
    )
    assert got["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y == c, s[:, c]) for c in range(5)]))
    assert got["top1"] == (s.argmax(1) == y).mean()
    assert "ece" not in got and "top5" not in got  # not a posterior; top-5 of 5 classes is always 1
    o = registry.evaluate(registry.OPEN, registry.Open(r.normal(1, 1, 50), r.normal(0, 1, 70)), 2, n_boot=20)
    assert set(o) == {"auroc", "eer", "ovl", "fpr_at_95tpr", "chance", "ci"} and set(o["ci"]) == set(o) - {
        "chance",
        "ci",
    }


def test_top_k_matches_scikit_learn():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(1)
    scores, labels = rng.normal(0, 1, (300, 8)), rng.integers(0, 8, 300)
    for k in (1, 3, 5):
        assert metrics.point(metrics.top_k, scores, labels, k) == pytest.approx(
            top_k_accuracy_score(labels, scores, k=k, labels=range(8))
        )


def test_expected_calibration_error():
    # by hand: confidences 0.9, 0.9 (one right) and 0.6 (right): |0.5-0.9| * 2/3 + |1-0.6| * 1/3
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    assert metrics.point(metrics.expected_calibration_error, probs, np.array([0, 1, 1])) == pytest.approx(
        0.4 * 2 / 3 + 0.4 / 3
    )
    rng = np.random.default_rng(2)
    probs = metrics.softmax(rng.normal(0, 1.5, (20000, 5)))
    calibrated = np.array([rng.choice(5, p=p) for p in probs])  # labels drawn from the posterior itself
    assert metrics.point(metrics.expected_calibration_error, probs, calibrated) < 0.02
    overconfident = metrics.softmax(5 * np.log(probs))
    assert metrics.point(metrics.expected_calibration_error, overconfident, calibrated) > 0.15


def test_oscr_against_a_direct_count():
    rng = np.random.default_rng(6)
    closed, open_ = rng.normal(1, 1, 200).round(1), rng.normal(0, 1, 150).round(1)
    correct = rng.random(200) < 0.7
    fpr, ccr, area = metrics.oscr(closed, correct, open_)
    for t in np.unique(np.r_[closed, open_])[::7]:
        want_fpr, want_ccr = (open_ >= t).mean(), ((closed >= t) & correct).mean()
        assert any(abs(f - want_fpr) < 1e-12 and abs(c - want_ccr) < 1e-12 for f, c in zip(fpr, ccr)), t
    assert fpr[-1] == 1 and ccr[-1] == pytest.approx(correct.mean())
    perfect = metrics.oscr(np.ones(10) + 5, np.ones(10, bool), np.zeros(10))
    assert perfect[2] == pytest.approx(1.0)
    assert 0 < area < correct.mean()


@pytest.mark.parametrize(
    "name", ["narrow mode inside a wide mixture", "heavy tails (Student t, 2 dof)", "bimodal against unimodal"]
)
def test_binned_ovl_is_the_exact_one_within_its_bound(name):
    """Above metrics.EXACT_ROWS rows OVL sums binned kernels (math/binning.py); here binned on 1,000 +
    1,000 rows against every kernel summed: the estimate within 5e-4 and every one of 30 resamples
    within 1e-3 (measured at 2,000 + 2,000 rows and 100 resamples: 1e-6 to 8e-5 and 2e-6 to 9e-5)."""
    from leakpipe.pipeline.math import bootstrap

    sample_a, sample_b, *_ = OVL_CASES[name]
    rng = np.random.default_rng(0)
    a, b = sample_a(rng, 1000), sample_b(rng, 1000)
    w = np.r_[metrics.unit(2000), bootstrap.weights(2000, 30, 1)]
    exact = metrics.ovl(a, b, w, metrics.ovl_kernels(a, b, binned=False))
    kernels = metrics.ovl_kernels(a, b, binned=True)
    assert all(spread is not None for _, _, spread in kernels[0])  # both samples' kernels binned
    binned = metrics.ovl(a, b, w, kernels)
    assert abs(binned[0] - exact[0]) <= 5e-4 and np.abs(binned - exact).max() <= 1e-3


def test_binned_pilot_density_is_the_exact_sum():
    """The adaptive KDE's pilot (a fixed-bandwidth KDE at every point) from binned kernels: within 1e-3
    of the exact sum, relatively, on a narrow mode beside a wide one and on heavy tails."""
    from leakpipe.pipeline.math import binning

    rng = np.random.default_rng(1)
    for x in (np.r_[rng.normal(-100, 2, 300), rng.normal(-250, 50, 2700)], stats.t.rvs(2, size=3000, random_state=rng)):
        h = metrics._pilot_bandwidth(x)
        exact = metrics._mixture(x, x, np.full(len(x), h))
        assert np.abs(binning.fixed_density(x, h) / exact - 1).max() < 1e-3
