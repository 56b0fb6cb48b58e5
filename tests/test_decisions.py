"""Calibration, conformal prediction sets and unseen p-values: known answers on synthetic data, and the
same sets and thresholds as MAPIE on the same scores."""

import warnings

import numpy as np
import pytest

from leakpipe.pipeline.config import ScoreConfig
from leakpipe.pipeline.math import calibration as calib, conformal, metrics
from leakpipe.pipeline.report import decisions
from leakpipe.pipeline.report.evaluate import Split


def _posterior(rng, n, c, scale=2.0):
    """n posteriors of c classes and labels drawn from them: a perfectly calibrated classifier."""
    logits = rng.normal(0, scale, (n, c))
    p = calib.scaled_posterior(logits, 1.0)
    y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return logits, p, y


def test_temperature_recovers_a_known_overconfidence():
    """Labels drawn from softmax(l), logits given as l * 2.5: the fitted T is 2.5, and it fixes the ECE."""
    logits, _, y = _posterior(np.random.default_rng(0), 20000, 6)
    t = calib.fit_temperature(logits * 2.5, y)
    assert t == pytest.approx(2.5, rel=0.03)
    before = metrics.point(metrics.expected_calibration_error, calib.scaled_posterior(logits * 2.5, 1.0), y)
    after = metrics.point(metrics.expected_calibration_error, calib.scaled_posterior(logits * 2.5, t), y)
    assert before > 0.05 and after < 0.015
    assert calib.nll(logits * 2.5, y, t) < calib.nll(logits * 2.5, y, 1.0)


def test_class_temperature_recovers_one_temperature_per_class():
    logits, _, y = _posterior(np.random.default_rng(1), 30000, 4)
    true = np.array([0.5, 1.0, 2.0, 3.0])
    t = calib.fit_class_temperature(logits * true, y)
    np.testing.assert_allclose(t, true, rtol=0.06)
    # the global fit is a special case: with one temperature for all, both agree
    same = calib.fit_class_temperature(logits * 2.0, y)
    np.testing.assert_allclose(same, calib.fit_temperature(logits * 2.0, y), rtol=0.03)


def test_reliability_bins_give_the_ece():
    logits, _, y = _posterior(np.random.default_rng(2), 3000, 5)
    p = calib.scaled_posterior(logits * 3, 1.0)
    r = calib.reliability(p, y)
    count, conf, acc = (np.asarray(r[k], float) for k in ("count", "confidence", "accuracy"))
    ok = count > 0
    assert count.sum() == 3000 and np.isnan(conf[~ok]).all()
    ece = (count[ok] * np.abs(acc[ok] - conf[ok])).sum() / count.sum()
    assert ece == pytest.approx(metrics.point(metrics.expected_calibration_error, p, y))


@pytest.mark.parametrize("score,mondrian", [("lac", False), ("aps", False), ("lac", True), ("aps", True)])
def test_split_conformal_coverage_has_its_known_finite_sample_value(score, mondrian):
    """Over 2000 exchangeable draws of n = 54 calibration and 100 test rows, mean coverage is at least
    1 - alpha and below 1 - alpha + 1/(n + 1); without ties it is exactly ceil((n + 1)(1 - alpha)) / (n + 1)
    = 50/55 (for Mondrian per class, with 54 calibration rows of each class). The scores need not be
    calibrated: rows of class k are logits N(0, 2) with 1.5 added to column k."""
    rng, alpha, n, m, c, trials = np.random.default_rng(3), 0.1, 54, 100, 4, 2000
    cal_y = np.tile(np.repeat(np.arange(c), n), (trials, 1)) if mondrian else rng.integers(0, c, (trials, n))
    y = np.concatenate([cal_y, rng.integers(0, c, (trials, m))], axis=1)
    p = calib.scaled_posterior((rng.normal(0, 2, (*y.shape, c)) + 1.5 * np.eye(c)[y]).reshape(-1, c), 1.0)
    p, u = p.reshape(*y.shape, c), rng.uniform(size=y.shape)  # the randomised test score too: exact coverage
    k = cal_y.shape[1]
    covered = [
        metrics.point(
            metrics.coverage,
            conformal.prediction_sets(
                conformal.class_scores(p[t, k:], score, u[t, k:]),
                conformal.thresholds(conformal.class_scores(p[t, :k], score, u[t, :k]), y[t, :k], c, alpha, mondrian),
            ),
            y[t, k:],
        )
        for t in range(trials)
    ]
    mean, se = np.mean(covered), np.std(covered) / np.sqrt(trials)
    assert 1 - alpha <= mean <= 1 - alpha + 1 / (n + 1)
    assert abs(mean - 50 / 55) < 4 * se, (mean, se)


def test_too_few_calibration_rows_give_every_class():
    assert conformal.quantile(np.arange(8.0), 0.1) == np.inf  # (8 + 1) * 0.9 = 8.1 > 8
    assert conformal.quantile(np.arange(9.0), 0.1) == 8.0  # the 9th smallest of 9
    q = conformal.thresholds(np.full((8, 3), 0.5), np.zeros(8, int), 3, 0.1)
    assert conformal.prediction_sets(np.ones((2, 3)), q).all()


def test_conformal_p_values_bound_the_false_alarm_rate():
    """p = (1 + #{val <= s}) / (n + 1) of exchangeable rows: P(p <= alpha) = floor(alpha (n + 1)) / (n + 1),
    at most alpha; `cut` is the same decision as a log-density threshold."""
    rng, n, alpha = np.random.default_rng(4), 38, 0.1
    flagged = []
    for _ in range(3000):
        x = rng.normal(size=n + 50)
        val, new = x[:n], x[n:]
        p = conformal.p_values(val, new)
        assert ((p <= alpha) == (new < conformal.cut(val, alpha))).all()
        flagged.append((p <= alpha).mean())
    assert np.mean(flagged) == pytest.approx(3 / 39, abs=0.006)  # floor(0.1 * 39) = 3
    assert np.mean(flagged) <= alpha
    assert conformal.p_values([1.0, 2.0, 3.0], [0.5, 2.0, 9.0]).tolist() == [0.25, 0.75, 1.0]
    assert conformal.cut(np.arange(5.0), 0.1) == -np.inf  # 1/(5 + 1) > 0.1: nothing can be flagged


def _mapie_estimator(p, y):
    """A prefit scikit-learn classifier whose predict_proba(X) is X: MAPIE on our posteriors."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Given(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            self.classes_, self.n_features_in_ = np.unique(y), np.asarray(X).shape[1]
            return self

        def predict_proba(self, X):
            return np.asarray(X)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    return Given().fit(p, y)


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_thresholds_and_coverage_match_mapie(score):
    """MAPIE's SplitConformalClassifier (prefit, its default include_last_label for APS) on the same
    posteriors: the same threshold, the same sets, coverage and mean width. MAPIE randomises APS's
    calibration scores with RandomState(seed).uniform as 1 - u; given that u, the scores agree."""
    from mapie.classification import SplitConformalClassifier
    from mapie.metrics.classification import classification_coverage_score, classification_mean_width_score

    rng = np.random.default_rng(5)
    _, p, y = _posterior(rng, 500, 6)
    cal, test = slice(0, 200), slice(200, None)
    est = _mapie_estimator(p[cal], y[cal])
    mp = SplitConformalClassifier(est, confidence_level=0.9, conformity_score=score, prefit=True, random_state=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.conformalize(p[cal], y[cal])
        _, theirs = mp.predict_set(p[test])
    u = 1 - np.random.RandomState(7).uniform(size=200) if score == "aps" else 1.0
    q = conformal.thresholds(conformal.class_scores(p[cal], score, u), y[cal], 6, 0.1)
    np.testing.assert_allclose(q, mp._mapie_classifier.conformity_score_function_.quantiles_[0])
    ours = conformal.prediction_sets(conformal.class_scores(p[test], score, 0.0), q)
    assert (ours == theirs[:, :, 0]).all()
    assert metrics.point(metrics.coverage, ours, y[test]) == pytest.approx(
        float(classification_coverage_score(y[test], theirs)[0])
    )
    assert metrics.point(metrics.set_size, ours) == pytest.approx(float(classification_mean_width_score(theirs)[0]))


def test_mondrian_thresholds_are_mapie_per_class():
    """Mondrian conformal is split conformal on each class's own calibration rows: MAPIE conformalized
    on one class at a time gives each class's threshold."""
    from mapie.classification import SplitConformalClassifier

    _, p, y = _posterior(np.random.default_rng(6), 400, 4)
    est = _mapie_estimator(p, y)
    q = conformal.thresholds(conformal.lac_scores(p), y, 4, 0.1, mondrian=True)
    for c in range(4):
        mp = SplitConformalClassifier(est, confidence_level=0.9, conformity_score="lac", prefit=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp.conformalize(p[y == c], y[y == c])
            mp.predict_set(p[:1])
        assert q[c] == pytest.approx(float(mp._mapie_classifier.conformity_score_function_.quantiles_[0]))


def _split(name, logits, y, classes, partition):
    n = len(y)
    return Split(
        name,
        {"logits": logits.astype(np.float32)},
        np.array([classes[k] for k in y], object),
        np.full(n, partition, object),
        np.full(n, "raw", object),
    )


def test_decisions_on_splits_report_coverage_shortfall_and_notes():
    """report/decisions on splits: an overconfident head calibrated on val; sets covering about 90% of
    exchangeable test rows and less of a shifted ("post-processed") copy; Mondrian's note for classes
    with fewer than 9 validation images; the unseen flag's false alarms near alpha."""
    rng, classes = np.random.default_rng(7), ["a", "b", "c"]
    logits, _, y = _posterior(rng, 2400, 3)
    val = _split("closed", logits[:400] * 3, y[:400], classes, "val")
    tests = {
        "raw": _split("closed", logits[400:] * 3, y[400:], classes, "test"),
        "step1": _split("closed", rng.permutation(logits[400:]) * 3, y[400:], classes, "test"),
    }
    cfg = ScoreConfig(bootstrap=200)
    c = decisions.calibration(val, tests, classes, cfg)
    assert c["temperature"] == pytest.approx(3.0, rel=0.15)
    assert set(c["methods"]) == {"none", "temperature", "class_temperature"}
    assert c["methods"]["temperature"]["test_ece"] < c["methods"]["none"]["test_ece"]
    lo, hi = c["variants"]["raw"]["ci"]["ece"]
    assert lo <= c["variants"]["raw"]["ece"] <= hi
    s = decisions.prediction_sets(val, tests, None, classes, cfg)
    raw, shifted = s["variants"]["raw"], s["variants"]["step1"]
    assert abs(raw["coverage"] - 0.9) < 0.03 and raw["ci"]["coverage"][0] <= raw["coverage"] <= raw["ci"]["coverage"][1]
    assert shifted["coverage"] < 0.7  # labels no longer follow the posterior: the guarantee breaks, visibly
    assert len(raw["per_class_coverage"]) == 3 and s["notes"] == []
    assert set(s["methods"]) == {"lac", "aps", "lac_mondrian", "aps_mondrian"}
    few = _split("closed", logits[:20], np.r_[np.zeros(16, int), np.ones(4, int)], classes, "val")
    small = decisions.prediction_sets(few, tests, None, classes, ScoreConfig(bootstrap=0, mondrian=True))
    assert "b, c have fewer than 9" in small["notes"][0] and small["thresholds"][1] == np.inf
    u = decisions.unseen(np.sort(rng.normal(size=400)), rng.normal(size=2000), rng.normal(-3, 1, 500), cfg)
    assert abs(u["false_alarm_rate"] - 0.1) < 0.03 and u["detection_rate"] > 0.8 and "note" not in u
    assert "steps of 1/6" in decisions.unseen(np.arange(5.0), np.arange(3.0), None, cfg)["note"]


def test_set_metrics_take_draw_weights_like_every_metric():
    """Weights w (B, n) count draws: a resample's coverage, set size and per-class coverage equal the
    plain ones on its rows repeated."""
    sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]], bool)
    y = np.array([0, 2, 2, 1, 1])
    w = np.array([[1, 1, 1, 1, 1], [2, 0, 1, 0, 2], [0, 0, 0, 3, 0]], float)
    assert metrics.coverage(sets, y, w).tolist() == pytest.approx([3 / 5, 3 / 5, 1.0])
    assert metrics.set_size(sets, w).tolist() == pytest.approx([6 / 5, 3 / 5, 2.0])
    per = metrics.per_class_coverage(sets, y, 3, w)
    assert per[0].tolist() == pytest.approx([1.0, 0.5, 0.5]) and per[1].tolist() == pytest.approx([1.0, 0.0, 1.0])
    assert np.isnan(per[2, 0]) and np.isnan(per[2, 2]) and per[2, 1] == 1.0  # classes 0, 2 not drawn
