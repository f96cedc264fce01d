"""minivl.viz: every plot returns a Figure (never shows it), draws what it is given, and checks input."""
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from minivl import viz
from minivl.data import image_to_tensor
from minivl.world import World, WorldConfig


@pytest.fixture(scope="module")
def scenes():
    w = World(WorldConfig(image_size=32))
    return [w.scene(i) for i in range(3)]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_show_images_draws_boxes_and_titles(scenes):
    imgs = [s.image for s in scenes]
    boxes = [[o.box for o in s.objects] for s in scenes]
    labels = [[o.name for o in s.objects] for s in scenes]
    fig = viz.show_images(imgs, titles=["a", "b", "c"], boxes=boxes, box_labels=labels, ncols=2)
    assert isinstance(fig, matplotlib.figure.Figure)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 3
    assert [len(ax.patches) for ax in axes] == [len(b) for b in boxes]
    assert axes[1].get_title() == "b" and axes[0].texts[0].get_text() == labels[0][0]
    x1, y1, x2, y2 = boxes[0][0]
    rect = axes[0].patches[0]
    assert rect.get_xy() == (x1 - 0.5, y1 - 0.5) and rect.get_width() == x2 - x1
    # tensors in [-1, 1] show the same pixels as the uint8 image
    fig2 = viz.show_images(image_to_tensor(np.stack(imgs)))
    assert np.array_equal(fig2.axes[0].images[0].get_array(), imgs[0])


def test_show_images_rejects_bad_input(scenes):
    with pytest.raises(ValueError, match="titles has 1 entries for 3 images"):
        viz.show_images([s.image for s in scenes], titles=["x"])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        viz.show_images([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="at least one"):
        viz.show_images([])


def test_loss_curve_plots_train_and_val():
    hist = {"step": [0, 1, 2, 3], "loss": [4.0, 3.0, 2.5, 2.0], "val_loss": [3.5, 2.2], "val_step": [1, 3]}
    fig = viz.plot_loss_curve(hist, title="run")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and list(lines[1].get_xdata()) == [1, 3]
    with pytest.raises(ValueError, match="'step' and 'loss'"):
        viz.plot_loss_curve({"loss": [1.0]})


def test_attention_maps_drop_cls_and_check_grid(scenes):
    attn = torch.softmax(torch.randn(3, 17), -1)  # 3 heads, CLS + 4x4 patches
    fig = viz.plot_attention_maps(scenes[0].image, attn, grid_size=4)
    assert sum(1 for ax in fig.axes if ax.images) == 4
    assert fig.axes[1].images[1].get_array().shape == (4, 4)
    with pytest.raises(ValueError, match="grid_size"):
        viz.plot_attention_maps(scenes[0].image, torch.rand(2, 10), grid_size=4)


def test_similarity_and_confusion_matrices(scenes, tmp_path):
    sim = np.random.default_rng(0).random((3, 3))
    fig = viz.plot_similarity_matrix(sim, ["a", "b", "c"], ["x", "y", "z"], images=[s.image for s in scenes])
    assert np.allclose(fig.axes[0].images[0].get_array(), sim)
    with pytest.raises(ValueError, match="row_labels"):
        viz.plot_similarity_matrix(sim, ["a"], None)
    cm = np.array([[3, 1], [0, 4]])
    fig = viz.plot_confusion_matrix(cm, ["red circle", "blue square"])
    assert np.allclose(fig.axes[0].images[0].get_array(), [[0.75, 0.25], [0, 1]])
    with pytest.raises(ValueError, match="square"):
        viz.plot_confusion_matrix(np.ones((2, 3)), ["a", "b"])
    path = viz.savefig(fig, tmp_path / "sub" / "cm.png")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_image_texts_rows_with_marks(scenes):
    texts = [["a red circle", "a blue square"], ["there is one object: " + "a very long caption " * 8], ["x"]]
    marks = [[True, False], [True], [False]]
    fig = viz.show_image_texts([s.image for s in scenes], texts, marks=marks, title="top texts")
    assert len(fig.axes) == 6  # an image and a text panel per row
    drawn = [t for ax in fig.axes[1::2] for t in ax.texts]
    assert [t.get_text().split("\n")[0][:2] for t in drawn] == ["\u2713 ", "\u2717 ", "\u2713 ", "\u2717 "]
    assert [t.get_color() for t in drawn] == ["tab:green", "tab:red", "tab:green", "tab:red"]
    assert "\n" in drawn[2].get_text()  # long texts wrap instead of running off the figure
    with pytest.raises(ValueError, match="one list of texts"):
        viz.show_image_texts([s.image for s in scenes], texts[:2])
    with pytest.raises(ValueError, match="2 texts but 1 marks"):
        viz.show_image_texts([scenes[0].image], [texts[0]], marks=[[True]])


def test_show_captions_text_stays_under_its_image():
    """Each caption (and reference) is drawn whole under its image, above the next row's images."""
    from minivl.viz.captioner import show_captions
    w = World(WorldConfig(image_size=32))
    scenes = [w.scene(i, n_objects=4) for i in range(6)]  # four objects: the longest captions
    caps = [w.captions(s)[0] for s in scenes]
    fig = show_captions([s.image for s in scenes], caps, [w.captions(s)[-1] for s in scenes], marks=[True] * 5 + [False],
                        ncols=3, title="captions")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    texts = [ax.texts[0] if ax.texts else ax.title for ax in axes[:6]]
    assert [t.get_color() for t in texts] == ["tab:green"] * 5 + ["tab:red"]
    assert texts[0].get_text().replace("\n", " ").startswith(caps[0])
    for i, t in enumerate(texts):
        box = t.get_window_extent(renderer)
        assert box.y0 >= 0, "a caption runs off the bottom of the figure"
        if i + 3 < 6:  # the image below it
            assert box.y0 > axes[i + 3].get_window_extent(renderer).y1, "a caption runs into the next row"
    with pytest.raises(ValueError, match="one caption per image"):
        show_captions([scenes[0].image], caps[:2])
