"""The stages, one declaration each (`STAGE` in each module), and the graph that plans them by name.

A stage never imports another: it reaches its upstream through the graph (ledger/graph.py)."""

from __future__ import annotations

from leakpipe.pipeline.config import Config
from leakpipe.pipeline.ledger.graph import Graph
from leakpipe.pipeline.store.hashing import HashCache
from leakpipe.pipeline.workspace import Workspace
from leakpipe.stages import embed, encode, score, train

STAGES = {s.name: s for s in (encode.STAGE, train.STAGE, embed.STAGE, score.STAGE)}


def graph(ws: Workspace, cfg: Config, hashes: HashCache | None = None) -> Graph:
    """The stage graph of a workspace under a config."""
    return Graph(ws, cfg, STAGES, hashes)
