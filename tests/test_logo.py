"""Leave-one-generator-out: `train.exclude` keeps a generator out of training, score treats its test
images as an unseen generator, and `sweep --logo` makes one such run per known generator."""

import json

import pytest

from leakpipe.pipeline.report.scored import load_split
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.math.kde import GaussianKDE
from leakpipe.pipeline.math.metrics import auroc, point
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, encode, train
from tests.conftest import cli, synth_workspace

FAST = [
    "train.epochs=1",  # what is tested is which generator each run holds out, not how well it learns
    "model.embed_dim=8",
    "model.prototypes_per_class=1",
    "train.batch_size=16",
    "score.kde_folds=2",
    "score.postprocessed=",
    "score.bootstrap=200",
    "score.baselines=false",
]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = synth_workspace(tmp_path_factory.mktemp("logo"))
    encode.run(graph(Workspace(root), Workspace(root).config()), "closed", log=lambda m: None)
    r = cli(root, "sweep", "--logo", *[a for s in FAST for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    return root, r.stdout


def test_logo_holds_out_each_generator_and_scores_it_as_unseen(swept):
    root, out = swept
    ws = Workspace(root)
    closed = read_manifest(ws.manifest("closed"), check_files=False)
    labels = sorted({r["label"] for r in closed.rows})
    assert (root / "cache" / "sweep-logo.md").read_text() in out
    assert "honest replacement" in out
    for g in labels:
        result = runs.pointed(ws, f"logo-{g}")
        m = json.loads((result / "metrics.json").read_text())
        assert m["classes"] == [c for c in labels if c != g]  # never trained on
        n_test = {c: sum(r["partition"] == "test" and r["label"] == c for r in closed.rows) for c in labels}
        assert m["closed"]["raw"]["head"]["n"] == sum(v for c, v in n_test.items() if c != g)
        h = m["held_out"]["gating_off"]
        assert list(h) == [g] and h[g]["n"] == n_test[g]
        lo, hi = h[g]["ci"]["auroc"]
        assert lo <= h[g]["auroc"] <= hi
        assert f"| {g} | logo-{g} | {result.name} | {n_test[g]} |" in out
        # the AUROC is the KDE's, fitted on the trained generators' training embeddings only
        split, _ = load_split(ws, result, "closed")
        fit = split.select((split.partition == "train") & (split.labels != g))
        test = split.select(split.partition == "test")
        kde = GaussianKDE(bandwidth=h[g]["bandwidth"]).fit(fit.embedding("h_bar"))
        scores = kde.score_samples(test.embedding("h_bar"))
        positive = test.labels != g
        assert point(auroc, scores, positive) == pytest.approx(h[g]["auroc"], abs=1e-9)
    report = (runs.pointed(ws, f"logo-{labels[0]}") / "report.md").read_text()
    assert "## Held-out generators (leave-one-generator-out)" in report


def test_logo_rerun_does_nothing(swept):
    root, out = swept
    r = cli(root, "sweep", "--logo", *[a for s in FAST for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    assert r.output.count("up to date") >= 3 and r.stdout.endswith(f"-> {root / 'cache' / 'sweep-logo.md'}\n")


def test_exclude_names_a_label_the_manifest_has(swept):
    root, _ = swept
    ws = Workspace(root)
    with pytest.raises(UserError, match=r"train.exclude names nope, which .*closed.csv does not label"):
        train.run(graph(ws, ws.config(None, [*FAST, "train.exclude=nope"])), "x", log=lambda m: None)
    r = cli(root, "sweep", "--logo", "--only", "full")
    assert r.exit_code != 0 and "leave out --only" in r.output


def test_logo_needs_three_generators(ws):  # conftest's ws: 2 generators
    r = cli(ws, "sweep", "--logo", "--list")
    assert r.exit_code != 0 and "needs at least 3" in r.output
