"""What a researcher's tools expect: TensorBoard event files, a `vae` command, progress lines in logs,
help text on every option."""

import builtins
import json

import click
import pytest

from leakpipe.pipeline.ledger import runs
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, encode
from tests.conftest import cli, synth_workspace

FAST = [
    "train.epochs=2",
    "model.embed_dim=8",
    "model.prototypes_per_class=2",
    "train.batch_size=16",
    "score.kde_folds=2",
    "score.postprocessed=",
    "score.bootstrap=50",
    "score.baselines=false",
]


def sets(*extra):
    return [a for s in (*FAST, *extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = synth_workspace(tmp_path_factory.mktemp("eco"))
    for split in ("closed", "open"):
        encode.run(graph(Workspace(root), Workspace(root).config()), split, log=lambda m: None)
    for stage in ("train", "score"):
        r = cli(root, stage, *sets("log.tensorboard=true"))
        assert r.exit_code == 0, r.output
    return root


def test_tensorboard_events_read_back(scored):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    result = runs.pointed(Workspace(scored), "default")
    train = EventAccumulator(str(result / "tensorboard" / "train"), size_guidance={"histograms": 0}).Reload()
    tags = train.Tags()
    for tag in (
        "train/loss",
        "train/accuracy",
        "val/macro_auc",
        "train/learning_rate",
        "attention/a_t_mean_t0",
        "attention/a_t_mean_t5",
        "attention/a_t_mean_t10",
    ):
        assert [e.step for e in train.Scalars(tag)] == [1, 2], tag
    history = json.loads((result / "history.json").read_text())
    assert [e.value for e in train.Scalars("val/macro_auc")] == pytest.approx([h["val_macro_auc"] for h in history])
    assert "gates/w" in tags["histograms"]
    score = EventAccumulator(str(result / "tensorboard" / "score")).Reload()
    assert {"closed_test/pr/closed00", "closed_test/pr/closed02"} <= set(score.Tags()["tensors"])
    assert "closed_test/roc" in score.Tags()["images"]
    projector = (result / "tensorboard" / "score" / "projector_config.pbtxt").read_text()
    assert "h_bar" in projector and "metadata_path" in projector
    meta = (result / "tensorboard" / "score" / "00000" / "h_bar" / "metadata.tsv").read_text().splitlines()
    assert meta[0] == "generator\tset" and sum("prototype" in x for x in meta) == 3 * 2
    assert sum(x.endswith("\topen") for x in meta) == 32 and sum(x.endswith("closed test") for x in meta) == 15
    # `tensorboard --logdir cache/runs` finds the run through its link
    mux = EventMultiplexer().AddRunsFromDirectory(str(scored / "cache" / "runs"))
    assert any(r.endswith("tensorboard/train") for r in mux.Runs())


def test_without_tensorboard_only_asking_for_it_fails(scored, monkeypatch):
    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    r = cli(scored, "train", "--run", "tb-off", *sets("model.embed_dim=6"))
    assert r.exit_code == 0, r.output
    r = cli(scored, "train", "--run", "tb-on", *sets("model.embed_dim=4", "log.tensorboard=true"))
    assert r.exit_code != 0 and "pip install 'leakpipe[tensorboard]'" in r.output and "Traceback" not in r.output


def test_vae_random_and_info(tmp_path):
    from click.testing import CliRunner

    from leakpipe.pipeline.cli import main

    r = CliRunner().invoke(main, ["vae", "random", str(tmp_path / "v"), "--seed", "3"])
    assert r.exit_code == 0, r.output
    again = CliRunner().invoke(main, ["vae", "random", str(tmp_path / "v")])
    assert again.exit_code != 0 and "already holds a VAE" in again.output
    r = cli(tmp_path, "vae", "info", str(tmp_path / "v"))
    assert r.exit_code == 0, r.output
    for words in (
        "resolves to:    folder",
        "block_out_channels [32, 64, 64, 64]",
        "latent_channels 4",
        "parameters:     1,250,759",
        "scaling:        scaling_factor 0.18215, no shift",
        "seeded random weights",
    ):
        assert words in r.output, words
    from leakpipe.pipeline.config_files import load_config
    from leakpipe.pipeline.engine import vae as vae_lib
    from leakpipe.pipeline.store.hashing import HashCache

    cfg = load_config(None, [f"vae.source={tmp_path / 'v'}"])
    from leakpipe.stages import STAGES

    fp = vae_lib.encoder_fingerprint(
        cfg, vae_lib.resolve(cfg.vae), HashCache(tmp_path / "h.json"), STAGES["encode"].code_identity()
    )
    assert f"fingerprint:    {fp}" in r.output  # what encode will name the store
    missing = cli(tmp_path, "vae", "info", "./nope")
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tiny_vae, monkeypatch):
    from leakpipe.pipeline import progress
    from tests.conftest import TOML, write_images

    monkeypatch.setattr(progress, "INTERVAL", 0.0)  # every update is due
    write_images(tmp_path / "data")
    (tmp_path / "leakpipe.toml").write_text(TOML.format(vae=tiny_vae))
    assert cli(tmp_path, "manifest", "build", str(tmp_path / "data"), "--split", "closed").exit_code == 0
    r = cli(tmp_path, "encode", "--split", "closed")
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("encode closed: ") and " img/s" in x]
    assert lines and lines[-1].startswith("encode closed: 12/12 img (100%)"), r.stderr


def test_every_option_has_help():
    from leakpipe.pipeline.cli import main

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    missing = [
        (name, p.opts)
        for name, cmd in walk(main, [])
        for p in cmd.params
        if isinstance(p, click.Option) and not (p.help or "").strip()
    ]
    assert not missing
    assert all(cmd.help for _, cmd in walk(main, []))


def test_embedding_map_colours_and_limits():
    import numpy as np

    from leakpipe.pipeline.report.figures import _colours, onto_axes, robust_limits

    for n in (3, 8, 9, 10, 18, 25):
        colours = _colours(n)
        assert len(set(colours)) == n
        assert all(not (abs(c[0] - c[1]) < 0.02 and abs(c[1] - c[2]) < 0.02) for c in colours), n  # no grey
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, 500), 1e4, -1e4]  # two far outliers
    lo, hi = robust_limits(x)
    assert -5 < lo < -2 and 2 < hi < 5  # the bulk fills the axis
    # the demo's first PCA axis had this shape: 90% in a bulk, a 10% tail out to 20x its width
    x = np.r_[rng.normal(0, 3, 900), rng.uniform(10, 120, 100)]
    lo, hi = robust_limits(x)
    assert hi - lo < 40 and ((x >= lo) & (x <= hi)).mean() >= 0.85
    x = np.r_[rng.normal(0, 1, 800), rng.normal(30, 1, 200)]  # a minority cluster is not cut off
    lo, hi = robust_limits(x)
    assert lo < -2 and hi > 31
    xy, xlim, ylim, beyond = onto_axes(np.c_[np.r_[rng.normal(0, 1, 98), 1e3, -1e3], rng.normal(0, 1, 100)])
    assert beyond == 2 and xlim[0] <= xy[:, 0].min() and xy[:, 0].max() <= xlim[1]  # drawn on the edge
