"""A synthetic scene world with exact masks, built to exercise VPL's two failure modes.

Scenes are textured "stuff" backgrounds (grass, water, sand, sky, road) with 1-3 "thing" objects
from 10 classes that differ in shape *and* in colour/texture, at random size, position and
rotation, drawn in order so later objects occlude earlier ones. Masks are exact, with 255 on a
one-pixel band at every class boundary (like VOC's void band).

The two failure modes of the paper are built in on purpose:

* **attributes captions never mention**: a class's colour and texture are never in its captions,
  which only name things (and sometimes the background);
* **co-occurrence**: most classes appear on their usual background most of the time
  (``boat`` on water, ``train`` on road, ``cow`` on grass, ...; probability ``cooccurrence``),
  so context can be mistaken for the object. :func:`context_false_activation` measures it.

Everything is deterministic given a seed and fast (a few hundred microseconds per 64x64 scene).
:func:`export_voc` writes a VOC-layout folder (``JPEGImages``, ``SegmentationClass``,
``Annotations``, ``ImageSets/Segmentation``) that every ``vpl`` command reads with
``--dataset synthetic``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from vpl_plugin.data.classes import SYNTHETIC, SYNTHETIC_STUFF, ClassSpec

__all__ = [
    "SYNTHETIC",
    "Scene",
    "SceneWorld",
    "STUFF",
    "THINGS",
    "context_false_activation",
    "export_voc",
]

STUFF: Tuple[str, ...] = SYNTHETIC_STUFF


@dataclass(frozen=True)
class Thing:
    """A thing class: its shape, two colours, texture, and usual background (or None)."""

    name: str
    shape: str
    colour: Tuple[int, int, int]
    colour2: Tuple[int, int, int]
    texture: str
    usual: Optional[str]


THINGS: Tuple[Thing, ...] = (
    Thing("boat", "hull", (200, 40, 40), (250, 250, 250), "stripes", "water"),
    Thing("train", "bar", (240, 200, 30), (40, 40, 40), "checker", "road"),
    Thing("cow", "blob", (250, 250, 245), (30, 30, 30), "spots", "grass"),
    Thing("bird", "triangle", (240, 120, 20), (120, 50, 0), "solid", "sky"),
    Thing("car", "square", (30, 60, 200), (200, 220, 255), "stripes", "road"),
    Thing("sheep", "disk", (235, 225, 200), (180, 170, 150), "dots", "grass"),
    Thing("plane", "cross", (150, 150, 160), (60, 60, 200), "solid", "sky"),
    Thing("bottle", "ring", (30, 160, 60), (10, 80, 20), "solid", None),
    Thing("chair", "diamond", (130, 70, 30), (200, 140, 80), "checker", None),
    Thing("dog", "star", (170, 110, 60), (90, 50, 20), "spots", None),
)

if tuple(t.name for t in THINGS) != SYNTHETIC.names:  # the label space is declared in data.classes
    raise ImportError("vpl_plugin.data.synthetic: THINGS and data.classes.SYNTHETIC_THINGS disagree")

_TEMPLATES_1 = ("a photo of a {0}.", "a {0}.", "there is a {0}.", "a picture of a {0}.")
_TEMPLATES_2 = ("a photo of a {0} and a {1}.", "a {0} with a {1}.", "a {0} next to a {1}.")
_TEMPLATES_3 = ("a photo of a {0}, a {1} and a {2}.", "a {0}, a {1} and a {2}.")
_BG_SUFFIX = (" on the {}.", " in the {}.", " by the {}.")


@dataclass
class Scene:
    """One scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8 labels: 0 background, ``c + 1`` thing class ``c``, 255 void band.
        labels: visible thing classes (0-based), in drawing order.
        background: index into :data:`STUFF`.
        caption: a caption that names the things (never their colour or texture).
    """

    image: np.ndarray
    mask: np.ndarray
    labels: Tuple[int, ...]
    background: int
    caption: str


def _stuff_texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float32 texture tile for a background concept."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = rng.standard_normal((size, size)).astype(np.float32)
    if kind == "grass":
        base = np.array([60, 150, 50], np.float32)
        streak = np.sin(x * 1.7 + rng.uniform(0, 6)) * 12 + noise * 18
        img = base + streak[..., None] * np.array([0.4, 1.0, 0.3], np.float32)
    elif kind == "water":
        base = np.array([40, 90, 190], np.float32)
        wave = np.sin(y * 0.9 + np.sin(x * 0.3) * 2 + rng.uniform(0, 6)) * 22 + noise * 6
        img = base + wave[..., None] * np.array([0.4, 0.6, 1.0], np.float32)
    elif kind == "sand":
        base = np.array([215, 190, 130], np.float32)
        img = base + (noise * 16)[..., None] * np.array([1.0, 0.9, 0.7], np.float32)
    elif kind == "sky":
        base = np.array([150, 200, 245], np.float32)
        grad = (y / size * 40)[..., None] * np.array([-0.6, -0.4, 0.1], np.float32)
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(6, 14)
        cloud = np.clip(1.2 - np.hypot(x - cx, (y - cy) * 1.8) / r, 0, 1)[..., None]
        img = base + grad + cloud * (np.array([250, 250, 250], np.float32) - base) + (noise * 3)[..., None]
    elif kind == "road":
        base = np.array([95, 95, 100], np.float32)
        img = base + (noise * 10)[..., None]
        lane = (np.abs(y - size / 2) < 1.2) & ((x // 6) % 2 == 0)
        img[lane] = (235, 235, 235)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    return img


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    if shape == "disk":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.6) & (np.abs(u) <= (v + 1.0) * 0.6)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "star":
        phi = np.arctan2(v, u)
        return r <= 0.55 + 0.4 * np.cos(5 * phi)
    if shape == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.38)
    if shape == "hull":
        return (v >= -0.1) & (v <= 0.55) & (np.abs(u) <= 1.0 - (v - 0.55) * -0.6) | \
               ((np.abs(u) <= 0.08) & (v < -0.1) & (v >= -0.9))
    if shape == "blob":
        return (u / 1.0) ** 2 + (v / 0.65) ** 2 <= 1.0
    raise ValueError(shape)  # pragma: no cover - internal


def _texture(kind: str, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
    if kind == "solid":
        return np.zeros(u.shape, bool)
    if kind == "stripes":
        return np.sin(u * 9.0 + phase) > 0.2
    if kind == "checker":
        return ((np.floor(u * 3.5 + phase) + np.floor(v * 3.5)) % 2) == 0
    if kind == "spots":
        return (np.sin(u * 7 + phase) * np.sin(v * 7 + 1.3)) > 0.45
    if kind == "dots":
        return (np.sin(u * 12 + phase) * np.sin(v * 12)) > 0.6
    raise ValueError(kind)  # pragma: no cover - internal


class SceneWorld:
    """Deterministic generator of scenes.

    Args:
        size: image side in pixels (64).
        seed: base seed; scene ``i`` depends only on ``(seed, i)``.
        cooccurrence: probability that a scene's background is the usual one of its first thing
            (when that class has one).
        max_objects: 1..max_objects things per scene.
        background_in_caption: probability that a caption names the background.

    Example:
        >>> world = SceneWorld(seed=0)
        >>> scene = world.scene(0)
        >>> scene.image.shape, scene.mask.shape, len(scene.labels) >= 1
        ((64, 64, 3), (64, 64), True)
    """

    def __init__(self, size: int = 64, seed: int = 0, cooccurrence: float = 0.8,
                 max_objects: int = 3, background_in_caption: float = 0.5, tiles: int = 16) -> None:
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels; got {size}.")
        if not 0 <= cooccurrence <= 1:
            raise ValueError(f"cooccurrence must be in [0, 1]; got {cooccurrence}.")
        self.size = int(size)
        self.seed = int(seed)
        self.cooccurrence = float(cooccurrence)
        self.max_objects = int(max_objects)
        self.background_in_caption = float(background_in_caption)
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        big = self.size * 2
        self._tiles = [[_stuff_texture(k, rng, big) for _ in range(tiles)] for k in STUFF]
        yy, xx = np.mgrid[0:self.size, 0:self.size].astype(np.float32)
        self._yy, self._xx = yy + 0.5, xx + 0.5
        self._usual = {i: STUFF.index(t.usual) for i, t in enumerate(THINGS) if t.usual}

    @property
    def class_spec(self) -> ClassSpec:
        return SYNTHETIC

    def scene(self, index: int) -> Scene:
        """Scene number ``index`` (the same every time for the same world seed)."""
        rng = np.random.default_rng([self.seed, int(index)])
        s = self.size
        n_obj = int(rng.integers(1, self.max_objects + 1))
        classes = [int(c) for c in rng.choice(len(THINGS), size=n_obj, replace=False)]
        first = classes[0]
        if first in self._usual and rng.random() < self.cooccurrence:
            bg = self._usual[first]
        else:
            bg = int(rng.integers(len(STUFF)))
        tile = self._tiles[bg][int(rng.integers(len(self._tiles[bg])))]
        oy, ox = rng.integers(0, tile.shape[0] - s, size=2)
        image = tile[oy:oy + s, ox:ox + s].copy()
        mask = np.zeros((s, s), np.uint8)
        for c in classes:
            thing = THINGS[c]
            radius = rng.uniform(0.13, 0.3) * s
            cx, cy = rng.uniform(radius * 0.6, s - radius * 0.6, size=2)
            theta = rng.uniform(0, 2 * math.pi)
            dx, dy = (self._xx - cx) / radius, (self._yy - cy) / radius
            ct, st = math.cos(theta), math.sin(theta)
            u, v = ct * dx + st * dy, -st * dx + ct * dy
            inside = _shape_mask(thing.shape, u, v)
            pattern = _texture(thing.texture, u, v, rng.uniform(0, 6))
            col = np.where(pattern[..., None], np.array(thing.colour2, np.float32),
                           np.array(thing.colour, np.float32))
            shade = rng.uniform(0.85, 1.1)
            image[inside] = col[inside] * shade
            mask[inside] = c + 1
        noise = rng.standard_normal(image.shape).astype(np.float32) * 4
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
        visible = [c for c in classes if int((mask == c + 1).sum()) >= max(4, s * s // 400)]
        for c in classes:
            if c not in visible:
                mask[mask == c + 1] = 0  # a sliver under other objects: relabel as background
        mask = _void_band(mask)
        caption = self._caption(visible, bg, rng)
        return Scene(image, mask, tuple(visible), bg, caption)

    def _caption(self, labels: Sequence[int], bg: int, rng: np.random.Generator) -> str:
        names = [THINGS[c].name for c in labels]
        order = list(rng.permutation(len(names)))
        names = [names[i] for i in order]
        templates = {1: _TEMPLATES_1, 2: _TEMPLATES_2, 3: _TEMPLATES_3}[min(len(names), 3)]
        text = templates[int(rng.integers(len(templates)))].format(*names)
        if rng.random() < self.background_in_caption:
            text = text[:-1] + _BG_SUFFIX[int(rng.integers(len(_BG_SUFFIX)))].format(STUFF[bg])
        return text

    def __iter__(self) -> Iterator[Scene]:
        i = 0
        while True:
            yield self.scene(i)
            i += 1

    def batch(self, start: int, count: int) -> List[Scene]:
        """Scenes ``start .. start + count - 1``."""
        return [self.scene(i) for i in range(start, start + count)]


def _void_band(mask: np.ndarray) -> np.ndarray:
    """Set 255 on pixels whose 4-neighbourhood holds another label (a one-pixel void band)."""
    m = mask.astype(np.int16)
    edge = np.zeros(m.shape, bool)
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    edge[:-1, :] |= m[:-1, :] != m[1:, :]
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    out = mask.copy()
    out[edge] = 255
    return out


def export_voc(world: SceneWorld, root: Union[str, os.PathLike], splits: Dict[str, Tuple[int, int]],
               *, progress: bool = False, overwrite: bool = False) -> Path:
    """Write scenes in VOC layout so every ``vpl`` command reads them with ``--dataset synthetic``.

    Args:
        world: the generator.
        root: output folder (the ``VOC2012``-like folder).
        splits: ``{"train": (first_index, count), "val": (...)}``; ids are ``syn_<index>``.
        overwrite: rewrite existing files (default: keep them, so an export resumes).

    Returns:
        ``root``.
    """
    from vpl_plugin._imports import require
    from vpl_plugin._io import atomic_path, write_text
    from vpl_plugin.data.labels import save_label_png

    Image = require("PIL.Image")
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, (start, count) in splits.items():
        ids = []
        for i in range(start, start + count):
            image_id = f"syn_{i:07d}"
            ids.append(image_id)
            jpg = root / "JPEGImages" / f"{image_id}.jpg"
            if jpg.exists() and not overwrite:
                continue
            scene = world.scene(i)
            save_label_png(root / "SegmentationClass" / f"{image_id}.png", scene.mask)
            objects = "".join(f"<object><name>{THINGS[c].name}</name></object>" for c in scene.labels)
            write_text(root / "Annotations" / f"{image_id}.xml",
                       f"<annotation><filename>{image_id}.jpg</filename><size><width>{world.size}"
                       f"</width><height>{world.size}</height><depth>3</depth></size>{objects}"
                       f"<background>{STUFF[scene.background]}</background>"
                       f"<caption>{scene.caption}</caption></annotation>\n")
            with atomic_path(jpg) as tmp:
                Image.fromarray(scene.image).save(tmp, quality=95)
        write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
    return root


def context_false_activation(pred: np.ndarray, gt: np.ndarray, labels: Sequence[int],
                             background: int) -> Dict[int, Tuple[int, int]]:
    """Per present class with a usual background equal to this scene's: (background pixels
    predicted as the class, background pixels). Sum over scenes and divide for the rate at which
    co-occurring context is mistaken for the object.

    Args:
        pred: ``(H, W)`` predicted labels (0 bg, ``c + 1`` class ``c``).
        gt: ``(H, W)`` ground truth (255 ignored).
        labels: the scene's classes (0-based).
        background: the scene's background index into :data:`STUFF`.
    """
    out = {}
    bg_pixels = gt == 0
    for c in labels:
        if THINGS[c].usual == STUFF[background]:
            out[c] = (int((pred[bg_pixels] == c + 1).sum()), int(bg_pixels.sum()))
    return out
