"""The vectorised bootstrap equals, resample by resample, the plain metrics on explicitly
resampled rows (and groups), to float rounding."""

import numpy as np
import pytest

from leakpipe.pipeline.config import ScoreConfig
from leakpipe.pipeline.math import bootstrap, metrics


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    n, c = 120, 4
    labels = rng.integers(0, c, n)
    probs = metrics.softmax(rng.normal(0, 1, (n, c)) + 1.5 * np.eye(c)[labels])
    scores = np.round(rng.normal(0, 1, n), 1)  # ties on purpose
    positive = rng.random(n) < 0.4
    return labels, probs, scores, positive


def resampled(w_row):
    return np.repeat(np.arange(len(w_row)), w_row.astype(int))


def test_every_metric_matches_a_loop_over_explicit_resamples(data):
    labels, probs, scores, positive = data
    w = bootstrap.weights(len(labels), 40, seed=0)
    pred = probs.argmax(1)
    got = {
        "top1": metrics.top1(pred == labels, w),
        "balanced": metrics.balanced_accuracy(pred, labels, 4, w),
        "macro_auc": metrics.macro_auc(probs, labels, w),
        "auroc": metrics.auroc(scores, positive, w),
        "eer": metrics.eer(scores, positive, w),
        "fpr95": metrics.fpr_at_tpr(scores, positive, w),
    }
    per_class = metrics.per_class_auc(probs, labels, w)
    assert np.allclose(metrics.macro_auc(probs, labels, w, per_class), got["macro_auc"], atol=1e-15)
    for b in range(len(w)):
        i = resampled(w[b])
        recalls = [np.mean(pred[i][labels[i] == k] == k) for k in range(4) if (labels[i] == k).any()]
        want = {
            "top1": metrics.point(metrics.top1, probs[i].argmax(1) == labels[i]),
            "balanced": np.mean(recalls),
            "macro_auc": metrics.point(metrics.macro_auc, probs[i], labels[i]),
            "auroc": metrics.point(metrics.auroc, scores[i], positive[i]),
            "eer": metrics.point(metrics.eer, scores[i], positive[i]),
            "fpr95": metrics.point(metrics.fpr_at_tpr, scores[i], positive[i]),
        }
        for k in want:
            assert got[k][b] == pytest.approx(want[k], abs=1e-12), (k, b)
        for k in range(4):
            assert per_class[b, k] == pytest.approx(
                metrics.point(metrics.auroc, probs[i, k], labels[i] == k), abs=1e-12
            ), (k, b)


def test_groups_are_drawn_whole():
    groups = np.repeat(np.arange(10), 3)  # 10 prompts x 3 images
    w = bootstrap.weights(30, 200, seed=1, groups=groups)
    assert (w.reshape(200, 10, 3) == w.reshape(200, 10, 3)[:, :, :1]).all()  # a prompt's images together
    assert (w.sum(axis=1) == 30).all()


def test_interval_covers_the_truth_at_about_the_stated_rate():
    """Coverage of the 95% interval for the AUROC of two known normals (true 0.760): measured 0.945
    over 200 data sets of 100 + 100 scores."""
    from scipy.stats import norm

    rng = np.random.default_rng(5)
    truth, hits = norm.cdf(1 / np.sqrt(2)), 0
    for k in range(200):
        scores = np.r_[rng.normal(1, 1, 100), rng.normal(0, 1, 100)]
        positive = np.r_[np.ones(100, bool), np.zeros(100, bool)]
        lo, hi = bootstrap.interval(metrics.auroc(scores, positive, bootstrap.weights(200, 400, seed=k)))
        hits += lo <= truth <= hi
    assert 0.89 <= hits / 200 <= 0.99, hits / 200


def test_undefined_resamples_are_left_out_of_the_interval():
    w = np.array([[2.0, 0.0], [1.0, 1.0]])
    values = metrics.auroc(np.array([1.0, 0.0]), np.array([True, False]), w)
    assert np.isnan(values[0]) and values[1] == 1.0
    assert bootstrap.interval(values) == [1.0, 1.0]


def test_a_model_at_chance_is_said_to_be_at_chance():
    """A head that guesses (random posteriors) on 200 test images of 4 classes: the report's notes
    say in words that its intervals include chance; a head that is right says nothing."""

    from leakpipe.pipeline.report import evaluate

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    n = len(y)

    def metrics_of(logits):
        split = evaluate.Split(
            "t",
            {"logits": logits, "h_bar": rng.normal(0, 1, (n, 3)), "w": np.ones((n, 3))},
            np.array([f"c{k}" for k in y]),
            np.array(["test"] * n),
            np.array(["raw"] * n),
        )
        train = split.select(np.ones(n, bool))
        classes = ["c0", "c1", "c2", "c3"]
        maha = evaluate.comparator(train, classes, ScoreConfig())
        closed = evaluate.closed_set(maha, {"raw": split}, classes, n_boot=500, seed=0)
        return {"closed": closed, "open": {}}

    guessing = evaluate.chance_notes(metrics_of(rng.normal(0, 1, (n, 4))))
    assert len(guessing) == 2 and all("includes chance" in note for note in guessing)
    assert evaluate.chance_notes(metrics_of(10.0 * np.eye(4)[y])) == []


def test_the_real_photo_case_is_said_in_words():
    """As the issue found it: 6 pipelines, the model at chance, a forensic pixel baseline at 0.72 and
    a probe on z0 near chance, on 300 test images. All three facts must be stated."""
    from leakpipe.pipeline.report import baselines as bl

    rng = np.random.default_rng(0)
    n = 300
    head = rng.random(n) < 1 / 6
    pixel = rng.random(n) < 0.72
    z0 = rng.random(n) < 1 / 6
    w = bootstrap.Resamples(1000, seed=0)
    b = {
        "chance": 1 / 6,
        "head": bl.scored(head, w),
        "forensic": bl.scored(pixel, w),
        "z0_probe": bl.scored(z0, w),
        "head_minus_forensic": bl.paired_difference(head, pixel, w),
        "z0_probe_minus_forensic": bl.paired_difference(z0, pixel, w),
    }
    said = bl.notes(b)
    assert len(said) == 4 and said[0].startswith("Strongest learner on these test images: the forensic pixel baseline")
    assert "significantly below the forensic pixel baseline" in said[1] and "at chance" in said[2]
    assert "neither the model" in said[3] and "--profile pixels" in said[3]
    assert b["head_minus_forensic"]["p"] < 0.01
    good = {
        **b,
        "head_minus_forensic": bl.paired_difference(pixel, head, w),
        "z0_probe": bl.scored(pixel, w),
        "z0_probe_minus_forensic": bl.paired_difference(pixel, pixel, w),
    }
    assert [n.split(":")[0] for n in bl.notes(good)] == ["Strongest learner on these test images"]
    probe_wins = {**good, "z0_probe": bl.scored(pixel, w), "head_minus_z0_probe": bl.paired_difference(head, pixel, w)}
    said = bl.notes(probe_wins)
    assert len(said) == 2 and "significantly below a linear probe on the cached z0" in said[1]
    weak = {
        **b,
        "forensic": bl.scored(z0, w),
        "head_minus_forensic": bl.paired_difference(head, z0, w),
        "z0_probe_minus_forensic": bl.paired_difference(z0, z0, w),
    }  # no traces anywhere: the strongest learner, then only "at chance"
    assert len(bl.notes(weak)) == 2 and "at chance" in bl.notes(weak)[1]


def test_paired_comparison_of_a_run_with_itself_and_with_a_better_one():
    from leakpipe.pipeline.config import Config
    from leakpipe.workflows.compare import paired

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 200)
    noisy = metrics.softmax(rng.normal(0, 1, (200, 3)) + 0.5 * np.eye(3)[y])
    sharp = metrics.softmax(rng.normal(0, 1, (200, 3)) + 3.0 * np.eye(3)[y])
    as_run = lambda probs: {r: (int(y[r]), probs[r]) for r in range(200)}  # noqa: E731
    cfg = Config()
    same = paired(as_run(noisy), as_run(noisy), cfg)
    assert same["top1"]["difference"] == 0 and same["top1"]["ci"] == [0.0, 0.0] and same["top1"]["p"] == 1.0
    better = paired(as_run(sharp), as_run(noisy), cfg)
    assert better["top1"]["ci"][0] > 0 and better["top1"]["p"] < 0.01 and better["macro_auc"]["p"] < 0.01


def test_paired_open_set_auroc():
    from leakpipe.pipeline.config import Config
    from leakpipe.workflows.compare import paired_open

    rng = np.random.default_rng(7)
    keys = [("closed", i) for i in range(150)] + [("open", i) for i in range(150)]
    truth = np.array([k[0] == "closed" for k in keys])
    weak = dict(zip(keys, rng.normal(0, 1, 300) + 0.3 * truth))
    strong = dict(zip(keys, rng.normal(0, 1, 300) + 2.0 * truth))
    cfg = Config()
    same = paired_open(weak, weak, cfg)["auroc"]
    assert same["difference"] == 0 and same["p"] == 1.0
    better = paired_open(strong, weak, cfg)["auroc"]
    assert better["difference"] > 0.2 and better["ci"][0] > 0 and better["p"] < 0.01
    assert paired_open(None, weak, cfg) == {}  # a run without an open set: no test, said as n/a


def test_ovl_resamples_are_the_weighted_densities_on_the_same_grid():
    """Each resample's OVL equals the overlap integral of the explicitly resampled kernels (centres
    drawn, widths those of the full sample) on the full sample's grid; unit weights give metrics.ovl."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, 60), np.r_[rng.normal(1, 0.3, 30), rng.normal(-3, 2, 30)]
    w = bootstrap.weights(120, 5, seed=4)
    got = metrics.ovl(a, b, w)
    (ca, ha), (cb, hb) = metrics.ovl_grid(a, b)[0]
    grid = metrics.ovl_grid(a, b)[1]
    for k in range(len(w)):
        i, j = resampled(w[k, :60]), resampled(w[k, 60:])
        fa, fb = metrics._mixture(grid, ca[i], ha[i]), metrics._mixture(grid, cb[j], hb[j])
        assert got[k] == pytest.approx(np.trapezoid(np.minimum(fa, fb), grid), abs=1e-12)
    whole = np.trapezoid(np.minimum(metrics._mixture(grid, ca, ha), metrics._mixture(grid, cb, hb)), grid)
    assert metrics.ovl(a, b, np.ones((1, 120)))[0] == pytest.approx(whole, abs=1e-12)  # the point estimate


def test_ovl_interval_covers_known_overlaps():
    """Basic-bootstrap coverage of the true OVL (numerical integration), 40 data sets of 200 + 200
    scores each: the evaluation issue's mixture (true 0.101) and two shifted normals (true 0.803).
    Measured with 100 data sets of 300: 0.93 and 0.91 (the percentile interval: 0.93 and 0.65)."""
    from scipy import integrate, stats

    rng = np.random.default_rng(11)
    mixture = lambda n: np.where(rng.random(n) < 0.1, rng.normal(-100, 2, n), rng.normal(-250, 50, n))  # noqa: E731
    truth = integrate.quad(
        lambda x: min(stats.norm.pdf(x, -100, 2), 0.1 * stats.norm.pdf(x, -100, 2) + 0.9 * stats.norm.pdf(x, -250, 50)),
        -600,
        100,
        points=[-100, -250],
        limit=500,
    )[0]
    cases = [
        (lambda n: rng.normal(-100, 2, n), mixture, truth),
        (lambda n: rng.normal(0, 1, n), lambda n: rng.normal(0.5, 1, n), 2 * stats.norm.cdf(-0.25)),
    ]
    for closed, opened, true in cases:
        hits = 0
        for k in range(40):
            a, b = closed(200), opened(200)
            lo, hi = bootstrap.basic_interval(
                metrics.point(metrics.ovl, a, b, n=400), metrics.ovl(a, b, bootstrap.weights(400, 200, k))
            )
            hits += lo <= true <= hi
        assert hits >= 33, (true, hits)  # 95% nominal; binomial(40, 0.95) is >= 35 in 86% of runs


def test_blocks_hand_out_the_same_resamples_however_often_asked():
    """Scoring asks for the resamples of the same rows many times; they are drawn once and kept, and
    each time they are those of `weights`, in blocks laid out rows first."""
    bootstrap._kept.clear()
    groups = np.repeat(np.arange(100), 3)
    for g in (None, groups):
        want = bootstrap.weights(300, 50, seed=2, groups=g)
        for _ in range(2):  # drawn, then handed out again from what was kept
            got = list(bootstrap.blocks(300, 50, 2, groups=g, cells=300 * 7))
            assert [len(b) for b in got] == [7] * 7 + [1] and all(b.flags["F_CONTIGUOUS"] for b in got)
            np.testing.assert_array_equal(np.concatenate(got), want)
    assert len(bootstrap._kept) == 2


def test_kept_draws_stay_within_their_budget(monkeypatch):
    """What is kept of the draws never exceeds KEPT_BYTES, old and new together, at any size: draws that
    would not fit are handed out and forgotten, and room is made for those that fit before they are
    drawn. The resamples are those of `weights` either way."""
    bootstrap._kept.clear()
    monkeypatch.setattr(bootstrap, "KEPT_BYTES", 300 * 50)  # one set of 300 rows x 50 resamples (a byte a count)
    for n in (300, 200, 400, 300):
        blocks = bootstrap.blocks(n, 50, 2, cells=n * 7)
        got = []
        for b in blocks:
            got.append(b)
            assert sum(x.nbytes for v in bootstrap._kept.values() for x in v) + n * 50 * (n <= 300) <= 300 * 50
        np.testing.assert_array_equal(np.concatenate(got), bootstrap.weights(n, 50, seed=2))
    assert list(bootstrap._kept) == [(300, 50, 2, 300 * 7, None)]  # 400 x 50 was not kept; 200 made room for 300
