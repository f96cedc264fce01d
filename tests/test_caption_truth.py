"""Caption truth: every reference caption is true; each kind of false claim is caught."""
import pytest

from minivl.metrics.caption_truth import caption_truth, parse_caption, scene_truth
from minivl.world import Obj, Scene, World

WORLD = World()


def scene(*objs):
    """A hand-made scene: objects as (size, colour, shape, (x1, y1, x2, y2)) on a 64 px image."""
    return Scene(image=None, objects=[Obj(shape=s, color=c, size=z, box=b) for z, c, s, b in objs],
                 split="test", index=0, text_seed=0)


# left: a small red circle in the top left; right: a large blue square in the bottom right
TWO = scene(("small", "red", "circle", (2, 2, 12, 12)), ("large", "blue", "square", (40, 40, 60, 60)))


def test_every_reference_caption_is_parsed_exact_and_true():
    n = 0
    for split in ("test", "heldout"):
        for i in range(300):
            s = WORLD.scene(i, split)
            for c in WORLD.captions(s):
                for text in (c, c[0].upper() + c[1:] + "."):  # as a chat answer writes it
                    r = scene_truth(WORLD, s, text)
                    assert r["parsed"] and r["exact"] and r["all_true"], (split, i, text, r)
                    assert r["mentions"] == r["matched"] == len(s.objects) and r["unmatched"] == 0
                    n += 1
    assert n > 1500


@pytest.mark.parametrize("caption, exact, all_true", [
    ("a small red circle and a large blue square", True, True),
    ("a small red circle in the top left and a large blue square in the bottom right", False, False),  # mixed
    ("a red circle in the top left and a blue square in the bottom right", True, True),
    ("a red circle on the left and a blue square at the bottom", True, True),  # partial regions are true
    ("a red circle in the bottom left and a blue square in the bottom right", True, False),  # wrong region
    ("a large red circle and a large blue square", True, False),  # wrong size
    ("a large blue square and a small red circle", True, False),  # listed right to left
    ("a blue square and a red circle", True, True),  # grouped phrasing: the order is no claim
    ("there are two objects: a red circle and a blue square", True, True),
    ("there are three objects: a red circle and a blue square", False, False),  # wrong count word
    ("there are two objects: a blue square and a red circle", True, False),  # order
    ("a red circle", False, False),  # an object left out
    ("a red circle, a blue square and a green cross", False, False),  # an object made up
    ("two red circles and a blue square", False, False),  # a duplicate
])
def test_claims(caption, exact, all_true):
    r = scene_truth(WORLD, TWO, caption)
    if "top left and a large" in caption:
        assert not r["parsed"]  # size and region words in one caption are not a phrasing of the grammar
    else:
        assert r["parsed"], caption
    assert (r["exact"], r["all_true"]) == (exact, all_true), (caption, r)


def test_hallucination_counts():
    r = scene_truth(WORLD, TWO, "two red circles and a green cross")
    assert (r["mentions"], r["matched"], r["unmatched"], r["absent_pairs"], r["absent_mentions"]) == (3, 1, 2, 1, 1)
    agg = caption_truth(WORLD, [TWO, TWO], ["a red circle and a blue square", "two red circles and a green cross"])
    assert agg["object_precision"] == pytest.approx(3 / 5)
    assert agg["object_recall"] == pytest.approx(3 / 4)
    assert agg["chair"] == pytest.approx(2 / 5)
    assert agg["absent_pair_rate"] == pytest.approx(1 / 5)
    assert agg["exact_scene"] == agg["all_claims_true"] == 0.5
    assert agg["by_objects"][2]["captions"] == 2


@pytest.mark.parametrize("caption", ["", "a", "a red", "a red blob", "the red circle", "an red circle",
                                     "a red circles", "three red circle", "there are objects: a red circle",
                                     "a red circle and", "a red circle in the middle"])
def test_outside_the_grammar_is_not_parsed(caption):
    assert parse_caption(WORLD, caption) is None
    r = scene_truth(WORLD, TWO, caption)
    assert not r["parsed"] and not r["exact"] and r["mentions"] == 0


def test_bad_input():
    with pytest.raises(TypeError, match="caption must be a str"):
        scene_truth(WORLD, TWO, None)
    with pytest.raises(ValueError, match="one caption per scene"):
        caption_truth(WORLD, [TWO], [])
