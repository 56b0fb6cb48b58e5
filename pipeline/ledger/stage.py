"""The stage framework: one declaration per stage, one runner for all of them.

A `Stage` declares what its outputs depend on: config keys, code (entries of `code.identity`), and,
per instance, upstream stages and files (a `Plan`). Its `work` makes the outputs. The runner owns
everything else, the same way for every stage: the writer lock, sweeping what killed writers left,
the check against the lock, the work, and writing the lock last. It walks upstream first: a stale
upstream stage it may run is run, any other is named as the command to run first.
"""

from __future__ import annotations

import errno
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.errors import UserError
from leakpipe.pipeline.ledger import code as code_id
from leakpipe.pipeline.ledger import locks
from leakpipe.pipeline.ledger.locks import Inputs, Verdict
from leakpipe.pipeline.store.locking import exclusive


@dataclass
class Instance:
    """One instance of a stage that a workspace holds, as `status` lists it."""

    name: str  # what status calls it: a split (encode), a run name (train, score), run/split (embed)
    args: tuple  # what `Graph.plan` takes after the stage's name
    deep: bool = False  # its outputs hashed when checked (small files: score's)
    problems: tuple[str, ...] = ()  # found before any check: a run name's dangling link
    facts: dict = field(default_factory=dict)  # shown beside its state: the result folder


def per_split(graph) -> list[Instance]:
    """One instance per split of the workspace (encode's)."""
    return [Instance(split, (split,)) for split in graph.ws.splits()]


@dataclass(frozen=True)
class Stage:
    """A stage's declaration. `plan(ws, cfg, target, memo)` builds the Plan of one instance (its
    inputs, outputs and upstream); `work(plan, cfg, log, verdict)` makes its outputs (the verdict says
    why they are stale) and returns a Done."""

    name: str  # encode | train | embed | score
    config: tuple[str, ...]  # the config keys its outputs depend on
    code: tuple[str, ...]  # the roots of the code its outputs are made by: "module:function" (ledger/code.py)
    plan: Callable[..., "Plan"]
    work: Callable[["Plan", Config, Callable, Verdict], "Done"]
    implicit: bool = False  # a downstream stage's runner may run it (cheap and deterministic: embed)
    # its outputs are hashed before they are vouched for; encode's are not (a store of a million rows):
    # every reader checks each row's checksum as it reads, and encode re-encodes what a reader reported
    deep: bool = True
    # code one instance runs beyond `code`, from what it is made of (encode: the VAE family's, given its source)
    extra_code: Callable[[Any], tuple[str, ...]] | None = None
    # the instances a workspace holds (Graph -> [Instance]), which `status` lists
    instances: Callable[[Any], list[Instance]] = per_split

    def code_identity(self, instance: Any = None):
        """What a lock records of this stage's code (for `instance`, with its extra code): its legacy label
        or the identity (code.py)."""
        extra = self.extra_code(instance) if self.extra_code is not None and instance is not None else ()
        return code_id.stored_form(code_id.identity(self.code + extra), self.name)


@dataclass
class Done:
    """What `work` made: the outputs for the lock (a folder, or files beside the lock), extra lock
    fields, the stage's own result object for its summary, and what to do once the lock is written."""

    outputs: Path | str | list[Path] | None
    extra: dict = field(default_factory=dict)
    result: Any = None
    locked: Callable[[dict], None] | None = None  # given the written lock (encode records its chunks)


@dataclass
class Plan:
    """One stage instance: `encode closed`, `train default`, `embed default/closed`, `score default`."""

    stage: Stage
    target: str
    inputs: Inputs | None  # None: an upstream stage is not ready (see `blocked`)
    lock: Path
    writer_lock: Path  # the exclusive lock of its outputs (None-like for reads)
    sweep: Callable[[], object] | None  # removes killed writers' leftovers (under the writer lock)
    upstream: list["Plan"] = field(default_factory=list)
    optional: frozenset = frozenset()  # targets of upstream plans the stage can do without
    blocked: Verdict | None = None  # why it cannot run yet
    command: str = ""  # the command that runs it, for "run ... first"
    outputs_at: Path | str | None = None  # where its outputs must be (a store URL)
    previous: Path | None = None  # an older lock to explain a first run against
    facts: dict = field(default_factory=dict)  # for status: vae, store, result
    extra_checks: list[Callable[[Verdict], Verdict]] = field(default_factory=list)
    finish: Callable[[], None] | None = None  # after the work or when up to date (point a run name)
    guard: Callable[[], object] | None = None  # raises if an input it reads is damaged, up to date or not
    replan: Callable[[], "Plan"] | None = None  # the same instance planned again (upstream has changed)
    writes: bool = True  # False on DDP ranks other than 0: they work but never lock or write
    data: Any = None  # what the stage's work and its downstream read (graph.Latents for encode)

    @classmethod
    def not_ready(cls, stage: Stage, target: str, blocked: Verdict, command: str, **kw) -> "Plan":
        """An instance that cannot be planned yet (no inputs, nothing to lock): `blocked` says why."""
        return cls(stage, target, None, Path(), Path(), None, blocked=blocked, command=command, **kw)

    @property
    def title(self) -> str:
        return f"{self.stage.name} {self.target}"

    def check(self, deep: bool = False) -> Verdict:
        """Up to date iff its inputs equal its lock's and its outputs are intact (`deep`: hashed)."""
        if self.inputs is None:
            return self.blocked
        verdict = locks.check(self.lock, self.inputs, self.outputs_at, self.previous, deep=deep)
        for extra in self.extra_checks:
            verdict = extra(verdict)
        return verdict


def upstream_ready(plan: Plan, cfg: Config, log, implicit: frozenset[str]) -> bool:
    """Bring the plan's upstream up to date: run a stale stage that is implicit (declared so, or named
    in `implicit`), leave out an optional one that cannot run (saying so), and name the command to run
    first for any other. True if anything ran."""
    ran = False
    for up in plan.upstream:
        verdict = up.check(deep=up.stage.deep)
        if verdict.up_to_date:
            continue
        if up.inputs is not None and (up.stage.implicit or up.stage.name in implicit):
            run(up, cfg, log, implicit)
            ran = True
        elif up.target in plan.optional:
            log(f"{plan.title}: {up.title} left out: {'; '.join(verdict.reasons)}")
        else:
            first = verdict.blocked[0] if verdict.blocked else up.command
            raise UserError(
                f"{plan.title}: {up.title} is not up to date ({'; '.join(verdict.reasons)}); run `{first}` first"
            )
    return ran


def run(plan: Plan, cfg: Config, log=print, implicit: frozenset[str] = frozenset()) -> Done:
    """Run one stage instance: its upstream (see upstream_ready), then, holding its writer lock, sweep
    orphans, check, work and write the lock. Returns the Done (result None when it was up to date)."""
    if upstream_ready(plan, cfg, log, implicit) and plan.replan is not None:
        plan = plan.replan()  # the upstream identities it reads have changed
    if plan.inputs is None:
        raise UserError(
            f"{plan.title}: {'; '.join(plan.blocked.reasons)}"
            + (f"; run `{plan.blocked.blocked[0]}` first" if plan.blocked.blocked else "")
        )
    with ExitStack() as held:
        denied = _hold_writer_lock(plan, held)
        writes = plan.writes and denied is None
        if writes and plan.sweep is not None:
            plan.sweep()  # none of its writers can be alive under this lock
        if plan.guard is not None:
            plan.guard()  # a damaged input is refused before anything is vouched for
        verdict = plan.check(deep=plan.stage.deep)  # again, now that no other writer can change it
        if verdict.up_to_date:
            done = Done(None)
        elif denied is not None:
            raise UserError(
                f"{plan.title} is not up to date ({'; '.join(verdict.reasons)}), and its outputs cannot be "
                f"written by this user: {denied}. Run it as a user who can write there; a read-only "
                "cache serves the commands that only read (status, runs, verify, attribute, compare, "
                "and score of an up-to-date run)"
            )
        else:
            done = plan.stage.work(plan, cfg, log, verdict)
            if plan.writes and done.outputs is not None:
                lock = locks.write_lock(plan.lock, plan.stage.name, plan.inputs, done.outputs, **done.extra)
                if done.locked is not None:
                    done.locked(lock)
        if writes and plan.finish is not None:
            plan.finish()
    return done


def _hold_writer_lock(plan: Plan, held: ExitStack) -> str | None:
    """Take the plan's writer lock into `held`; where this user cannot write it (a read-only cache), say
    why instead (the stage may then still find itself up to date, which needs no writing)."""
    if not plan.writes:
        return None
    try:
        held.enter_context(exclusive(plan.writer_lock, plan.title))
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return f"{exc.filename or plan.writer_lock}: {exc.strerror}"
    return None
