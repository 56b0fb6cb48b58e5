"""Code identity derived from the imports (ledger/code.py, ledger/reach.py): what each stage's code is,
what it leaves out and why, and how the source is read. tests/test_provenance.py checks the same through
`leakpipe status` on edited copies of the package and on a workspace of declared identities."""

import itertools
import json
import subprocess
import textwrap

import pytest

from leakpipe.pipeline.ledger import code, reach
from leakpipe.stages import STAGES
from tests.declared_code import identities_at
from tests.helpers import ROOT, imports, modules


def imported(start: set[str]) -> dict[str, str]:
    """{module: the module that first imports it} of every leakpipe module the `start` modules import,
    directly or through modules that are not in NOT_OUTPUTS (lazy imports inside functions included)."""
    found, todo = {m: "" for m in start}, list(start)
    while todo:
        at = todo.pop()
        if at in code.NOT_OUTPUTS and at not in start:
            continue
        for _, target in imports(modules()[at]):
            if target not in found:
                found[target] = at
                todo.append(target)
    return found


def stage_imports(name: str) -> dict[str, str]:
    return imported({f"leakpipe.stages.{name}"} | {r.partition(":")[0] for r in STAGES[name].code})


def test_every_module_a_stage_imports_is_in_a_stages_code_or_declared_not_outputs():
    """A new module is part of the code of the stages that reach it, unless NOT_OUTPUTS says why it
    cannot change an output; one that no stage's code reaches, though a stage imports it, fails here."""
    covered = {e.partition(":")[0] for stage in STAGES.values() for e in code.identity(stage.code)}
    neither = [
        f"{m} (imported by {via}; stage {name})"
        for name in STAGES
        for m, via in stage_imports(name).items()
        if m not in covered and m not in code.NOT_OUTPUTS
    ]
    assert neither == [], "in no stage's code and not in ledger/code.py:NOT_OUTPUTS:\n" + "\n".join(neither)


def test_not_outputs_are_modules_a_stage_imports_each_with_its_reason():
    reached = set().union(*(stage_imports(name) for name in STAGES))
    for module, why in code.NOT_OUTPUTS.items():
        assert module in modules(), f"NOT_OUTPUTS names {module}, which is not a module"
        assert module in reached, f"NOT_OUTPUTS names {module}, which no stage imports"
        assert len(why.split()) >= 3, module


def test_a_stages_code_reaches_what_makes_its_outputs_and_no_more():
    """The gaps of the hand-kept lists are closed (fit keeps the best-macro_auc epoch; a score figure comes
    from ledger/results.py:stage_features), and a function stays out of the stages that never call it."""
    ids = {name: code.identity(stage.code) for name, stage in STAGES.items()}
    assert "leakpipe.pipeline.math.metrics:macro_auc" in ids["train"]
    assert "leakpipe.pipeline.engine.trained:stage_features" in ids["score"]
    assert "leakpipe.pipeline.engine.images:load_image" in ids["encode"]
    assert "leakpipe.pipeline.engine.images:load_native" in ids["score"]
    assert "leakpipe.pipeline.engine.images:load_native" not in ids["encode"]  # the baselines' reader
    assert not [e for i in ids.values() for e in i if e.partition(":")[0] in code.NOT_OUTPUTS]


def test_the_declared_table_covers_every_entry_the_stages_declared():
    """A lock of declared entries is read as the derived identity of the same code: sound only if the
    derived identity holds every declared function, and some of every declared module."""
    for commit, stages in code.declared().items():
        for name, table in stages.items():
            derived, held = table["derived"], {e.partition(":")[0] for e in table["derived"]}
            uncovered = [e for e in table["declared"] if (e not in derived if ":" in e else e not in held)]
            assert uncovered == [], (commit, name, uncovered)
            assert code.derived(derived) and not code.derived(table["declared"])


def test_the_declared_table_is_what_its_commits_give():
    """Each commit's pair is what tests/declared_code.py makes of that commit's source with today's roots,
    NOT_OUTPUTS and reading of the source: change one of those and the table must be made again, or every
    workspace of that commit would read as stale."""
    for commit, stages in code.declared().items():
        if subprocess.run(["git", "cat-file", "-e", commit], cwd=ROOT, capture_output=True).returncode:
            pytest.skip(f"commit {commit[:12]} is not in this checkout's history")
        assert identities_at(commit) == stages, f"run `.venv/bin/python tests/declared_code.py {commit[:12]}`"


SOURCE = '''
"""A module of a stage."""
from leakpipe.pipeline.math import dct
from leakpipe.pipeline.math.diffusion import betas
import numpy as np

SCALE = 2  # a constant is a unit of its own


def plan(x):
    return x


def helper():
    """A docstring."""
    return SCALE


def work(plan, cfg):
    from leakpipe.pipeline.math.metrics import macro_auc  # a lazy import

    rows = [plan for plan in range(3)]
    return dct.dct2(plan) + helper() + macro_auc(rows) + np.pi


class Result:
    plan: int = 0

    def summary(self):
        return betas(self.plan)
'''


_VERSION = itertools.count()  # parsed once per (file, mtime): each version of the source is another mtime


def _units(tmp_path, source: str) -> dict:
    path = tmp_path / "stage.py"
    path.write_text(textwrap.dedent(source))
    return reach._parse("leakpipe.stages.fake", str(path), next(_VERSION)).units


def test_names_resolve_through_imports_and_scopes(tmp_path):
    """A name read in a function is a reference unless a scope of the function binds it: `plan` the
    parameter, the comprehension variable and the class field are not the module's `plan`."""
    units = _units(tmp_path, SOURCE)
    assert units["work"].refs == {
        ("leakpipe.pipeline.math.dct", "dct2"),
        ("leakpipe.stages.fake", "helper"),
        ("leakpipe.pipeline.math.metrics", "macro_auc"),
    }
    assert units["Result"].refs == {("leakpipe.pipeline.math.diffusion", "betas")}
    assert units["helper"].refs == {("leakpipe.stages.fake", "SCALE")}
    assert set(units) == {"SCALE", "plan", "helper", "work", "Result"}


def test_a_units_hash_is_its_code_not_its_comments(tmp_path):
    base = {k: u.hash for k, u in _units(tmp_path, SOURCE).items()}
    reworded = SOURCE.replace('"""A docstring."""', '"""Reworded."""  # and a comment').replace(
        "SCALE = 2", "SCALE: int = (2)"
    )
    assert {k: u.hash for k, u in _units(tmp_path, reworded).items()} == base
    edited = {k: u.hash for k, u in _units(tmp_path, SOURCE.replace("range(3)", "range(4)")).items()}
    assert [k for k in base if edited[k] != base[k]] == ["work"]


def test_trail_says_how_a_stage_reaches_a_unit():
    chain = reach.trail(STAGES["train"].code, "leakpipe.pipeline.math.metrics:macro_auc", frozenset(code.NOT_OUTPUTS))
    assert chain[0] == "leakpipe.stages.train:work" and chain[-1] == "leakpipe.pipeline.math.metrics:macro_auc"
    assert "leakpipe.pipeline.engine.fit:fit" in chain


# ---------------------------------------------------------------- upgrades (ledger/code_upgrades.json)
CROP, FILL = "leakpipe.pipeline.engine.images:resize_crop", "leakpipe.pipeline.engine.images:mirror_fill"


def _encode_status(ws) -> dict:
    from tests.conftest import cli

    r = cli(ws, "status", "--json")
    assert r.exit_code == 0, r.output
    return next(e for e in json.loads(r.output) if e["stage"] == "encode")


def test_an_upgrade_carries_an_earlier_identity_to_the_current_one(ws, monkeypatch):
    """A store encoded by an earlier leakpipe (its lock records the label of that code) is stale once a unit
    it ran has changed, naming the unit, until an upgrade says the edit leaves every output the same: then
    it is up to date in its folder, nothing re-encoded. An upgrade whose `before` is not the recorded code
    leaves it stale."""
    from tests.helpers import encode_closed

    monkeypatch.setattr(code, "upgrades", lambda: [])
    now = code.identity(STAGES["encode"].code)
    monkeypatch.setitem(code.LEGACY, "encode-test", now)  # the label this leakpipe's locks record
    encode_closed(ws)
    assert _encode_status(ws)["up_to_date"]
    old = {u: h for u, h in now.items() if u != FILL} | {CROP: "0" * 32}  # ... of the code it then stood for
    monkeypatch.setitem(code.LEGACY, "encode-test", old)
    stale = _encode_status(ws)
    assert not stale["up_to_date"]
    assert (
        "code changed: leakpipe.pipeline.engine.images: mirror_fill (newly part of the stage), resize_crop"
        in (stale["reasons"])
    ), stale
    upgrade = {"before": {CROP: "0" * 32, FILL: None}, "after": {CROP: now[CROP], FILL: now[FILL]}}
    monkeypatch.setattr(code, "upgrades", lambda: [upgrade])
    assert code.stored_form(now) == "encode-test" and code.recorded("encode-test") == now
    assert _encode_status(ws)["up_to_date"]
    monkeypatch.setattr(code, "upgrades", lambda: [{**upgrade, "before": {CROP: "1" * 32, FILL: None}}])
    assert code.recorded("encode-test") == old and code.stored_form(now) == now
    assert not _encode_status(ws)["up_to_date"]


def test_an_upgrade_from_a_stages_own_identity_keeps_its_locks(ws, monkeypatch):
    """A stage whose outputs changed since the declared table records its own identity (score: its numbers
    changed). An upgrade recorded for it from that identity keeps what it wrote valid: its lock records the
    identity the upgrade started from. The same edits recorded for another stage leave it stale."""
    from tests.helpers import encode_closed

    monkeypatch.setattr(code, "upgrades", lambda: [])
    was = code.identity(STAGES["encode"].code)
    assert code.stored_form(was, "encode") == was  # no table's form reads as it without the upgrades
    encode_closed(ws)
    assert _encode_status(ws)["up_to_date"]
    now = {**was, CROP: "2" * 32}  # resize_crop edited since
    identity = code.identity
    monkeypatch.setattr(code, "identity", lambda roots: now if roots == STAGES["encode"].code else identity(roots))
    stale = _encode_status(ws)
    assert not stale["up_to_date"] and "code changed: leakpipe.pipeline.engine.images: resize_crop" in stale["reasons"]
    upgrade = {"before": {CROP: was[CROP]}, "after": {CROP: now[CROP]}, "stages": ["encode"]}
    monkeypatch.setattr(code, "upgrades", lambda: [upgrade])
    assert code.stored_form(now, "encode") == was and code.stored_form(now) == now
    assert _encode_status(ws)["up_to_date"]
    monkeypatch.setattr(code, "upgrades", lambda: [{**upgrade, "stages": ["train"]}])
    assert not _encode_status(ws)["up_to_date"]


def test_each_upgrade_is_the_code_at_its_commit():
    """An upgrade's `after` is what its stages derive from the source at its commit (None: a unit they no
    longer reach): a change to how units are hashed or reached means the table must be made again."""
    from tests.declared_code import source_at

    by_commit: dict[str, list[dict]] = {}
    for up in code.upgrades():
        by_commit.setdefault(up["commit"], []).append(up)
    for commit, ups in by_commit.items():
        if subprocess.run(["git", "cat-file", "-e", commit], cwd=ROOT, capture_output=True).returncode:
            pytest.skip(f"commit {commit[:12]} is not in this checkout's history")
        with source_at(commit):
            ids = {name: code.identity(STAGES[name].code) for up in ups for name in up["stages"]}
        for up in ups:
            assert up["why"] and all(code.derived(up[side]) for side in ("before", "after")), up
            for name in up["stages"]:
                assert {u: ids[name].get(u) for u in up["after"]} == up["after"], (commit, name)
