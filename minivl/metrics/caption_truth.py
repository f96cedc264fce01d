"""Is a caption true? Parse a Shapes World caption and check every claim against the scene graph.

BLEU and CIDEr reward overlap with reference phrasings, so "a red circle and a blue square"
scores well against "a red circle and a blue cross" although it names an object that is not
there. With an exact scene graph we can ask the question that matters instead: which objects
does the caption mention, do they exist, and is every other word (size, region, count, order)
true? The measures follow the object-hallucination literature: CHAIR (Rohrbach et al., 2018)
counts mentioned objects with no match in the image; precision and recall of mentioned objects
follow from the same matching.

The grammar is the one minivl.world_text writes (all four phrasings):

    a small red circle, a large blue square and a small gray cross   sizes, left to right
    there are three objects: a red circle, a blue square and ...     a count, left to right
    two red circles and a blue square                                groups (order is no claim)
    a red circle in the top left, a blue square on the right ...     regions, left to right

A generated sentence may start with a capital and end with "."; both are accepted. A caption
outside the grammar is "not parsed": it mentions nothing and is neither exact nor true.

What each claim means (the words are checked against the picture, not against one reference):
- an object mention matches an object of the same colour and shape, each object at most once;
- a size word is true when the matched object has that size;
- a region word is a claim about the thirds of the image ("in the top left": the centre lies
  in the top third and the left third; "at the top": the top third; "on the left": the left
  third; "in the center": the middle third both ways), checked without the margins the
  generator keeps before it *writes* a region word (a true statement stays true near a line);
- "listed left to right" is true when the matched objects' centres do not go leftwards by more
  than `world.margin` px from one mention to the next;
- "there are N objects" is true when the scene has N objects.

The one idea to take away: a caption metric should be computed against what is *in the image*;
only then can "fluent but false" be told apart from "true but phrased differently".
"""
from __future__ import annotations

from minivl.world_text import NUMBERS, PLURAL
from minivl.world_text import _third as third  # with margin 0: the third a coordinate lies in

_SINGULAR = {p: s for s, p in PLURAL.items()}
_COUNT = {w: i for i, w in enumerate(NUMBERS)}
# region phrase -> (row third, column third); None = that axis is not claimed
_REGIONS = {"in the top left": (0, 0), "at the top": (0, None), "in the top right": (0, 2),
            "on the left": (None, 0), "in the center": (1, 1), "on the right": (None, 2),
            "in the bottom left": (2, 0), "at the bottom": (2, None), "in the bottom right": (2, 2)}
KEYS = ("object_precision", "object_recall", "exact_scene", "all_claims_true", "chair", "absent_pair_rate",
        "parse_rate")


def _split_list(text: str) -> list[str]:
    """'x, y and z' -> ['x', 'y', 'z'] (the inverse of world_text.join_list)."""
    head, sep, last = text.rpartition(" and ")
    return (head.split(", ") + [last]) if sep else [text]


def _mention(item: str, world, grouped: bool):
    """One list item -> (count, size, colour, shape, region) or None when it is not in the grammar."""
    region = None
    for phrase in _REGIONS:
        if item.endswith(" " + phrase):
            item, region = item[: -len(phrase) - 1], phrase
            break
    words = item.split(" ")
    if words[0] in ("a", "an"):
        n, words = 1, words[1:]
    elif grouped and words[0] in _COUNT and _COUNT[words[0]] >= 2:
        n, words = _COUNT[words[0]], words[1:]
    else:
        return None
    size = words.pop(0) if len(words) == 3 else None
    if len(words) != 2 or (size is not None and size not in ("small", "large")):
        return None
    color, shape = words
    if n > 1:
        shape = _SINGULAR.get(shape)
    elif shape in _SINGULAR:  # "a red circles"
        return None
    if color not in world.config.colors or shape not in world.config.shapes:
        return None
    article = "an" if (size or color)[0] in "aeiou" else "a"
    if n == 1 and item.split(" ")[0] != article:  # "a orange circle" is not what the grammar writes
        return None
    return n, size, color, shape, region


def parse_caption(world, caption: str):
    """-> (mentions, total, ordered) or None. mentions: [(count, size, colour, shape, region)];
    total: the N of "there are N objects" (else None); ordered: whether the list claims left-to-right order."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    text = " ".join(caption.strip().split()).rstrip(".").strip()
    if not text:
        return None
    text = text[0].lower() + text[1:]
    total = None
    if text.startswith("there "):
        head, sep, text = text.partition(": ")
        words = head.split(" ")
        if not sep or len(words) != 4 or words[1] not in ("is", "are") or words[2] not in _COUNT:
            return None
        total = _COUNT[words[2]]
        if words[1:] != (["is", "one", "object"] if total == 1 else ["are", words[2], "objects"]):
            return None
    items = _split_list(text)
    grouped = total is None and not any(" in the " in i or " on the " in i or " at the " in i for i in items)
    mentions = [_mention(i, world, grouped) for i in items]
    if any(m is None for m in mentions):
        return None
    has_size, has_region = {m[1] is not None for m in mentions}, {m[4] is not None for m in mentions}
    if len(has_size) > 1 or len(has_region) > 1 or (True in has_size and True in has_region) \
            or (total is not None and (True in has_size or True in has_region)) \
            or ((True in has_size or True in has_region) and any(m[0] > 1 for m in mentions)):
        return None  # one phrasing per caption, as the generator writes them
    counts = [m[0] for m in mentions]
    ordered = max(counts) == 1 and (total is not None or True in has_size or True in has_region)
    return mentions, total, ordered


def scene_truth(world, scene, caption: str) -> dict:
    """Every claim of one caption checked against `scene` (see the module docstring)."""
    objs, S = scene.objects, world.config.image_size
    out = dict(parsed=False, mentions=0, matched=0, unmatched=0, absent_pairs=0, absent_mentions=0,
               exact=False, all_true=False, n_objects=len(objs))
    parsed = parse_caption(world, caption)
    if parsed is None:
        return out
    mentions, total, ordered = parsed
    present = {(o.color, o.shape) for o in objs}
    mentioned: dict = {}
    for n, _, c, s, _ in mentions:
        mentioned[(c, s)] = mentioned.get((c, s), 0) + n
    in_scene: dict = {}
    for o in objs:
        in_scene[(o.color, o.shape)] = in_scene.get((o.color, o.shape), 0) + 1
    matched = sum(min(k, in_scene.get(p, 0)) for p, k in mentioned.items())
    n_mentions = sum(mentioned.values())
    exact = mentioned == in_scene and (total is None or total == len(objs))
    out.update(parsed=True, mentions=n_mentions, matched=matched, unmatched=n_mentions - matched,
               absent_pairs=sum(p not in present for p in mentioned),
               absent_mentions=sum(k for p, k in mentioned.items() if p not in present), exact=exact)
    if not exact:
        return out
    # every other word: take, for each mention in turn, the leftmost free object of its colour and
    # shape whose size and region fit (one phrasing per caption, so this greedy choice is optimal)
    free, xs, true = list(range(len(objs))), [], True
    for n, size, c, s, region in mentions:
        for _ in range(n):
            fits = [i for i in free if objs[i].color == c and objs[i].shape == s
                    and (size is None or objs[i].size == size) and _region_true(region, objs[i].center, S)]
            if not fits:
                true = False
                break
            i = min(fits, key=lambda j: objs[j].center)
            free.remove(i)
            xs.append(objs[i].center[0])
    if true and ordered:
        true = all(b >= a - world.margin for a, b in zip(xs, xs[1:]))
    out["all_true"] = true
    return out


def _region_true(region, center, S: int) -> bool:
    if region is None:
        return True
    row, col = _REGIONS[region]
    return (row is None or third(center[1], S, 0) == row) and (col is None or third(center[0], S, 0) == col)


def _aggregate(rows: list[dict]) -> dict:
    def ratio(a, b):
        return sum(r[a] for r in rows) / max(1, sum(r[b] for r in rows))
    n = max(1, len(rows))
    return dict(object_precision=ratio("matched", "mentions"), object_recall=ratio("matched", "n_objects"),
                exact_scene=sum(r["exact"] for r in rows) / n, all_claims_true=sum(r["all_true"] for r in rows) / n,
                chair=ratio("unmatched", "mentions"), absent_pair_rate=ratio("absent_mentions", "mentions"),
                parse_rate=sum(r["parsed"] for r in rows) / n, captions=len(rows))


def caption_truth(world, scenes, captions) -> dict:
    """Truth of generated captions, one per scene: the module's measures over all, and per object count.

    -> {object_precision, object_recall, exact_scene, all_claims_true, chair (mentions without a
    matching object, duplicates counted, / mentions), absent_pair_rate (mentions of a colour-shape
    pair absent from the scene / mentions), parse_rate, captions, by_objects: {n: the same keys}}.
    Ratios over zero mentions or captions are 0.
    """
    scenes, captions = list(scenes), list(captions)
    if len(scenes) != len(captions):
        raise ValueError(f"need one caption per scene, got {len(captions)} captions for {len(scenes)} scenes")
    rows = [scene_truth(world, s, c) for s, c in zip(scenes, captions)]
    out = _aggregate(rows)
    out["by_objects"] = {k: _aggregate([r for r in rows if r["n_objects"] == k])
                         for k in sorted({r["n_objects"] for r in rows})}
    return out


__all__ = ["parse_caption", "scene_truth", "caption_truth", "KEYS"]
