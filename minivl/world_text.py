"""Shapes World text: every task's targets, derived from the scene graph (used by minivl.world).

Captions with several phrasings (all kept as references, as COCO keeps five), questions in the
spirit of Sort-of-CLEVR and CLEVR (Santoro et al. 2017; Johnson et al. 2017), referring
expressions (RefCOCO), Grounding-DINO prompts ("circle . red square") and LLaVA conversations.

The idea to take away: a statement is only made when the scene graph gives it exactly one
answer *and* a person looking at the picture would agree. Every description picks out one
object; a spatial word is used only with a clear margin (the rules below, `relations`, `region`
and `clear_winners`, stated with their numbers in data/README.md), so no label is a matter of opinion.
"""
from __future__ import annotations

import random
from operator import itemgetter
from typing import NamedTuple

QUESTION_TYPES = ("color", "shape", "count", "exists", "position", "relation", "closest", "furthest")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "diamond": "diamonds", "cross": "crosses"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
           "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen")
# attribute patterns a description may use, shortest first; the first that picks out exactly
# one object is the object's name in questions
PATTERNS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"),
            ("color",), ("size", "color"), ("size",))
WITH_SHAPE, NO_COLOR, NO_SHAPE = PATTERNS[:4], PATTERNS[:3:2], PATTERNS[4:]
REGIONS = (("in the top left", "at the top", "in the top right"),
           ("on the left", "in the center", "on the right"),
           ("in the bottom left", "at the bottom", "in the bottom right"))
RELATIONS = (("left of", 0, -1), ("right of", 0, 1), ("above", 1, -1), ("below", 1, 1))
EXTREMES = (("leftmost", 0, -1), ("rightmost", 0, 1), ("topmost", 1, -1), ("bottommost", 1, 1))
# "a is left of b" needs the boxes apart on x AND |dx| >= DOMINANCE * |dy| (centres): apart alone
# would call an object "right of" one it mostly sits above.
DOMINANCE = 2.0
# closest/furthest: the winner's centre AND edge distance must beat the runner-up's by this
# factor plus world.margin px; a few pixels out of forty is not something a person can see.
CLEAR = 1.25
DESCRIBE = ("Describe the image.", "What do you see in this picture?",
            "Give a short description of the image.", "What is in this image?")


class Question(NamedTuple):
    question: str
    answer: str
    type: str  # one of QUESTION_TYPES, for per-type metrics


class Referring(NamedTuple):
    text: str     # "the large blue square"
    box: tuple    # xyxy of the one object it refers to
    index: int    # position of that object in scene.objects
    type: str     # attribute | relation | extreme


class DetectionQuery(NamedTuple):
    phrases: tuple  # ("circle", "red square")
    boxes: tuple    # one xyxy box per (phrase, matching object) ...
    labels: tuple   # ... and the phrase index of each box
    type: str       # shapes | combos | mixed

    @property
    def query(self) -> str:  # the Grounding-DINO prompt
        return " . ".join(self.phrases)


def article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def join_list(items: list) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def phrase(o, pattern: tuple) -> str:
    """Words of `pattern` in English order (size colour shape); 'object' when the shape is left out."""
    words = [getattr(o, a) for a in pattern]
    return " ".join(words if "shape" in pattern else words + ["object"])


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def rng_for(scene, stream: int) -> random.Random:
    """A private random stream per (scene, purpose), so one task's choices never shift another's."""
    return random.Random(scene.text_seed * 16 + stream)


# Only random() is guaranteed to give the same stream on every Python version, so choices are
# built on it rather than on random.choice / sample / shuffle.
def pick(rng, seq):
    return seq[int(rng.random() * len(seq))]


def pick_k(rng, seq, k: int) -> list:
    """k distinct items of seq in random order (all of them, shuffled, when k >= len(seq))."""
    seq, n, draw = list(seq), len(seq), rng.random
    for i in range(min(k, n)):  # a partial Fisher-Yates shuffle: k draws, not n
        j = i + int(draw() * (n - i))
        seq[i], seq[j] = seq[j], seq[i]
    return seq[:k]


def count(items) -> dict:  # collections.Counter, minus its isinstance checks (hot path)
    out = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def memo(fn):
    """Cache a per-scene result on the scene (text is a pure function of it); callers get a copy."""
    def wrapped(world, scene):
        if fn.__name__ not in scene.memo:
            scene.memo[fn.__name__] = fn(world, scene)
        return list(scene.memo[fn.__name__])
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def centers(scene) -> list:
    if "centers" not in scene.memo:
        scene.memo["centers"] = [o.center for o in scene.objects]
    return scene.memo["centers"]


def relations(scene) -> tuple:
    """(side, past, dist), from one pass over the pairs. past[k][b] = (objects whose box lies
    wholly before b's on axis k, wholly after): x is left/right, y is above/below. side[k][a][b]
    is -1/+1 when a is wholly before/after b on axis k AND the centre offset along k is
    >= DOMINANCE times the offset across it: only then is "a is left of b" (or above...) said.
    dist[a] = [(centre distance, edge distance, b) for every other b], for closest/furthest."""
    if "relations" not in scene.memo:
        boxes, cs, n = [o.box for o in scene.objects], centers(scene), len(scene.objects)
        side = [[[0] * n for _ in range(n)] for _ in range(2)]
        past = [[([], []) for _ in range(n)] for _ in range(2)]
        dist = [[] for _ in range(n)]
        for a in range(n):
            (ax1, ay1, ax2, ay2), (acx, acy) = boxes[a], cs[a]
            for b in range(n):
                (bx1, by1, bx2, by2), (bcx, bcy) = boxes[b], cs[b]
                dx, dy = abs(acx - bcx), abs(acy - bcy)
                if ax2 <= bx1:  # a wholly left of b
                    past[0][b][0].append(a)
                    past[0][a][1].append(b)
                    if dx >= DOMINANCE * dy:
                        side[0][a][b], side[0][b][a] = -1, 1
                if ay2 <= by1:  # a wholly above b
                    past[1][b][0].append(a)
                    past[1][a][1].append(b)
                    if dy >= DOMINANCE * dx:
                        side[1][a][b], side[1][b][a] = -1, 1
                if n >= 3 and a != b:  # closest/furthest need three objects
                    gx, gy = max(0, bx1 - ax2, ax1 - bx2), max(0, by1 - ay2, ay1 - by2)
                    dist[a].append(((dx * dx + dy * dy) ** 0.5, (gx * gx + gy * gy) ** 0.5, b))
        scene.memo["relations"] = side, past, dist
    return scene.memo["relations"]


def _third(v: float, S: int, m: float):
    """Which third of [0, S) v lies in, when at least m from the lines between thirds; else None."""
    k = min(2, int(3 * v / S))
    return None if (k > 0 and v - k * S / 3 < m) or (k < 2 and (k + 1) * S / 3 - v < m) else k


def region(world, c) -> str | None:
    """The REGIONS word for centre c, or None. A centre must be >= world.region_margin px from a
    third-line to count as in that third; near a column line only the row word is kept ("at the
    top": the top third), near a row line only the column word ("on the left"), else no word."""
    S, m = world.config.image_size, world.region_margin
    col, row = _third(c[0], S, m), _third(c[1], S, m)
    if row is None:
        return REGIONS[1][col] if col in (0, 2) else None
    if col is None:
        return REGIONS[row][1] if row != 1 else None
    return REGIONS[row][col]


def clear_winners(dist: list, margin: float) -> tuple:
    """(closest, furthest) among `dist` (one row of relations()'s dist), each an index or None
    where there is no clear winner. A winner must win by centre distance AND by edge distance
    (the gap between boxes: a big shape can be nearer by its edge than its centre says), and beat
    the runner-up on each by a factor CLEAR plus `margin` px."""
    by_centre = sorted(dist)
    by_edge = sorted(dist, key=itemgetter(1))
    (c0, _, j0), (c1, _, _), (_, e0, k0), (_, e1, _) = by_centre[0], by_centre[1], by_edge[0], by_edge[1]
    near = j0 if j0 == k0 and c1 >= CLEAR * c0 + margin and e1 >= CLEAR * e0 + margin else None
    (c0, _, j0), (c1, _, _), (_, e0, k0), (_, e1, _) = by_centre[-1], by_centre[-2], by_edge[-1], by_edge[-2]
    far = j0 if j0 == k0 and c0 >= CLEAR * c1 + margin and e0 >= CLEAR * e1 + margin else None
    return near, far


def descriptions(scene) -> list:
    """Per object: {pattern: phrase} for every pattern that picks out exactly that object."""
    if "descs" not in scene.memo:
        keys, words = [], []
        for o in scene.objects:  # spelled out in PATTERNS order: this is the hot path of all text
            z, c, s = o.size, o.color, o.shape
            keys.append(((s,), (c, s), (z, s), (z, c, s), (c,), (z, c), (z,)))
            words.append((s, f"{c} {s}", f"{z} {s}", f"{z} {c} {s}", f"{c} object", f"{z} {c} object", f"{z} object"))
        counts = [count(k[j] for k in keys) for j in range(len(PATTERNS))]
        scene.memo["descs"] = [{p: w[j] for j, p in enumerate(PATTERNS) if counts[j][k[j]] == 1}
                               for k, w in zip(keys, words)]
    return scene.memo["descs"]


def _first(desc: dict, patterns: tuple):
    for p in patterns:
        if p in desc:
            return desc[p]
    return None


def _pool(world, scene) -> list:  # colour-shape pairs the text may mention
    return world.combos if scene.split == "heldout" else world.train_combos


def _present_absent(world, scene) -> tuple:
    """Equal numbers of present and absent shapes, colours and pairs, drawn once per scene, so
    that exists questions are half yes and detection prompts hold as many misses as hits."""
    if "present" in scene.memo:
        return scene.memo["present"]
    objs, cfg, rng = scene.objects, world.config, rng_for(scene, 4)
    out = []
    for present, universe in ((count(o.shape for o in objs), cfg.shapes),
                              (count(o.color for o in objs), cfg.colors),
                              (count((o.color, o.shape) for o in objs), _pool(world, scene))):
        absent = [u for u in universe if u not in present]
        k = min(len(present), len(absent))
        out.append((present, pick_k(rng, list(present), k), pick_k(rng, absent, k)))
    scene.memo["present"] = out
    return out


@memo
def captions(world, scene) -> list:
    objs = sorted(scene.objects, key=lambda o: o.center)  # left to right
    n = len(objs)
    groups = count(o.name for o in objs)  # insertion order: first seen from the left
    grouped = [article(name) if k == 1 else f"{NUMBERS[k]} {name.split()[0]} {PLURAL[name.split()[1]]}"
               for name, k in sorted(groups.items(), key=lambda kv: -kv[1])]
    caps = [join_list([article(f"{o.size} {o.name}") for o in objs]),
            f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} object{'s' * (n > 1)}: "
            + join_list([article(o.name) for o in objs]),
            join_list(grouped)]
    where = [region(world, o.center) for o in objs]
    if None not in where:  # the positional phrasing only when every object has a clear region
        caps.append(join_list([f"{article(o.name)} {r}" for o, r in zip(objs, where)]))
    return list(dict.fromkeys(caps))


@memo
def questions(world, scene) -> list:
    rng, objs, cs = rng_for(scene, 1), scene.objects, centers(scene)
    half, rm = world.config.image_size / 2, world.region_margin
    descs = descriptions(scene)
    named = [(i, n) for i, d in enumerate(descs) if (n := _first(d, WITH_SHAPE)) is not None]
    # candidates per type as (template, words, answer); only the chosen ones get formatted
    qs = {t: [] for t in QUESTION_TYPES}
    for o, d in zip(objs, descs):
        if (name := _first(d, NO_COLOR)) is not None:
            qs["color"].append(("what color is the {}?", (name,), o.color))
        if (name := _first(d, NO_SHAPE)) is not None:
            qs["shape"].append(("what shape is the {}?", (name,), o.shape))
    (shapes, some_shapes, no_shapes), (colors, some_colors, no_colors), (pairs, some_pairs, no_pairs) = \
        _present_absent(world, scene)
    count, exists = qs["count"], qs["exists"]
    for s in list(shapes) + no_shapes:
        count.append(("how many {} are there?", (PLURAL[s],), str(shapes.get(s, 0))))
    for s in some_shapes + no_shapes:
        exists.append(("is there {}?", (article(s),), "yes" if s in shapes else "no"))
    for c in list(colors) + no_colors:
        count.append(("how many {} objects are there?", (c,), str(colors.get(c, 0))))
    for c in some_colors + no_colors:
        exists.append(("is there {} object?", (article(c),), "yes" if c in colors else "no"))
    for c, s in list(pairs) + no_pairs:
        count.append(("how many {} {} are there?", (c, PLURAL[s]), str(pairs.get((c, s), 0))))
    for c, s in some_pairs + no_pairs:
        exists.append(("is there {} {}?", (article(c), s), "yes" if (c, s) in pairs else "no"))
    for i, name in named:
        cx, cy = cs[i]
        if abs(cx - half) >= rm:  # halves are regions too: the centre keeps the region margin
            qs["position"].append(("is the {} on the left or right of the image?", (name,), "left" if cx < half else "right"))
        if abs(cy - half) >= rm:
            qs["position"].append(("is the {} at the top or bottom of the image?", (name,), "top" if cy < half else "bottom"))
    (side_x, side_y), _, dist = relations(scene)
    for a, an in named:  # asked only when the pair is clearly one way or the other: "no" is clear too
        for b, bn in named:
            if sx := side_x[a][b]:
                qs["relation"].append(("is the {} left of the {}?", (an, bn), "yes" if sx < 0 else "no"))
            if sy := side_y[a][b]:
                qs["relation"].append(("is the {} above the {}?", (an, bn), "yes" if sy < 0 else "no"))
    if len(objs) >= 3:  # with two objects, closest = furthest = the other one
        for a, an in named:
            for kind, word, j in zip(("closest", "furthest"), ("closest to", "furthest from"),
                                     clear_winners(dist[a], world.margin)):
                if j is not None:
                    o = objs[j]
                    qs[kind].append(("what color is the object {} the {}?", (word, an), o.color))
                    qs[kind].append(("what shape is the object {} the {}?", (word, an), o.shape))
    k = world.config.questions_per_type
    # the total count is always kept: other counts are mostly 0 or 1
    chosen = {t: c if len(c) <= k else pick_k(rng, c, k) for t, c in qs.items()}
    chosen["count"] = [("how many objects are there?", (), str(len(objs)))] + chosen["count"][:k - 1]
    return [Question(q.format(*w), a, t) for t in QUESTION_TYPES for q, w, a in chosen[t]]


@memo
def referring(world, scene) -> list:
    objs, n, descs = scene.objects, len(scene.objects), descriptions(scene)
    side, past, _ = relations(scene)
    out = [Referring("the " + text, o.box, i, "attribute")
           for i, (o, d) in enumerate(zip(objs, descs)) for text in d.values()]
    for b, d in enumerate(descs):
        if (name := _first(d, WITH_SHAPE)) is None:
            continue
        for rel, axis, sign in RELATIONS:
            # one object clearly beyond the anchor, and no other even wholly past its box on that
            # axis (a far-off diagonal one would make a person hesitate between the two)
            beyond = past[axis][b][sign > 0]
            if len(beyond) == 1 and side[axis][beyond[0]][b] == sign:
                out.append(Referring(f"the object {rel} the {name}", objs[beyond[0]].box, beyond[0], "relation"))
    if n >= 2:
        for word, axis, sign in EXTREMES:  # the extreme box lies wholly beyond every other box
            for j in range(n):
                if len(past[axis][j][sign < 0]) == n - 1:  # leftmost: all others wholly after it
                    out.append(Referring(f"the {word} object", objs[j].box, j, "extreme"))
                    break
    return out


def _query(phrases: list, objs: list, kind: str) -> DetectionQuery:
    boxes, labels = [], []
    for k, (_, color, shape) in enumerate(phrases):
        for o in objs:
            if (color is None or o.color == color) and (shape is None or o.shape == shape):
                boxes.append(o.box)
                labels.append(k)
    return DetectionQuery(tuple(p[0] for p in phrases), tuple(boxes), tuple(labels), kind)


def detection(world, scene) -> list:
    rng, objs = rng_for(scene, 2), scene.objects
    (shapes, _, no_shapes), (colors, _, no_colors), (pairs, _, no_pairs) = _present_absent(world, scene)
    all_shapes = [(s, None, s) for s in world.config.shapes]
    combos = [(f"{c} {s}", c, s) for c, s in list(pairs) + no_pairs[:2]]
    combos = pick_k(rng, combos, len(combos))
    pool = ([(s, None, s) for s in list(shapes) + no_shapes] + [(f"{c} object", c, None) for c in list(colors) + no_colors]
            + [(f"{c} {s}", c, s) for c, s in list(pairs) + no_pairs])
    mixed = pick_k(rng, pool, 1 + int(rng.random() * 3))
    return [_query(all_shapes, objs, "shapes"), _query(combos, objs, "combos"), _query(mixed, objs, "mixed")]


def conversation(world, scene) -> list:
    """LLaVA format: describe, count, locate (box normalised to [0, 1]), answer."""
    rng, S, n = rng_for(scene, 3), world.config.image_size, len(scene.objects)
    turns = [("<image>\n" + pick(rng, DESCRIBE), sentence(pick(rng, captions(world, scene)))),
             ("How many objects are there?", f"There {'is' if n == 1 else 'are'} {n} object{'s' * (n > 1)}.")]
    refs = referring(world, scene)
    refs = [r for r in refs if r.type == "attribute"] or refs
    if refs:
        r = pick(rng, refs)
        box = ", ".join(f"{v / S:.2f}" for v in r.box)
        turns.append((f"Where is {r.text}?", sentence(f"{r.text} is at [{box}]")))
    if qs := questions(world, scene):
        q = pick(rng, qs)
        turns.append((q.question[0].upper() + q.question[1:], q.answer))
    return [{"from": who, "value": v} for h, g in turns for who, v in (("human", h), ("gpt", g))]
