"""The report's explanations: the prototype gallery keeps every generator's name, whichever prototypes
win images."""

import numpy as np

from leakpipe.pipeline.report.explain_figures import gallery


def test_the_gallery_keeps_each_class_label_when_prototype_0_wins_nothing():
    img = np.zeros((64, 64, 3), np.uint8)
    thumbs = [[[], [img, img]], [[img], []], [[img, img, img], [img]]]  # closed00's prototype 0 wins nothing
    classes = ["closed00", "closed01", "closed02"]
    fig = gallery(thumbs, classes)
    axes = np.array(fig.axes).reshape(len(classes), -1)
    fig.canvas.draw()
    for c, name in enumerate(classes):
        first = axes[c, 0]
        assert first.axison and first.get_ylabel() == name and first.yaxis.label.get_visible()
    assert "wins no" in " ".join(t.get_text() for t in axes[0, 0].texts)


def test_attention_weights_are_read_in_words():
    from leakpipe.pipeline.report.render import attention_lines

    uniform = " ".join(attention_lines([[0.334, 0.333, 0.333], [0.3335, 0.333, 0.3335]], [0, 5, 10]))
    assert "is uniform" in uniform and "plain mean of the h_t" in uniform and "within 0.001" in uniform
    chosen = " ".join(attention_lines([[0.6, 0.2, 0.2], [0.34, 0.33, 0.33]], [0, 5, 10]))
    assert "up to 0.267 from uniform" in chosen and "plain mean" not in chosen
    assert "plays no part" in " ".join(attention_lines([[1.0], [1.0]], [0]))


def test_collapsed_prototypes_are_said_to_be_one_per_class():
    from leakpipe.pipeline.report.render import prototype_lines

    rows = [{"n": 20, "winning": 2, "separation": 1e-4}, {"n": 20, "winning": 1, "separation": 3e-4}]
    p = {"per_class": rows, "per_class_count": 2, "winning_fraction": 0.75, "median_separation": 2e-4}
    said = " ".join(prototype_lines({**p, "init": "random", "std": 0.01}, ["a", "b"]))
    assert "The explanation is one prototype per class" in said and "model.prototype_init = kmeans" in said
    assert "N(0, 0.01^2)" in said
    apart = {**p, "median_separation": 0.6, "per_class": [{**r, "separation": 0.6} for r in rows]}
    assert "one prototype per class" not in " ".join(prototype_lines(apart, ["a", "b"]))


def test_attribute_says_when_a_class_prototypes_share_an_image_equally():
    from types import SimpleNamespace

    import torch

    from leakpipe.stages.attribute import ONE_OF_EQUALS, explain

    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    together = torch.tensor([[[1.0, 0.0], [1.001, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # class 0's two nearly one
    apart = torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [-5.0, 5.0]]])

    def winner(prototypes):
        d = ((h[:, None, None] - prototypes[None]) ** 2).sum(-1)
        out = SimpleNamespace(logits=-d.min(-1).values, distances=d, h_bar=h, w=torch.ones(2, 2), a_t=torch.ones(2, 1))
        return [e["winning_prototype"] for e in explain(out, ["a", "b"], prototypes, 1.0, 1)]

    assert all(p["one_of_equals"] for p in winner(together))
    assert not any(p["one_of_equals"] for p in winner(apart))
    assert "one prototype per class" in ONE_OF_EQUALS
