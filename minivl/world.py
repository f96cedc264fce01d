"""Shapes World: a procedural world of coloured shapes with exact ground truth for every task.

Every scene is drawn on the fly from a scene graph (objects with a shape, a colour, a size and
a pixel box), and every task's target is *derived* from that graph: captions, class labels,
questions and answers (in the spirit of Sort-of-CLEVR, Santoro et al. 2017, and CLEVR, Johnson
et al. 2017), referring expressions with boxes (RefCOCO, Kazemzadeh et al. 2014), detection
prompts ("circle . red square", Grounding DINO, Liu et al. 2023) and LLaVA-style conversations
(Liu et al. 2023). Some colour-shape pairs never appear in training images or text (the
compositional split of ShapeWorld, Kuhnle & Copestake 2017, and CLEVR-CoGenT).

The idea to take away: when the world is generated, every label is exact and every model can
be checked exactly, so a wrong number always means a wrong model, never noisy data.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np

from minivl import world_text as _text
from minivl.world_text import QUESTION_TYPES, DetectionQuery, Question, Referring

VERSION = "1.1.0"  # bump on ANY change that alters pixels or text (tests pin golden hashes)

# Saturated colours, far apart in RGB; every one has a channel >= 150 while the dark background
# stays <= 55, so a pixel's colour alone says whether it belongs to an object.
PALETTE = {
    "red": (230, 30, 30), "orange": (245, 140, 20), "yellow": (240, 230, 40),
    "green": (40, 190, 60), "blue": (40, 80, 235), "purple": (160, 60, 210),
    "gray": (150, 150, 150), "cyan": (40, 210, 220), "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
SPLITS = {"train": 0, "val": 1, "test": 2, "heldout": 3}
N_BACKGROUNDS = 32  # precomputed background textures (x 4 flips)
PLACEMENT_TRIES = 20  # random positions tried per object before the grid fallback
MAX_IMAGE_SIZE = 512  # the background cache is N_BACKGROUNDS * S * S int64 while it is built
MIN_OBJECT_PX = 7  # below this a circle, a diamond and a cross stop looking different
DEFAULT_HELDOUT = (("red", "triangle"), ("green", "circle"), ("blue", "cross"),
                   ("yellow", "square"), ("purple", "diamond"))


@dataclass
class WorldConfig:
    image_size: int = 64          # pixels per side (32..224 tested; larger works, slower)
    min_objects: int = 1          # objects per scene are uniform in [min_objects, max_objects]
    max_objects: int = 4
    colors: tuple = ("red", "orange", "yellow", "green", "blue", "purple", "gray")  # keys of PALETTE
    shapes: tuple = SHAPES        # subset of SHAPES
    heldout: tuple = DEFAULT_HELDOUT  # (color, shape) pairs never in train/val/test images or text
    small: float = 0.18           # side of a small object, as a fraction of image_size (>= 7 px)
    large: float = 0.30           # side of a large object (>= small + 4 px, so sizes never blur)
    texture: int = 8              # background noise amplitude in grey levels (0 = plain)
    questions_per_type: int = 3   # at most this many questions of each type per scene
    seed: int = 0                 # world seed: a different seed is a different (equally valid) world

    def __post_init__(self):
        # types first (a str is a sequence of 1-letter "colours", True is an int, NaN compares
        # False to everything), so the range checks below only ever see the types they expect
        for name in ("colors", "shapes", "heldout"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise TypeError(f"{name} must be a tuple, got {type(getattr(self, name)).__name__} "
                                f"{getattr(self, name)!r:.60}")
        self.colors, self.shapes = tuple(self.colors), tuple(self.shapes)
        for name in ("colors", "shapes"):
            for v in getattr(self, name):
                if not isinstance(v, str):
                    raise TypeError(f"{name} must hold strings, got {type(v).__name__} {v!r:.40}")
        for p in self.heldout:
            if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(v, str) for v in p):
                raise TypeError(f"heldout must hold (colour, shape) string pairs, got {p!r:.60}")
        self.heldout = tuple(tuple(p) for p in self.heldout)
        for name in ("image_size", "min_objects", "max_objects", "texture", "questions_per_type", "seed"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r:.40}")
            setattr(self, name, int(v))  # numpy ints are ints; stored as Python ints (same pixels)
        for name in ("small", "large"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a float (a fraction of image_size), got {type(v).__name__} {v!r:.40}")
        S = self.image_size
        if not 32 <= S <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an int >= 32 (smaller images cannot show shapes "
                             f"of >= {MIN_OBJECT_PX} px apart) and <= {MAX_IMAGE_SIZE} (the background "
                             f"cache alone would take gigabytes), got {S!r}")
        for c in self.colors:
            if c not in PALETTE:
                raise ValueError(f"unknown colour {c!r}; known colours: {sorted(PALETTE)}")
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; known shapes: {list(SHAPES)}")
        if len(set(self.colors)) < 2 or len(set(self.shapes)) < 2 or \
                len(set(self.colors)) != len(self.colors) or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"need >= 2 distinct colours and shapes, got {self.colors} and {self.shapes}")
        if not 0 < self.small < self.large <= 0.5:
            raise ValueError(f"need 0 < small < large <= 0.5, got small={self.small}, large={self.large}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > self.capacity:
            raise ValueError(f"max_objects={self.max_objects} does not fit a {S}x{S} canvas: at most "
                             f"{self.capacity} large objects fit without overlap; lower it or raise image_size")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.questions_per_type < 1:
            raise ValueError(f"questions_per_type must be an int >= 1, got {self.questions_per_type!r}")
        if not 0 <= self.texture <= 40:
            raise ValueError(f"texture must be in [0, 40] grey levels, got {self.texture}")
        for c, s in self.heldout:
            if c not in self.colors or s not in self.shapes:
                raise ValueError(f"held-out pair {(c, s)} uses a colour or shape not in this world")
        seen = [(c, s) for c in self.colors for s in self.shapes if (c, s) not in self.heldout]
        if {c for c, _ in seen} != set(self.colors) or {s for _, s in seen} != set(self.shapes):
            raise ValueError("every colour and shape must keep at least one training pair; "
                             f"held-out pairs {self.heldout} remove all of one")

    @property
    def gap(self) -> int:  # empty pixels between boxes, so objects never touch
        return max(1, self.image_size // 32)

    @property
    def small_px(self) -> int:  # odd sides keep circles, diamonds and crosses symmetric
        return max(MIN_OBJECT_PX, 2 * round((self.small * self.image_size - 1) / 2) + 1)

    @property
    def large_px(self) -> int:
        return max(self.small_px + 4, 2 * round((self.large * self.image_size - 1) / 2) + 1)

    @property
    def capacity(self) -> int:  # objects that always fit: cells of (large + gap) px; 16 at most
        k = (self.image_size + self.gap) // (self.large_px + self.gap)
        return min(k * k, 16)


@dataclass(frozen=True)
class Obj:
    """One object of the scene graph."""
    shape: str
    color: str
    size: str
    box: tuple  # (x1, y1, x2, y2) ints, x1/y1 inclusive, x2/y2 exclusive; tight around the pixels

    @property
    def center(self) -> tuple:  # box centre (x, y): regions and (with the box) relations use it
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def name(self) -> str:  # the class label, "red circle"
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """One sample: the image and its scene graph. Every target is derived from `objects`."""
    image: np.ndarray        # (H, W, 3) uint8
    objects: list            # list[Obj]
    split: str
    index: int
    text_seed: int           # seeds the text sampling, so text is a pure function of the scene too
    memo: dict = field(default_factory=dict, repr=False, compare=False)


def _as_int(x, name: str) -> int:
    """NumPy ints are ints (indices often come from np.arange); bools and floats are not."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r:.40}")
    return int(x)


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of `shape` in a side x side square, cropped to its tight box (pixel centres)."""
    if not isinstance(shape, str):
        raise TypeError(f"shape must be a string, one of {list(SHAPES)}, got {type(shape).__name__}")
    if not 1 <= _as_int(side, "side") <= MAX_IMAGE_SIZE:
        raise ValueError(f"side must be in [1, {MAX_IMAGE_SIZE}] pixels, got {side}")
    c = np.arange(side) + 0.5 - side / 2
    u, v, r = c[None, :], c[:, None], side / 2
    if shape == "circle":
        m = u * u + v * v <= r * r
    elif shape == "square":
        m = np.ones((side, side), bool)
    elif shape == "triangle":  # apex up: half-width grows linearly from top to bottom
        m = 2 * np.abs(u) <= v + r
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= r
    elif shape == "cross":  # arms one third of the side thick
        m = (np.abs(u) <= side / 6) | (np.abs(v) <= side / 6)
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {list(SHAPES)}")
    m = np.broadcast_to(m, (side, side))
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return np.ascontiguousarray(m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


class World:
    """Scenes and every task's targets. `scene(index, split)` is a pure function of (seed, split, index)."""

    def __init__(self, config: WorldConfig | None = None, **overrides):
        if config is None:
            config = WorldConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a WorldConfig or keyword overrides, not both")
        if not isinstance(config, WorldConfig):
            raise TypeError(f"config must be a WorldConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.version = VERSION
        self.heldout = set(cfg.heldout)
        self.combos = [(c, s) for c in cfg.colors for s in cfg.shapes]
        self.train_combos = [p for p in self.combos if p not in self.heldout]
        self.classes = [f"{c} {s}" for c, s in self.combos]
        self._class_ids = {n: i for i, n in enumerate(self.classes)}
        self.answers = (list(cfg.colors) + list(cfg.shapes) + ["yes", "no"] +
                        [str(i) for i in range(cfg.capacity + 1)] + ["left", "right", "top", "bottom"])
        self._answer_ids = {a: i for i, a in enumerate(self.answers)}
        px = {"small": cfg.small_px, "large": cfg.large_px}
        self.masks = {(s, z): shape_mask(s, px[z]) for s in cfg.shapes for z in SIZES}
        # spatial words need a clear margin (rules in minivl/world_text.py and data/README.md):
        # `margin` px for closest/furthest, a centre `region_margin` px from any region border
        self.margin = max(1, cfg.image_size // 32)
        self.region_margin = cfg.image_size / 16
        self._backgrounds = None  # built on first use

    def __repr__(self) -> str:
        return f"World(version={VERSION!r}, {self.config})"

    # ---- scenes -------------------------------------------------------------------------
    def scene(self, index: int, split: str = "train", n_objects: int | None = None) -> Scene:
        """Scene `index` of `split`: a pure function of (config.seed, split, index, n_objects).
        n_objects=None draws the count from [min_objects, max_objects]; n_objects=1 gives
        single-object scenes (classification)."""
        cfg = self.config
        self._check_split(split)
        index = _as_int(index, "index")
        if not 0 <= index < 1 << 48:
            raise ValueError(f"index must be a non-negative int below 2**48, got {index!r}")
        if n_objects is not None:
            n_objects = _as_int(n_objects, "n_objects")
            if not 1 <= n_objects <= cfg.capacity:
                raise ValueError(f"n_objects must be in [1, {cfg.capacity}] for image_size={cfg.image_size}, got {n_objects}")
        # one integer key per (seed, split, index, n_objects), spelled out: never Python's hash()
        rng = random.Random((((cfg.seed << 2 | SPLITS[split]) << 48 | int(index)) << 8) | (n_objects or 0))
        u = rng.random  # only random() draws: its stream is guaranteed across Python versions
        n = n_objects or cfg.min_objects + int(u() * (cfg.max_objects - cfg.min_objects + 1))
        pool = self.train_combos
        combos = [pool[int(u() * len(pool))] for _ in range(n)]
        if split == "heldout":  # exactly one never-seen pair per held-out scene, among seen ones
            combos[int(u() * n)] = cfg.heldout[int(u() * len(cfg.heldout))]
        sizes = [SIZES[u() < 0.5] for _ in range(n)]
        masks = [self.masks[(s, z)] for (_, s), z in zip(combos, sizes)]
        corners = self._place(u, [m.shape for m in masks])
        image = self._background(u)
        objects = []
        for (color, shape), size, m, (x, y) in zip(combos, sizes, masks, corners):
            h, w = m.shape
            image[y:y + h, x:x + w][m] = PALETTE[color]
            objects.append(Obj(shape, color, size, (x, y, x + w, y + h)))
        return Scene(image, objects, split, index, int(u() * (1 << 53)))

    def _check_split(self, split) -> None:
        if not isinstance(split, str):  # a list would fail deep inside dict lookup ("unhashable")
            raise TypeError(f"split must be a string, one of {list(SPLITS)}, got {type(split).__name__} {split!r:.40}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if split == "heldout" and not self.heldout:
            raise ValueError("this world has no held-out pairs (config.heldout is empty)")

    def _check_scene(self, scene) -> Scene:
        """Text and labels read scene.objects and the world's config; a scene of a bigger world
        would get region words from the wrong canvas, so the image size must match too."""
        if not isinstance(scene, Scene):
            raise TypeError(f"scene must be a minivl.world.Scene (from World.scene), got {type(scene).__name__}")
        S = self.config.image_size
        if getattr(scene.image, "shape", None) != (S, S, 3):
            raise ValueError(f"scene.image must be ({S}, {S}, 3) for this world, got "
                             f"{getattr(scene.image, 'shape', type(scene.image).__name__)}")
        return scene

    def _background(self, u) -> np.ndarray:
        """A dark, lightly textured background: one of N_BACKGROUNDS precomputed noise fields
        (made once per process from the seed, so drawing one is a copy), flipped 4 ways."""
        if self._backgrounds is None:
            S, t, rng = self.config.image_size, self.config.texture, np.random.default_rng([self.config.seed, 7])
            base = rng.integers(15, 46, size=(N_BACKGROUNDS, 1, 1, 3))  # dark: never an object colour
            noise = rng.integers(0, t + 1, size=(N_BACKGROUNDS, S, S, 1))
            self._backgrounds = (base + noise).astype(np.uint8)  # (K, S, S, 3)
        bg = self._backgrounds[int(u() * N_BACKGROUNDS)]
        flip = int(u() * 4)
        if flip & 1:
            bg = bg[::-1]
        if flip & 2:
            bg = bg[:, ::-1]
        return bg.copy()

    def __getstate__(self):  # DataLoader workers rebuild the backgrounds instead of receiving them
        return {**self.__dict__, "_backgrounds": None}

    def _place(self, u, dims: list) -> list:
        """Top-left corners for boxes of `dims` (h, w), >= gap pixels apart. Rejection sampling,
        with a jittered grid as a fallback that always fits (config.capacity checks it)."""
        S, gap, n = self.config.image_size, self.config.gap, len(dims)
        order = sorted(range(n), key=lambda i: -dims[i][0] * dims[i][1])  # big ones first
        placed, corners = [], [None] * n
        for i in order:
            h, w = dims[i]
            for _ in range(PLACEMENT_TRIES):
                x, y = int(u() * (S - w + 1)), int(u() * (S - h + 1))
                if all(x >= x2 + gap or x1 >= x + w + gap or y >= y2 + gap or y1 >= y + h + gap
                       for x1, y1, x2, y2 in placed):
                    placed.append((x, y, x + w, y + h))
                    corners[i] = (x, y)
                    break
            else:
                return self._grid_place(u, dims)
        return corners

    def _grid_place(self, u, dims: list) -> list:
        L, gap, S = self.config.large_px, self.config.gap, self.config.image_size
        k = (S + gap) // (L + gap)
        offset = (S - (k * L + (k - 1) * gap)) // 2
        cells = sorted(range(k * k), key=lambda _: u())[:len(dims)]  # distinct random cells
        return [(offset + (c % k) * (L + gap) + int(u() * (L - w + 1)),
                 offset + (c // k) * (L + gap) + int(u() * (L - h + 1)))
                for c, (h, w) in zip(cells, dims)]

    # ---- labels -------------------------------------------------------------------------
    def class_index(self, scene: Scene) -> int:
        self._check_scene(scene)
        if len(scene.objects) != 1:
            raise ValueError(f"class labels are for single-object scenes (n_objects=1), got {len(scene.objects)} objects")
        return self._class_ids[scene.objects[0].name]

    def answer_index(self, answer: str) -> int:
        if not isinstance(answer, str):
            raise TypeError(f"answer must be a string, got {type(answer).__name__} {answer!r:.40}")
        if answer not in self._answer_ids:
            raise ValueError(f"{answer!r} is not in the answer vocabulary ({len(self.answers)} answers)")
        return self._answer_ids[answer]

    # ---- text (see minivl/world_text.py) -------------------------------------------------
    def captions(self, scene: Scene) -> list:
        """All valid captions (several phrasings, kept together as BLEU references)."""
        return _text.captions(self, self._check_scene(scene))

    def questions(self, scene: Scene) -> list:
        """Question(question, answer, type) with exactly one correct answer, <= questions_per_type per type."""
        return _text.questions(self, self._check_scene(scene))

    def referring(self, scene: Scene) -> list:
        """Referring(text, box, index, type): phrases that pick out exactly one object."""
        return _text.referring(self, self._check_scene(scene))

    def detection(self, scene: Scene) -> list:
        """DetectionQuery(phrases, boxes, labels, type): prompts with every matching box."""
        return _text.detection(self, self._check_scene(scene))

    def conversation(self, scene: Scene) -> list:
        """LLaVA turns [{"from": "human"|"gpt", "value": ...}]: describe, count, locate, answer."""
        return _text.conversation(self, self._check_scene(scene))

    def all_text(self, scene: Scene) -> dict:
        """Every task's targets for one scene."""
        out = {"captions": self.captions(scene), "questions": self.questions(scene),
               "referring": self.referring(scene), "detection": self.detection(scene),
               "conversation": self.conversation(scene)}
        if len(scene.objects) == 1:
            out["class"] = scene.objects[0].name
        return out

    def texts(self, scene: Scene) -> list:
        """All strings a learner could read about the scene (tokenizer corpora, leak checks)."""
        t = self.all_text(scene)
        return (t["captions"] + [s for q in t["questions"] for s in (q.question, q.answer)] +
                [r.text for r in t["referring"]] + [d.query for d in t["detection"]] +
                [turn["value"] for turn in t["conversation"]] + ([t["class"]] if "class" in t else []))

    def fingerprint(self, split: str = "train", n: int = 8) -> str:
        """sha256 of the pixels and all text of scenes 0..n-1 of `split` (golden-hash tests)."""
        self._check_split(split)
        n = _as_int(n, "n")
        if n < 1:
            raise ValueError(f"n must be >= 1 scenes, got {n}")
        h = hashlib.sha256(VERSION.encode())
        for i in range(n):
            s = self.scene(i, split)
            h.update(s.image.tobytes())
            h.update(repr(sorted(self.all_text(s).items())).encode())
        return h.hexdigest()


def region_attributes(world: "World") -> dict:
    """What region supervision asks of each patch: {attribute: its classes} (each + "none" in a head);
    the `attributes` of `patch_labels` (the VQA and MLLM families' region losses)."""
    return {"color": world.config.colors, "shape": world.config.shapes, "size": SIZES}


def patch_labels(objects, image_size: int, grid: int, attributes: dict, min_cover: float = 0.3) -> np.ndarray:
    """Region targets from a scene graph: (grid*grid, K) int64, per patch (row-major) and attribute, the
    class index of the object whose box covers most of the patch, len(classes) ("none") where no box
    touches it, -100 (ignored) where boxes cover less than `min_cover` of it.

    objects: Shapes World `Obj`s (box = (x1, y1, x2, y2) pixels, x2/y2 exclusive); attributes: {name:
    classes}, e.g. {"color": world.config.colors, "shape": world.config.shapes, "size": SIZES}."""
    if image_size % grid:
        raise ValueError(f"the {grid}-patch grid must divide the image side {image_size}")
    step = image_size // grid
    edges = np.arange(grid + 1) * step
    cover = np.zeros((len(objects), grid, grid))  # (O, gh, gw) share of each patch inside each box
    for i, o in enumerate(objects):
        x1, y1, x2, y2 = o.box
        ox = np.clip(np.minimum(edges[1:], x2) - np.maximum(edges[:-1], x1), 0, None)  # (gw,)
        oy = np.clip(np.minimum(edges[1:], y2) - np.maximum(edges[:-1], y1), 0, None)  # (gh,)
        cover[i] = oy[:, None] * ox[None, :] / step ** 2
    out = np.empty((grid * grid, len(attributes)), dtype=np.int64)
    best = cover.argmax(0).reshape(-1) if len(objects) else np.zeros(grid * grid, dtype=int)
    most = cover.max(0).reshape(-1) if len(objects) else np.zeros(grid * grid)
    for k, (name, classes) in enumerate(attributes.items()):
        classes = list(classes)
        ids = np.array([classes.index(getattr(o, name)) for o in objects] or [0])
        out[:, k] = np.where(most >= min_cover, ids[best], np.where(most > 0, -100, len(classes)))
    return out


__all__ = ["VERSION", "PALETTE", "SHAPES", "SPLITS", "QUESTION_TYPES", "WorldConfig", "World",
           "Scene", "Obj", "Question", "Referring", "DetectionQuery", "shape_mask", "region_attributes",
           "patch_labels"]
