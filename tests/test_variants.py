"""Post-processed variants (issue 35): written for the train and val images only, each kept in its
image's partition (train refuses one that is not), drawn per image and epoch in training, counted as
their image by the leakage audit; the decisions calibrated on them (pooled, or by level), recorded in
the score lock, rescoring only; and the report's statement of what the guarantee covers."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from leakpipe.pipeline.bench import postprocess
from leakpipe.pipeline.engine.data import LatentRows
from leakpipe.pipeline.engine.variants import VariantRows
from leakpipe.pipeline.ledger import locks
from leakpipe.pipeline.manifest import read_manifest
from leakpipe.pipeline.store import latent_store
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import graph, train
from tests.conftest import cli, ok, synth_workspace

SETTINGS = ("train.epochs=1", "model.embed_dim=16", "score.bootstrap=50", "score.baselines=false")
FAST = [a for kv in SETTINGS for a in ("--set", kv)]


@pytest.fixture(scope="module")
def vws(tmp_path_factory):
    """The small synthetic workspace with 2 variants of each train and val image, test copies at step 1,
    every split encoded."""
    root = synth_workspace(tmp_path_factory.mktemp("variants-ws"))
    ok(root, "postprocess", "--split", "closed", "--variants", "2", "--workers", "1")
    ok(root, "postprocess", "--split", "closed", "--steps", "1", "--workers", "1")
    for split in ("closed", "closed-var", "closed-pp", "open"):
        ok(root, "encode", "--split", split)
    return root


def test_variants_copy_train_and_val_images_only_with_their_own_seeds(vws):
    closed = read_manifest(vws / "manifests" / "closed.csv")
    var = read_manifest(vws / "manifests" / "closed-var.csv")
    pp = read_manifest(vws / "manifests" / "closed-pp.csv")
    of = {r["path"]: r for r in closed.rows}
    kept = [r for r in closed.rows if r["partition"] in ("train", "val")]
    assert len(var) == 2 * len(kept) and {r["path"].split("/")[0] for r in var.rows} == {"v0", "v1"}
    for r in var.rows:
        src = of[r["source"].removeprefix("closed:")]
        assert (r["label"], r["partition"]) == (src["label"], src["partition"]) != "test"
        assert 1 <= len(postprocess.parse_ops(r["ops"])) <= int(r["variant"].removeprefix("step")) <= 3
    assert not {r["source"] for r in var.rows} & {r["source"] for r in pp.rows}  # never a test image
    r = cli(vws, "postprocess", "--split", "closed", "--variants", "2", "--partition", "test")
    assert r.exit_code != 0 and "variants are made of the train and val images only" in r.output
    # --partition val: the same variants of the val images alone (what calibration reads), nothing else
    ok(vws, "postprocess", "--split", "closed", "--variants", "2", "--partition", "val", "--name", "closed-valvar")
    valvar = read_manifest(vws / "manifests" / "closed-valvar.csv")
    assert valvar.rows == [r for r in var.rows if r["partition"] == "val"] and len(valvar) > 0
    ok(vws, "postprocess", "--split", "closed", "--steps", "1", "--ops", "blur", "--name", "closed-blur")
    blur = read_manifest(vws / "manifests" / "closed-blur.csv")
    assert {r["variant"] for r in blur.rows} == {"step1-blur"} and all(r["ops"].startswith("blur(") for r in blur.rows)
    r = cli(vws, "postprocess", "--split", "closed", "--ops", "sharpen")
    assert r.exit_code != 0 and "unknown operation(s) sharpen" in r.output


def test_training_draws_an_image_or_one_of_its_variants_per_epoch(vws):
    """VariantRows on the encoded stores: p = 0 reads the originals; p = 1 replaces every image by one of
    its own variants (the rows of the variants' store), drawn again each epoch from its seed alone."""
    ws = Workspace(vws)
    g = graph(ws, ws.config())
    lat, var = (g.plan("encode", s).data for s in ("closed", "closed-var"))
    rows = np.flatnonzero(np.array(lat.manifest.column("partition")) == "train")
    base = LatentRows(lat.store, rows, np.zeros(len(rows), np.int64), 2**30)
    src = [r.removeprefix("closed:") for r in var.manifest.column("source")]
    position = {int(r): k for k, r in enumerate(rows)}
    vrows = np.array([j for j, s in enumerate(src) if lat.manifest.column("path").index(s) in position])
    of = np.array([position[lat.manifest.column("path").index(src[j])] for j in vrows])
    variants = LatentRows(var.store, vrows, np.zeros(len(vrows), np.int64), 2**30)
    stored = latent_store.read_rows(latent_store.open_store(var.store), vrows)["mean"]

    def epoch(p, seed):
        data = VariantRows(base, variants, of, p)
        return {int(k): m_k for pos, m, _, _ in data.batches(8, seed) for k, m_k in zip(pos, m)}

    originals = {int(k): m_k for pos, m, _, _ in base.batches(8, None) for k, m_k in zip(pos, m)}
    assert all(np.array_equal(v, originals[k]) for k, v in epoch(0.0, 1).items())
    for seed in (1, 2):
        drawn = epoch(1.0, seed)
        for k, v in drawn.items():  # one of its own variants, and no other image's
            assert any(np.array_equal(v, stored[j]) for j in np.flatnonzero(of == k))
    same = [np.array_equal(epoch(1.0, 1)[k], epoch(1.0, 2)[k]) for k in originals]
    assert not all(same)  # another epoch, another draw
    assert all(np.array_equal(epoch(1.0, 3)[k], v) for k, v in epoch(1.0, 3).items())  # a seed, one draw
    mixed = epoch(0.5, 4)
    share = np.mean([not np.array_equal(mixed[k], originals[k]) for k in originals])
    assert 0.25 < share < 0.75
    zeros = np.zeros(len(rows), np.int64)  # streamed by chunk (no memory budget): the same batches, the same rows
    streamed = VariantRows(LatentRows(lat.store, rows, zeros, 0), LatentRows(var.store, vrows, of * 0, 0), of, 0.5)
    assert not streamed.base.in_memory and not streamed.variants.in_memory
    held = VariantRows(base, variants, of, 0.5)
    for a, b in zip(streamed.batches(8, 5), held.batches(8, 5)):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(streamed.rows_at(np.arange(6)), held.rows_at(np.arange(6))))


def test_a_variant_never_lands_in_another_partition_than_its_source(vws, tmp_path):
    """A variants manifest that puts a copy of a test image (or of a train image) in another partition:
    train refuses it, naming the line; the paper profile trains on the raw images and never reads it."""
    text = (vws / "manifests" / "closed-var.csv").read_text()
    lines = text.splitlines(keepends=True)
    i = next(k for k, ln in enumerate(lines) if ",train," in ln)
    lines[i] = lines[i].replace(",train,", ",val,", 1)
    (vws / "manifests" / "closed-var.csv").write_text("".join(lines))
    try:
        ok(vws, "encode", "--split", "closed-var")
        r = cli(vws, "train", *FAST)
        assert r.exit_code != 0, r.output
        assert f"line {i + 1}: a copy of closed:" in r.output and "keeps its image's label and partition" in r.output
        ws = Workspace(vws)  # the paper profile trains on raw images only: it never reads the variants
        paper = graph(ws, ws.config(None, ["train.epochs=1"], "paper")).plan("train", "paper")
        assert paper.inputs is not None and list(paper.inputs.upstream) == ["latents of closed"]
        assert "train.variants" not in paper.inputs.config
    finally:
        (vws / "manifests" / "closed-var.csv").write_text(text)
        ok(vws, "encode", "--split", "closed-var")


def _metrics(ws, run="default"):
    return json.loads((train.run_dir(Workspace(ws), run) / "metrics.json").read_text())


def test_calibration_on_variants_rescoring_only_and_the_guarantee_it_states(vws):
    """Variants in training are an input of the result (its lock names their latents and sources); the
    audit leaves out test copies of a variant; calibrating on the variants changes the thresholds and
    is recorded in the score lock, and changing it retrains nothing; the report's guarantee follows the
    setting (raw, pooled, by level)."""
    weights = {}
    for run, sets in (("raw", ["train.variants="]), ("p0", ["train.variant_p=0"]), ("default", [])):
        ok(vws, "train", "--run", run, *FAST, *[a for kv in sets for a in ("--set", kv)])
        weights[run] = load_file(str(train.run_dir(Workspace(vws), run) / "model.safetensors"))
    # at p = 0 every epoch reads the originals, exactly as raw training does; at 0.5 it reads variants
    assert all(torch.equal(weights["raw"][k], weights["p0"][k]) for k in weights["raw"])
    assert any(not torch.equal(weights["raw"][k], weights["default"][k]) for k in weights["raw"])
    out = train.run_dir(Workspace(vws), "default")
    lock = locks.read_lock(out / "train.lock.json")
    assert "latents of closed-var" in lock["inputs"]["upstream"]
    assert "labels, partitions and sources of closed-var" in lock["inputs"]["files"]
    assert json.loads((out / "config.json").read_text())["train"]["variants"] == "closed-var"
    # a copy of a variant (of a training image) scored as a test set is that image: left out
    ok(vws, "postprocess", "--split", "closed-var", "--partition", "all", "--steps", "1", "--ops", "jpeg")
    ok(vws, "encode", "--split", "closed-var-pp")
    pp = ["--set", "score.postprocessed=closed-pp,closed-var-pp"]
    ok(vws, "score", *FAST, *pp, "--set", "score.variants=")
    m = _metrics(vws)
    assert (
        m["leakage"]["step1-jpeg"]["source"]
        == m["leakage"]["step1-jpeg"]["rows"]
        == len(read_manifest(vws / "manifests" / "closed-var-pp.csv"))
    )
    raw_q = m["conformal"]["thresholds"]
    assert m["conformal"]["population"]["mode"] == "raw" and "are exchangeable" in m["conformal"]["guarantee"]
    assert [m["conformal"]["variants"][v]["covered"] for v in ("raw", "step1")] == [True, False]

    status = ok(vws, "status", *FAST).output  # score.variants = auto: closed-var, the pooled calibration
    assert re.search(r"train  default +up to date", status), status
    assert re.search(r"score  default +STALE: .*score.variants:  -> closed-var;", status), status
    ok(vws, "score", *FAST)
    m = _metrics(vws)
    pop = m["conformal"]["population"]
    n_val = sum(r["partition"] == "val" for r in read_manifest(vws / "manifests" / "closed.csv").rows)
    assert pop["mode"] == "pooled" and pop["n"] == 3 * n_val and pop["per_level"]["raw"] == n_val
    assert m["conformal"]["thresholds"] != raw_q and m["conformal"]["variants"]["step1"]["covered"]
    assert f"drawn like the {3 * n_val} calibration images" in m["conformal"]["guarantee"]
    assert pop["families"] == sorted(postprocess.OPS) and pop["most_ops"] == 3
    score_lock = locks.read_lock(out / "score.lock.json")
    assert score_lock["inputs"]["config"]["score.variants"] == "closed-var"
    assert "embeddings of closed-var" in score_lock["inputs"]["upstream"]
    report = (out / "report.md").read_text()
    assert "That is a guarantee on their mixture" in report and re.search(r"\| step1 \| \d+ \| yes \|", report)

    ok(vws, "score", *FAST, "--set", "score.levels=true")
    m = _metrics(vws)
    assert m["conformal"]["population"]["mode"] == "levels" and set(m["conformal"]["level_thresholds"]) >= {"raw"}
    q = np.array(list(m["conformal"]["level_thresholds"].values()))
    assert m["conformal"]["thresholds"] == q.max(0).tolist()
    assert "whichever the level" in (out / "report.md").read_text()
    assert locks.read_lock(out / "train.lock.json")["written"] == lock["written"]  # nothing retrained
