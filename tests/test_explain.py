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
