"""Records an upgrade of code identity in pipeline/ledger/code_upgrades.json: unit edits that leave every
output of the named stages the same, so their stored outputs stay valid (docs/developer.md, "Code
identity"). Check first, then record, from a checkout whose pipeline/, stages/ and workflows/ are committed:

    nice -n 10 .venv/bin/python benchmarks/bitwise.py --before b90e126   # equal latents, weights, embeddings
    .venv/bin/python tests/code_upgrade.py --stages encode,train,embed --why "what changed; how it was checked"

For each named stage: the units whose hash differs between the identity derived from the source at SINCE
(default: the newest commit of declared_code.json, the last one whose locks hold declared identities),
carried through the upgrades recorded so far, and the identity derived from this checkout. Each distinct
set of edits is one upgrade, the largest first (a stage's own edits hold those of a stage that runs part of
its code, which must not be applied to it first). Re-runnable: after more edits it records only those.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `tests` from the checkout
from leakpipe.pipeline.ledger import code  # noqa: E402
from leakpipe.stages import STAGES  # noqa: E402
from tests.declared_code import CHECKOUT, FOLDERS, source_at  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=CHECKOUT).stdout.strip()


def newest_declared() -> str:
    """The commit of declared_code.json that came last (by commit time)."""
    return max(code.declared(), key=lambda commit: int(git("log", "-1", "--format=%ct", commit)))


def identities_at(rev: str, stages: list[str]) -> dict[str, dict[str, str]]:
    """{stage: the identity derived from the source at `rev`}."""
    with source_at(rev):
        return {name: code.identity(STAGES[name].code) for name in stages}


def edits(then: dict[str, dict[str, str]]) -> dict[str, dict]:
    """{stage: {"before": ..., "after": ...}} of the units that differ between `then` carried through the
    upgrades so far and this checkout, for the stages with any."""
    out, was = {}, {name: code.upgraded(ident) for name, ident in then.items()}
    for name in was:
        now = code.identity(STAGES[name].code)
        units = sorted(u for u in set(was[name]) | set(now) if was[name].get(u) != now.get(u))
        if units:
            out[name] = {"before": {u: was[name].get(u) for u in units}, "after": {u: now.get(u) for u in units}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", required=True, help="comma-separated stages whose outputs were found equal")
    ap.add_argument("--why", required=True, help="what changed, and how it was checked bitwise")
    ap.add_argument("--since", help="the revision whose identities the upgrade starts from")
    a = ap.parse_args()
    stages = a.stages.split(",")
    if unknown := [s for s in stages if s not in STAGES]:
        sys.exit(f"--stages: no stage {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    if dirty := git("status", "--porcelain", "--", *FOLDERS, f":!{code.UPGRADES_FILE.relative_to(CHECKOUT)}"):
        sys.exit(f"commit the code first: an upgrade records the commit its after-identity is of\n{dirty}")
    then = identities_at(a.since or newest_declared(), stages)
    found = edits(then)
    if not found:
        sys.exit(f"nothing to record: {', '.join(stages)} derive the identities the tables already give")
    recorded, commit, kept = code.upgrades(), git("rev-parse", "HEAD"), code.UPGRADES_FILE.read_text()
    for name, edit in sorted(found.items(), key=lambda kv: -len(kv[1]["before"])):
        if all(h is None for h in edit["before"].values()):
            sys.exit(f"{name}: only units it did not hold; its roots changed, not code it ran: record nothing")
        same = next((up for up in recorded if up["commit"] == commit and up["before"] == edit["before"]), None)
        if same is not None and same["after"] == edit["after"]:
            same["stages"].append(name)  # another stage with the same edits: one upgrade
            continue
        recorded.append({**edit, "why": a.why, "commit": commit, "stages": [name]})
        print(f"{name}: {len(edit['before'])} units: {', '.join(edit['before'])}")
    code.UPGRADES_FILE.write_text(json.dumps(recorded, indent=1) + "\n")
    code.upgrades.cache_clear()
    missed = [n for n in stages if code.upgraded(then[n]) != code.identity(STAGES[n].code)]
    if missed:  # an upgrade of another stage took units this one's needed: record nothing
        code.UPGRADES_FILE.write_text(kept)
        sys.exit(f"the upgrades would not carry {', '.join(missed)} to this checkout's identity; nothing recorded")
    print(f"recorded in {code.UPGRADES_FILE}")


if __name__ == "__main__":
    main()
