"""The built-in data set: procedurally drawn shape scenes with captions, in the COCO captions format.

Each image shows 1-3 non-overlapping shapes (circle, square, triangle, star) in one of five colours and
two sizes, on a plainly or lightly textured background. Five reference captions per image, drawn from
several templates, say what is there, how many, which colour, and where (absolute position for a
single shape, the relation between two, the composition of three), so that a captioner can only do well
by looking at the image.

The files follow the official COCO 2017 layout, so :class:`~captioning.data.coco.CocoCaptionsDataModule`
reads them like real COCO::

    <root>/annotations/captions_{train,val,test}2017.json
    <root>/{train,val,test}2017/<image_id:012d>.jpg
    <root>/shapes_version.json          # stamp: generator version + parameters; written last

Everything is derived from ``seed`` (one random stream per image), so the same parameters always give
the same pixels and the same captions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from captioning.data.coco import CocoCaptionsDataModule
from captioning.data.holdout import Holdout
from captioning.data.locking import file_lock
from captioning.io import read_json

# Bump whenever drawing or captions change, so existing sets on disk are regenerated.
GENERATOR_VERSION = 1

STAMP_FILE = "shapes_version.json"
YEAR = "2017"
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5

SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 30),
    "white": (245, 245, 245),
}
# Bounding radius as a fraction of the image side: (low, high) per size word.
SIZES = {"small": (0.085, 0.10), "large": (0.15, 0.175)}
POSITIONS = ("left", "right", "top", "bottom", "center")
NUMBERS = {2: "two", 3: "three"}
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without a slow anti-aliased renderer
NO_HOLDOUT = Holdout()


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; ``x``, ``y``, ``radius`` in pixels of the final image."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    angle: float

    def phrase(self, with_size: bool = True) -> str:
        """'a large red circle' / 'a red circle'."""
        return f"a {self.size} {self.color} {self.shape}" if with_size else f"a {self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "center": [round(self.x, 2), round(self.y, 2)],
            "radius": round(self.radius, 2),
        }


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``layout`` is the position word (1 shape), relation (2) or 'group' (3)."""

    objects: tuple[ShapeObject, ...]
    layout: str
    background: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- scenes
def _random_object(rng: np.random.Generator, size_px: int, scale: float = 1.0) -> tuple[str, str, str, float, float]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = "small" if rng.random() < 0.5 else "large"
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi)) * size_px * scale
    angle = float(rng.uniform(-12, 12))
    return shape, color, size, radius, angle


def _place_single(rng: np.random.Generator, s: int, radius: float, position: str) -> tuple[float, float]:
    """A centre inside the named region of a 3x3 grid, the shape fully in the image."""
    margin = radius + 1
    ranges = {  # (x range, y range) as fractions of the side, clipped to the margin below
        "left": ((0.0, 0.25), (0.4, 0.6)),
        "right": ((0.75, 1.0), (0.4, 0.6)),
        "top": ((0.4, 0.6), (0.0, 0.25)),
        "bottom": ((0.4, 0.6), (0.75, 1.0)),
        "center": ((0.42, 0.58), (0.42, 0.58)),
    }[position]
    coords = []
    for lo, hi in ranges:
        lo_px, hi_px = max(lo * s, margin), min(hi * s, s - margin)
        coords.append(float(rng.uniform(lo_px, hi_px)) if hi_px > lo_px else (lo_px + hi_px) / 2)
    return coords[0], coords[1]


def _apart(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    return math.hypot(a[0] - b[0], a[1] - b[1]) >= a[2] + b[2] + gap


def sample_scene(rng: np.random.Generator, image_size: int, object_scale: float = 1.0) -> Scene:
    """A random scene of 1-3 non-overlapping shapes whose layout its captions can state truthfully; the objects'
    radii are ``object_scale`` times the usual ones (a held-out scale, :mod:`captioning.data.holdout`)."""
    s = image_size
    base = int(rng.integers(45, 110))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    gap = 0.04 * s
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    while True:  # rejection sampling; a handful of tries at most in practice
        specs = [_random_object(rng, s, object_scale) for _ in range(n)]
        if n == 1:
            layout = POSITIONS[rng.integers(len(POSITIONS))]
            shape, color, size, r, angle = specs[0]
            x, y = _place_single(rng, s, r, layout)
            return Scene((ShapeObject(shape, color, size, x, y, r, angle),), layout, background)
        if n == 2:
            # First object left of / above the second, by a clear margin, roughly aligned on the other axis.
            layout = "horizontal" if rng.random() < 0.5 else "vertical"
            (_, _, _, r1, _), (_, _, _, r2, _) = specs
            a_main = rng.uniform(r1 + 1, 0.5 * s - gap / 2 - r1 * 0.3)
            b_main = rng.uniform(0.5 * s + gap / 2 + r2 * 0.3, s - r2 - 1)
            cross_mid = rng.uniform(max(r1, r2) + 1, s - max(r1, r2) - 1)
            jitter = 0.06 * s
            a_cross = float(np.clip(cross_mid + rng.uniform(-jitter, jitter), r1 + 1, s - r1 - 1))
            b_cross = float(np.clip(cross_mid + rng.uniform(-jitter, jitter), r2 + 1, s - r2 - 1))
            if layout == "horizontal":
                centres = [(a_main, a_cross), (b_main, b_cross)]
            else:
                centres = [(a_cross, a_main), (b_cross, b_main)]
            circles = [(cx, cy, sp[3]) for (cx, cy), sp in zip(centres, specs, strict=True)]
            if not _apart(circles[0], circles[1], gap):
                continue
        else:
            layout = "group"
            circles = []
            for spec in specs:
                r = spec[3]
                for _ in range(50):
                    c = (float(rng.uniform(r + 1, s - r - 1)), float(rng.uniform(r + 1, s - r - 1)), r)
                    if all(_apart(c, other, gap) for other in circles):
                        circles.append(c)
                        break
            if len(circles) < n:
                continue
            # Listed left to right in captions; keep that order unambiguous.
            xs = sorted(c[0] for c in circles)
            if min(b - a for a, b in pairwise(xs)) < 0.05 * s:
                continue
            order = np.argsort([c[0] for c in circles])
            circles = [circles[i] for i in order]
            specs = [specs[i] for i in order]
        objects = tuple(
            ShapeObject(shape, color, size, cx, cy, r, angle)
            for (shape, color, size, r, angle), (cx, cy, _) in zip(specs, circles, strict=True)
        )
        return Scene(objects, layout, background)


# ---------------------------------------------------------------------------------------------- captions
_POSITION_PHRASES = {
    "left": ["on the left"],
    "right": ["on the right"],
    "top": ["at the top"],
    "bottom": ["at the bottom"],
    "center": ["in the center", "in the middle"],
}


def _grouped(objects: tuple[ShapeObject, ...], key) -> str:
    """'two blue squares and a green triangle': objects counted by ``key``, in order of first appearance."""
    counts = Counter(key(o) for o in objects)
    parts = []
    for words, count in counts.items():
        *adjectives, shape = words
        noun = shape if count == 1 else PLURALS.get(shape, shape + "s")
        parts.append(" ".join(["a" if count == 1 else NUMBERS[count], *adjectives, noun]))
    return parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]


def caption_candidates(scene: Scene, image_size: int, rng: np.random.Generator) -> list[str]:
    """Every template's caption for ``scene`` (more than five, all true)."""
    objs = scene.objects
    if len(objs) == 1:
        (o,) = objs
        pos = _POSITION_PHRASES[scene.layout][rng.integers(len(_POSITION_PHRASES[scene.layout]))]
        return [
            f"{o.phrase()} {pos}",
            f"there is {o.phrase()} {pos}",
            f"{o.phrase(False)} {pos}",
            f"{pos} there is {o.phrase()}",
            f"a single {o.size} {o.color} {o.shape}",
            f"one {o.color} {o.shape} {pos}",
            f"the image shows {o.phrase()} {pos}",
        ]
    if len(objs) == 2:
        a, b = objs
        pair = _grouped(objs, lambda o: (o.color, o.shape))
        shapes_only = _grouped(objs, lambda o: (o.shape,))
        common = [f"there is {a.phrase()} and {b.phrase()}", f"two shapes {pair}", shapes_only]
        if scene.layout == "horizontal":
            specific = [
                f"{a.phrase()} to the left of {b.phrase()}",
                f"{b.phrase()} to the right of {a.phrase()}",
                f"{a.phrase(False)} next to {b.phrase(False)}",
                f"{a.phrase(False)} on the left and {b.phrase(False)} on the right",
            ]
        else:
            specific = [
                f"{a.phrase()} above {b.phrase()}",
                f"{b.phrase()} below {a.phrase()}",
                f"{a.phrase(False)} is above {b.phrase(False)}",
                f"{a.phrase(False)} at the top and {b.phrase(False)} at the bottom",
            ]
        return specific + common
    a, b, c = objs  # listed left to right
    by_shape = _grouped(objs, lambda o: (o.shape,))
    candidates = [
        f"{a.phrase()} {b.phrase()} and {c.phrase()}",
        f"three shapes {a.phrase(False)} {b.phrase(False)} and {c.phrase(False)}",
        _grouped(objs, lambda o: (o.color, o.shape)),
        f"there {'is' if by_shape.startswith('a ') else 'are'} {by_shape}",
        _grouped(objs, lambda o: (o.color, "shape")),
        _grouped(objs, lambda o: (o.size, "shape")),
    ]
    if a.x < 0.4 * image_size and c.x > 0.6 * image_size:  # only when 'left' and 'right' are plainly true
        candidates.append(f"{a.phrase(False)} on the left and {c.phrase(False)} on the right")
    return candidates


def scene_captions(scene: Scene, image_size: int, rng: np.random.Generator) -> list[str]:
    """Five distinct captions of ``scene``, each from a different template."""
    candidates = list(dict.fromkeys(caption_candidates(scene, image_size, rng)))  # dedupe, keep order
    picked = rng.choice(len(candidates), size=CAPTIONS_PER_IMAGE, replace=False)
    return [candidates[i] for i in picked]


# ---------------------------------------------------------------------------------------------- drawing
def _polygon(obj: ShapeObject, scale: float) -> list[tuple[float, float]]:
    cx, cy, r = obj.x * scale, obj.y * scale, obj.radius * scale
    theta = math.radians(obj.angle)
    if obj.shape == "square":
        angles = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [r * 0.95] * 4
    elif obj.shape == "triangle":  # equilateral, apex up; centroid lowered so it fills its circle evenly
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
        cy += 0.12 * r
    else:  # five-pointed star
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    return [(cx + rr * math.cos(a + theta), cy + rr * math.sin(a + theta)) for a, rr in zip(angles, radii, strict=True)]


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """RGB image of ``scene``: textured background, shapes drawn at 4x and downsampled."""
    big = image_size * SUPERSAMPLE
    canvas = np.empty((image_size, image_size, 3), dtype=np.float32)
    canvas[:] = scene.background
    if rng.random() < 0.5:  # light texture: smooth low-frequency shading plus a little grain
        ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
        gx, gy = rng.uniform(-10, 10, size=2)
        canvas += (gx * ramp[None, :] + gy * ramp[:, None])[..., None]
        canvas += rng.normal(0, 4, size=canvas.shape).astype(np.float32)
    background = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(background)
    for obj in scene.objects:
        color = COLORS[obj.color]
        if obj.shape == "circle":
            cx, cy, r = (v * SUPERSAMPLE for v in (obj.x, obj.y, obj.radius))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            draw.polygon(_polygon(obj, SUPERSAMPLE), fill=color)
    return background.resize((image_size, image_size), Image.BOX)


# ---------------------------------------------------------------------------------------------- writing
def _params(num_train: int, num_val: int, num_test: int, image_size: int, seed: int,
            holdout: Holdout = NO_HOLDOUT) -> dict[str, Any]:
    params = {"num_train": num_train, "num_val": num_val, "num_test": num_test,
              "image_size": image_size, "seed": seed}
    for name, value in params.items():
        minimum = 8 if name == "image_size" else (0 if name == "seed" else 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"Shapes data set parameter {name} must be an integer >= {minimum}, got {value!r}.")
    # the standard set's stamp is as it always was: sets on disk are not redrawn
    return {"generator_version": GENERATOR_VERSION, **params, **({"holdout": holdout.to_dict()} if holdout else {})}


def draw_scene(split: str, index: int, image_size: int, seed: int,
               holdout: Holdout = NO_HOLDOUT) -> tuple[Scene, np.random.Generator]:
    """Scene ``index`` of ``split`` and its random stream (which then draws the captions and the pixels).

    One stream per image, so a scene does not depend on the others. A training scene the holdout leaves out is
    drawn again from the same stream; evaluation scenes are drawn at the holdout's object scale. Every other
    scene is the standard set's.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scale = holdout.eval_scale if split != "train" else 1.0
    scene = sample_scene(rng, image_size, scale)
    while split == "train" and holdout.excludes(scene.objects):
        scene = sample_scene(rng, image_size, scale)
    return scene, rng


def _write_split(root: Path, split: str, count: int, first_id: int, image_size: int, seed: int,
                 progress, task, holdout: Holdout = NO_HOLDOUT) -> None:
    folder = root / f"{split}{YEAR}"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        image_id = first_id + index
        scene, rng = draw_scene(split, index, image_size, seed, holdout)
        captions = scene_captions(scene, image_size, rng)
        file_name = f"{image_id:012d}.jpg"
        render_scene(scene, image_size, rng).save(folder / file_name, quality=92)
        images.append({
            "id": image_id, "file_name": file_name, "width": image_size, "height": image_size,
            "license": 1, "scene": {"layout": scene.layout, "background": list(scene.background),
                                    "objects": [o.to_dict() for o in scene.objects]},
        })
        for caption in captions:
            annotations.append({"id": len(annotations) + first_id * CAPTIONS_PER_IMAGE, "image_id": image_id,
                                "caption": caption})
        if progress is not None:
            progress.advance(task)
    coco = {
        "info": {"description": "captioning built-in shapes data set", "version": str(GENERATOR_VERSION),
                 "year": int(YEAR), "contributor": "captioning.data.shapes",
                 **({"holdout": holdout.to_dict()} if holdout else {})},
        "licenses": [{"id": 1, "name": "generated", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"captions_{split}{YEAR}.json").write_text(json.dumps(coco))


def generate_shapes_dataset(root: str | os.PathLike, num_train: int = 4000, num_val: int = 500,
                            num_test: int = 500, image_size: int = 64, seed: int = 0,
                            progress: bool = True, holdout: Holdout = NO_HOLDOUT) -> Path:
    """Draw the data set into ``root``, replacing whatever generated set is there; returns ``root``.

    Written into a temporary sibling directory and renamed into place, with the stamp file written
    last, so an interrupted run never leaves a set that looks complete. Refuses to replace a
    directory that is not a generated shapes set, so a wrong ``root`` cannot delete real data.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stamp = _params(num_train, num_val, num_test, image_size, seed, holdout)
    root = Path(root).expanduser().absolute()
    if root.exists() and not (root / STAMP_FILE).is_file() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} exists but is not a generated shapes data set (it has no {STAMP_FILE}). Refusing to "
            "overwrite it: point the shapes data root at a new or empty directory, or delete this one."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    counts = {"train": num_train, "val": num_val, "test": num_test}
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), disable=not progress, transient=False) as bar:
            first_id = 1
            for split in SPLITS:
                task = bar.add_task(f"shapes {split}{YEAR}", total=counts[split])
                _write_split(tmp, split, counts[split], first_id, image_size, seed, bar, task, holdout)
                first_id += counts[split]
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=1))
        _swap_into_place(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _swap_into_place(tmp: Path, root: Path) -> None:
    """Move the finished ``tmp`` to ``root``; an old set at ``root`` is moved aside first, then deleted."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / root.name)
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished the same set first; keep theirs when it is what we wanted.
        if _read_stamp(root) != _read_stamp(tmp):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_stamp(root: Path) -> dict[str, Any] | None:
    stamp = read_json(root / STAMP_FILE, None)
    return stamp if isinstance(stamp, dict) else None


def ensure_shapes_dataset(root: str | os.PathLike, num_train: int = 4000, num_val: int = 500,
                          num_test: int = 500, image_size: int = 64, seed: int = 0,
                          progress: bool = True, holdout: Holdout = NO_HOLDOUT) -> Path:
    """Return ``root`` holding the shapes set for these parameters, generating it only when missing
    or when its stamp (generator version + parameters) differs."""
    wanted = _params(num_train, num_val, num_test, image_size, seed, holdout)
    root = Path(root).expanduser().absolute()
    if _read_stamp(root) == wanted:
        return root
    return generate_shapes_dataset(root, num_train, num_val, num_test, image_size, seed, progress, holdout)


# ---------------------------------------------------------------------------------------------- datamodule
class ShapesDataModule(CocoCaptionsDataModule):
    """:class:`CocoCaptionsDataModule` on the built-in shapes set, generated on first use.

    ``prepare_data`` (run by Lightning on one process per node) draws the set into ``root`` when it
    is missing or was drawn with other parameters or an older generator, then builds the vocabulary.
    ``batch_size`` is per device, as in the parent class.

    ``holdout`` draws a compositional split (:mod:`captioning.data.holdout`: ``pairs``, ``layout``, ``scale``,
    ``compositional``, a list of them or a mapping of the fields) into a folder of its own beside ``root``
    (``data/shapes-pairs``), so switching between the standard set and a held-out one redraws nothing.
    """

    ADDED_ARGUMENTS = ("holdout",)
    OPTION_DEFAULTS = {"min_word_count": 1, "num_workers": 2}

    def __init__(self, root: str = "data/shapes", num_train: int = 4000, num_val: int = 500,
                 num_test: int = 500, image_size: int = 64, seed: int = 0, holdout: Any = None,
                 **options: Any) -> None:
        # plain values before they are saved: checkpoints load with weights_only=True
        holdout = _plain(holdout)
        self.holdout = Holdout.parse(holdout, COLORS, SHAPES)
        drawn = root
        # (checkpoints from before the root was saved as given hold the drawn folder's name already)
        if self.holdout and not Path(root).name.endswith(f"-{self.holdout.tag}"):
            drawn = str(Path(root).with_name(f"{Path(root).name}-{self.holdout.tag}"))
        super().__init__(root=drawn, year=YEAR, train_split="train", val_split="val", test_split="test",
                         image_size=image_size, **options)
        self.generator_args = {"num_train": num_train, "num_val": num_val, "num_test": num_test,
                               "image_size": image_size, "seed": seed, "holdout": self.holdout}
        # this class's own arguments as given (the root without the held-out suffix, which it adds itself)
        self.hparams.update(root=root, num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                            holdout=holdout)
        _params(**self.generator_args)  # fail at construction on bad sizes, not later in prepare_data

    def prepare_data(self) -> None:
        # One process per node gets here; nodes sharing the folder take turns, or one node's new set would
        # replace the folder under the other's vocabulary file. The later ones find the work done.
        with file_lock(self.root.parent / f".{self.root.name}.lock"):
            ensure_shapes_dataset(self.root, progress=self.loader.progress, **self.generator_args)
            super().prepare_data()


def _plain(value: Any) -> Any:
    """Hydra's list and dict nodes -> plain lists and dicts."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
