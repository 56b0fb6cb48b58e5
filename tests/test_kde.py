"""KDE (Eq. 16-17) against a direct float64 numpy log-sum-exp; Mahalanobis (Eq. 13)."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.neighbors import KernelDensity

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.math.kde import GaussianKDE, log_density
from leakpipe.pipeline.math.mahalanobis import Mahalanobis, ledoit_wolf, mahalanobis_scores, shared_scores


def direct(q, x, h):
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    return logsumexp(-d2 / (2 * h * h), axis=1) - np.log(len(x)) - 0.5 * x.shape[1] * np.log(2 * np.pi * h * h)


@pytest.mark.parametrize("dim,h", [(128, 0.05), (128, 1.0), (128, 8.0), (512, 1.0), (3, 0.3)])
def test_log_density_matches_numpy_float64(dim, h):
    r = np.random.default_rng(dim)
    x, q = r.normal(size=(700, dim)), r.normal(size=(90, dim))
    q[:5] = x[:5]  # queries on reference points: the small-h regime where one kernel dominates
    want = direct(q, x, h)
    for block in (64, 333, 4096):  # chunking changes nothing
        got = log_density(torch.from_numpy(q), torch.from_numpy(x), h, block).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)


def test_float32_is_close_and_fit_object_matches_function():
    r = np.random.default_rng(0)
    x, q = r.normal(size=(500, 64)), r.normal(size=(50, 64))
    k64 = GaussianKDE(bandwidth=1.5).fit(x)
    k32 = GaussianKDE(bandwidth=1.5, dtype="float32").fit(x)
    np.testing.assert_allclose(k64.score_samples(q), direct(q, x, 1.5), atol=1e-8)
    np.testing.assert_allclose(k32.score_samples(q), direct(q, x, 1.5), atol=1e-2)


def test_agrees_with_sklearn_where_sklearn_is_right():
    """Low dimension, moderate bandwidth: scikit-learn's KernelDensity is exact there (its issue
    #25799 concerns small bandwidths in high dimension)."""
    r = np.random.default_rng(1)
    x, q = r.normal(size=(400, 4)), r.normal(size=(60, 4))
    ref = KernelDensity(bandwidth=0.8, rtol=0, atol=0).fit(x).score_samples(q)
    np.testing.assert_allclose(GaussianKDE(bandwidth=0.8).fit(x).score_samples(q), ref, atol=1e-8)


def test_cross_validated_bandwidth_generalises():
    """The CV choice is (near) the best grid bandwidth on fresh data from the same distribution."""
    r = np.random.default_rng(2)
    mix = lambda n: np.r_[r.normal(0, 0.3, (n // 2, 8)), r.normal(2, 1.0, (n - n // 2, 8))]  # noqa: E731
    x, fresh = mix(800), mix(800)
    kde = GaussianKDE(grid_factors=tuple(Config().score.kde_grid), folds=5, seed=0).fit(x)
    assert kde.cv["bandwidth"] == kde.bandwidth_ and len(kde.cv["mean_heldout_loglik"]) == len(kde.cv["grid"])
    assert not kde.cv["at_grid_edge"]
    fresh_ll = [GaussianKDE(bandwidth=h).fit(x).score_samples(fresh).mean() for h in kde.cv["grid"]]
    assert kde.score_samples(fresh).mean() >= max(fresh_ll) - 0.05 * abs(max(fresh_ll))
    assert (
        GaussianKDE(grid_factors=kde.grid_factors, folds=5, seed=0).fit(x).bandwidth_ == kde.bandwidth_
    )  # seeded folds


def test_kde_needs_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        GaussianKDE(bandwidth=1.0).fit(np.zeros((1, 3)))


def test_mahalanobis_matches_formula_and_floor():
    r = np.random.default_rng(3)
    h = np.r_[r.normal(0, 1, (50, 6)), r.normal(3, 2, (50, 6))]
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    h[y == 0, 5] = 7.0  # a constant dimension in class 0: variance 0
    m = Mahalanobis(2, floor=1e-3).fit(h, y)
    q = r.normal(1, 2, (10, 6))
    mu, var = np.stack([h[y == c].mean(0) for c in (0, 1)]), np.stack([h[y == c].var(0) for c in (0, 1)])
    want = np.stack([-(((q - mu[c]) ** 2) / (var[c] + m.eps_)).sum(1) for c in (0, 1)], 1)
    np.testing.assert_allclose(m.score(q), want)
    np.testing.assert_allclose(mahalanobis_scores(q, mu, var, m.eps_), want)
    assert m.eps_ == pytest.approx(1e-3 * h.var(0).mean())
    assert np.isfinite(m.score(q)).all()
    assert (m.score(h).argmax(1) == y).mean() > 0.95
    with pytest.raises(ValueError, match="no training embeddings"):
        Mahalanobis(3).fit(h, y)


def test_ledoit_wolf_is_scikit_learns_and_the_pooled_comparator_its_quadratic_form():
    """score.maha_shared: the class means, and one covariance of the deviations from them, Ledoit-Wolf
    shrunk (equal to scikit-learn's, also with more dimensions than rows), pooled with each class's
    floored diagonal: -(h - mu_c)^T Sigma_c^-1 (h - mu_c); at 1 without forming (N, C, D)."""
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    r = np.random.default_rng(4)
    for n, d in ((30, 64), (400, 8)):
        x = r.normal(0, 1, (n, d)) @ r.normal(0, 1, (d, d))
        x -= x.mean(0)
        np.testing.assert_allclose(ledoit_wolf(x), sklearn_ledoit_wolf(x, assume_centered=True)[0], atol=1e-10)
    h = np.r_[r.normal(0, 1, (20, 40)), r.normal(1, 1, (20, 40))]  # 40 rows of 40 dimensions: S is singular
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    mu = np.stack([h[y == c].mean(0) for c in (0, 1)])
    shared, q = ledoit_wolf(h - mu[y]), r.normal(0.5, 1, (7, 40))
    eps = 1e-3 * h.var(0).mean()
    for w in (1.0, 0.3):
        m = Mahalanobis(2, shared=w).fit(h, y)
        cov = [w * shared + (1 - w) * np.diag(h[y == c].var(0) + eps) for c in (0, 1)]
        want = np.stack([[-(x - mu[c]) @ np.linalg.inv(cov[c]) @ (x - mu[c]) for c in (0, 1)] for x in q])
        np.testing.assert_allclose(m.score(q), want, rtol=1e-8)
        assert (m.score(h).argmax(1) == y).mean() > 0.95
    one = Mahalanobis(2, shared=1.0).fit(h, y).score(q)
    np.testing.assert_allclose(shared_scores(q, mu, np.linalg.inv(shared)), one, rtol=1e-8)


def test_capped_reference_is_seeded_recorded_and_close_to_the_exact_kde():
    """score.kde_max_reference on a case that fits both ways: 4,000 references in 8-D (4 classes),
    1,000 closed and 1,000 open queries (the closed classes shifted by 1.2), bandwidth cross-validated
    on each. Measured for seeds 0, 1, 2: open-set AUROC 0.836, 0.914, 0.908 exact and 0.827, 0.901,
    0.899 with a cap of 1,000 (-0.009 to -0.013); median |log p difference| 0.55 to 0.73 nats; the
    bandwidths within 1%. The bounds below leave room for other BLAS builds, not for a wrong sample."""
    from leakpipe.pipeline.math.metrics import open_auroc

    r = np.random.default_rng(0)
    centres = r.normal(0, 1.5, (4, 8))
    x = centres[r.integers(0, 4, 4000)] + r.normal(0, 1, (4000, 8))
    q = np.r_[
        centres[r.integers(0, 4, 1000)] + r.normal(0, 1, (1000, 8)),
        centres[r.integers(0, 4, 1000)] + r.normal(0, 1, (1000, 8)) + 1.2,
    ]
    grid = (0.1, 0.2, 0.4, 0.8, 1.6)
    exact = GaussianKDE(folds=2, grid_factors=grid).fit(x)
    capped = GaussianKDE(folds=2, grid_factors=grid, max_reference=1000).fit(x)
    assert capped.reference == {"rows": 4000, "used": 1000, "max_reference": 1000, "seed": 0}
    assert exact.reference["used"] == 4000 and len(capped.reference_) == 1000
    e, c = exact.score_samples(q), capped.score_samples(q)
    auroc = [open_auroc(s[:1000], s[1000:]) for s in (e, c)]
    assert 0.8 < auroc[0] < 0.9 and abs(auroc[1] - auroc[0]) < 0.02
    assert np.median(np.abs(c - e)) < 1.0 and abs(capped.bandwidth_ / exact.bandwidth_ - 1) < 0.05
    again = GaussianKDE(folds=2, grid_factors=grid, max_reference=1000).fit(x)
    # the subsample is seeded: the same numbers for the same queries (a query block of another size may take
    # another BLAS kernel, and float64 sums in another order: seen on an AMD EPYC, not on the earlier machines)
    np.testing.assert_array_equal(again.score_samples(q), c)
    other = GaussianKDE(folds=2, grid_factors=grid, max_reference=1000, seed=1).fit(x)
    assert not np.array_equal(other.reference_.numpy(), capped.reference_.numpy())
    whole = GaussianKDE(bandwidth=0.5, max_reference=4000).fit(x)  # at or above N: every row, as before
    np.testing.assert_array_equal(whole.score_samples(q[:50]), GaussianKDE(bandwidth=0.5).fit(x).score_samples(q[:50]))


def test_rows_read_in_blocks_give_the_numbers_of_all_rows_at_once(monkeypatch):
    """Score reads a million rows' embeddings through EmbeddingRows, a block of rows at a time (memory:
    one block, not a float64 copy of every row); the KDE (fitted capped or not, gated or not) and the
    comparator's scores are the same, bit for bit, as from every row at once."""
    from leakpipe.pipeline.math import kde as kde_lib, mahalanobis as maha_lib

    r = np.random.default_rng(5)
    h, w = r.normal(0, 1, (3000, 16)).astype(np.float32), r.uniform(0.5, 1, (3000, 16)).astype(np.float32)
    y = r.integers(0, 3, 3000)
    for kind in ("h_bar", "gated"):
        whole, rows = kde_lib.embedding(h.astype(np.float64), w, kind), kde_lib.EmbeddingRows(h, w, kind)
        np.testing.assert_array_equal(np.asarray(rows), whole)
        np.testing.assert_array_equal(rows[[5, 2]], whole[[5, 2]])
        for cap in (0, 300):
            kde = GaussianKDE(bandwidth=0.7, block=64, max_reference=cap)
            want = kde.fit(whole)._log_density(whole)  # every query in one call
            monkeypatch.setattr(kde_lib, "QUERY_BLOCKS", 3)  # 16 calls of 192 rows
            got = GaussianKDE(bandwidth=0.7, block=64, max_reference=cap).fit(rows)
            np.testing.assert_array_equal(got.reference_.numpy(), kde.reference_.numpy())
            np.testing.assert_array_equal(got.score_samples(rows), want)
            monkeypatch.undo()
        for shared in (0.0, 0.5, 1.0):
            m = Mahalanobis(3, shared=shared).fit(whole, y)
            monkeypatch.setattr(maha_lib, "SCORE_CELLS", 1)  # blocks of 1,024 rows
            np.testing.assert_array_equal(m.score(rows), m._score(whole))
            monkeypatch.undo()
    mu = np.stack([h[y == c].mean(0) for c in range(3)]).astype(np.float64)
    np.testing.assert_array_equal(maha_lib.deviations(h.astype(np.float64), mu, y, rows=100), h - mu[y])
