"""The report's explanations: the prototype gallery keeps every generator's name, whichever prototypes
win images."""

import numpy as np

from leakpipe.pipeline.report.explain_figures import gallery


# thumbnails' colours: none grey, as text and frames are
COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
]


def _drawn_box(pixels: np.ndarray, colour) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) in display px, y up, of the one solid rectangle of `colour` in the drawn figure."""
    ys, xs = np.nonzero((pixels == colour).all(-1))
    assert len(xs), f"thumbnail {colour} is not drawn"
    assert len(xs) == (np.ptp(xs) + 1) * (np.ptp(ys) + 1), f"thumbnail {colour} is not drawn as one rectangle"
    return xs.min(), xs.max() + 1, pixels.shape[0] - ys.max() - 1, pixels.shape[0] - ys.min()


def test_the_gallery_keeps_each_class_label_when_prototype_0_wins_nothing():
    """Drawn, the gallery shows each generator's name beside its row, each prototype's heading above its
    thumbnails, every thumbnail in its row under its heading, nearest first, and "wins no training
    image" in the first cell of each prototype that wins none, prototype 0 included."""
    colours = iter(COLOURS)
    counts = [[0, 2], [1, 0], [3, 1]]  # closed00's prototype 0 wins nothing
    thumbs = [[[np.full((64, 64, 3), next(colours), np.uint8) for _ in range(n)] for n in row] for row in counts]
    classes = ["closed00", "closed01", "closed02"]
    fig = gallery(thumbs, classes)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    texts = [t for ax in fig.axes for t in ax.texts if t.get_visible() and t.get_text()]
    for t in texts:  # names, headings and notes: inside the figure, not cut off
        box = t.get_window_extent()
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= pixels.shape[1] and box.y1 <= pixels.shape[0], t
    at = {t.get_text(): t.get_window_extent() for t in texts}
    boxes = [[[_drawn_box(pixels, im[0, 0]) for im in ims] for ims in row] for row in thumbs]
    every = [b for row in boxes for ims in row for b in ims]
    assert all(x1 - x0 >= 40 and y1 - y0 >= 40 for x0, x1, y0, y1 in every)  # thumbnails, not specks
    headings = [at[f"prototype {m}"] for m in range(2)]
    for c, name in enumerate(classes):
        label = at[name]
        assert label.x1 < min(b[0] for b in every)  # the names sit left of every thumbnail
        for m, row in enumerate(boxes[c]):
            for j, (x0, x1, y0, y1) in enumerate(row):
                assert y0 < (label.y0 + label.y1) / 2 < y1  # on its generator's row
                assert headings[m].y0 >= y1 and headings[m].x0 - 2 <= x0  # under its prototype's heading
                assert m == 1 or x1 < headings[1].x0
                assert j == 0 or row[j - 1][1] < x0  # nearest first, left to right
    notes = [t.get_window_extent() for t in texts if t.get_text() == "wins no\ntraining\nimage"]
    assert len(notes) == 2  # closed00's prototype 0 and closed01's prototype 1
    for note, c, m in zip(sorted(notes, key=lambda b: b.x0), (0, 1), (0, 1)):  # left to right
        x, y = (note.x0 + note.x1) / 2, (note.y0 + note.y1) / 2
        row = [b for ims in boxes[c] for b in ims]  # the other prototype's thumbnails
        assert all(y0 < y < y1 for _, _, y0, y1 in row)  # on its generator's row
        first = boxes[2 if m == 0 else 0][m][0]  # the first thumbnail of prototype m in another row
        assert first[0] < x < first[1]  # in the prototype's first column
        assert all(not (x0 < x < x1 and y0 < y < y1) for x0, x1, y0, y1 in every)  # in an empty cell


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
