"""The chain of stages for one run name, the one way the CLI, the sweep and the demo walk it:
encode what is stale, train, embed, score. Each stage runs through the one runner (ledger/stage.py),
so each does nothing when it is up to date."""

from __future__ import annotations

from leakpipe.pipeline.ledger.graph import Graph, score_splits, variants_of
from leakpipe.stages import embed, encode, score, train


def encode_stale(g: Graph, log=print) -> list:
    """Encode every split that training and scoring read and whose latents are not up to date."""
    trained = [g.cfg.train.split, variants_of(g.ws, g.cfg.train.variants, g.cfg.train.split)]
    splits = dict.fromkeys([*trained, *(s for _, s in score_splits(g.cfg, g.ws))])
    return [
        encode.run(g, s, log)
        for s in splits
        if s and g.ws.manifest(s).exists() and not g.plan("encode", s).check().up_to_date
    ]


def train_and_embed(g: Graph, run: str, log=print) -> train.TrainResult:
    """Stage two under run name `run`, then the embeddings of every encoded split (`leakpipe train`)."""
    result = train.run(g, run, log)
    embed.run(g, run, log)
    return result


def through_score(g: Graph, run: str, log=print, encode_first: bool = True) -> list[str]:
    """Every stage for run name `run` (encoding first when asked); returns the summary lines."""
    lines = [r.summary() for r in encode_stale(g, log)] if encode_first else []
    lines.append(train.run(g, run, log).summary())
    lines.append(score.run(g, run, log).summary())  # it embeds the splits it reads first
    return lines
