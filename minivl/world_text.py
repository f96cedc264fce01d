"""Shapes World text: every task's targets, derived from the scene graph (used by minivl.world).

Captions with several phrasings (all kept as references, as COCO keeps five), questions in the
spirit of Sort-of-CLEVR and CLEVR (Santoro et al. 2017; Johnson et al. 2017), referring
expressions (RefCOCO), Grounding-DINO prompts ("circle . red square") and LLaVA conversations.

The idea to take away: a question is only asked when the scene graph gives it exactly one
answer. Every description must pick out one object, and spatial relations closer than
`world.margin` pixels are never asked, so an answer is never a matter of opinion.
"""
from __future__ import annotations

import random
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
    seq, n = list(seq), len(seq)
    for i in range(min(k, n)):  # a partial Fisher-Yates shuffle: k draws, not n
        j = i + int(rng.random() * (n - i))
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
    S = world.config.image_size
    objs = sorted(scene.objects, key=lambda o: o.center)  # left to right
    n = len(objs)
    groups = count(o.name for o in objs)  # insertion order: first seen from the left
    grouped = [article(name) if k == 1 else f"{NUMBERS[k]} {name.split()[0]} {PLURAL[name.split()[1]]}"
               for name, k in sorted(groups.items(), key=lambda kv: -kv[1])]
    where = [article(o.name) + " " + REGIONS[min(2, int(3 * o.center[1] / S))][min(2, int(3 * o.center[0] / S))]
             for o in objs]
    caps = [join_list([article(f"{o.size} {o.name}") for o in objs]),
            f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} object{'s' * (n > 1)}: "
            + join_list([article(o.name) for o in objs]),
            join_list(grouped), join_list(where)]
    return list(dict.fromkeys(caps))


@memo
def questions(world, scene) -> list:
    rng, objs, m, cs = rng_for(scene, 1), scene.objects, world.margin, centers(scene)
    half = world.config.image_size / 2
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
        if abs(cx - half) >= m:
            qs["position"].append(("is the {} on the left or right of the image?", (name,), "left" if cx < half else "right"))
        if abs(cy - half) >= m:
            qs["position"].append(("is the {} at the top or bottom of the image?", (name,), "top" if cy < half else "bottom"))
    for a, an in named:
        for b, bn in named:
            if a != b:
                dx, dy = cs[a][0] - cs[b][0], cs[a][1] - cs[b][1]
                if abs(dx) >= m:
                    qs["relation"].append(("is the {} left of the {}?", (an, bn), "yes" if dx < 0 else "no"))
                if abs(dy) >= m:
                    qs["relation"].append(("is the {} above the {}?", (an, bn), "yes" if dy < 0 else "no"))
    if len(objs) >= 3:  # with two objects, closest = furthest = the other one
        for a, an in named:
            ax, ay = cs[a]
            d = sorted((((x - ax) ** 2 + (y - ay) ** 2) ** 0.5, j) for j, (x, y) in enumerate(cs) if j != a)
            for kind, word, (near, other) in (("closest", "closest to", d[:2]), ("furthest", "furthest from", d[:-3:-1])):
                if abs(other[0] - near[0]) >= m:  # a clear winner, not a near tie
                    o = objs[near[1]]
                    qs[kind].append(("what color is the object {} the {}?", (word, an), o.color))
                    qs[kind].append(("what shape is the object {} the {}?", (word, an), o.shape))
    k = world.config.questions_per_type
    # the total count is always kept: other counts are mostly 0 or 1
    chosen = {t: c if len(c) <= k else pick_k(rng, c, k) for t, c in qs.items()}
    chosen["count"] = [("how many objects are there?", (), str(len(objs)))] + chosen["count"][:k - 1]
    return [Question(q.format(*w), a, t) for t in QUESTION_TYPES for q, w, a in chosen[t]]


@memo
def referring(world, scene) -> list:
    objs, m, cs = scene.objects, world.margin, centers(scene)
    descs = descriptions(scene)
    out = [Referring("the " + text, o.box, i, "attribute")
           for i, (o, d) in enumerate(zip(objs, descs)) for text in d.values()]
    for b, d in enumerate(descs):
        if (name := _first(d, WITH_SHAPE)) is None:
            continue
        for rel, axis, sign in RELATIONS:  # unique only if one object is clearly beyond and none is borderline
            hits, borderline = [], False
            for j, c in enumerate(cs):
                if j != b:
                    delta = sign * (c[axis] - cs[b][axis])
                    if delta >= m:
                        hits.append(j)
                    elif delta > -m:
                        borderline = True
            if len(hits) == 1 and not borderline:
                out.append(Referring(f"the object {rel} the {name}", objs[hits[0]].box, hits[0], "relation"))
    if len(objs) >= 2:
        for word, axis, sign in EXTREMES:
            score = sorted((sign * c[axis], j) for j, c in enumerate(cs))
            if score[-1][0] - score[-2][0] >= m:
                j = score[-1][1]
                out.append(Referring(f"the {word} object", objs[j].box, j, "extreme"))
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
