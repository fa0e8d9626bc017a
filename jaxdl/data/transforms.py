"""Per-example transforms: a tiny spec language and the ops behind it.

Syntax (config `data.transforms` / `data.train_transforms`), one entry per op:

    "resize(224)"                        square 224x224 (an int is square; (h, w) for others)
    "center_crop(224)"
    "random_resized_crop(224, scale=(0.08, 1.0))"
    "random_flip"                        horizontal, p=0.5
    "random_rotation(15)"                uniform in [-15, 15] degrees, zero fill
    "random_scale(scale=(0.9, 1.1))"     zoom about the centre, same output size
    "normalize(imagenet)"                | unit ([0,1], a no-op) | symmetric ([-1,1])
    "normalize(mean=(0.5,), std=(0.5,))"
    "one_hot(10)"                        label -> float32 [C]

Arguments are Python literals; a bare word (``imagenet``) is a string. An entry may also
be a ``(name, {kwargs})`` pair or a ``{"name": ..., **kwargs}`` dict. The article's 5.2.1
chain is ``["resize(224)", "normalize(imagenet)"]`` (unlike torchvision, ``resize(224)``
gives a square image so that batches stack).

Every image op sees ``example["image"]``: float32 HWC with values in [0, 1] (sources
decode to that range; `normalize` comes last). Random ops draw only from the
``np.random.Generator`` they are handed, seeded from (seed, epoch, position), so
augmentation is reproducible and resumable (see batches.py for the seeding).
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from jaxdl.errors import UserError

Example = dict[str, np.ndarray]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _per_channel(image: np.ndarray, fn) -> np.ndarray:
    """Apply a Pillow float ("F" mode) operation to each channel of a [H, W, C] array."""
    planes = [
        np.asarray(fn(Image.fromarray(np.ascontiguousarray(image[..., c]))))
        for c in range(image.shape[-1])
    ]
    return np.stack(planes, axis=-1).astype(np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int], box=None) -> np.ndarray:
    """[H, W, C] -> [h, w, C], bilinear with antialiasing (Pillow); `box` crops first."""
    if box is None and image.shape[:2] == size:
        return image
    h, w = size
    return _per_channel(image, lambda im: im.resize((w, h), Image.Resampling.BILINEAR, box=box))


@dataclasses.dataclass(frozen=True)
class Op:
    """One transform. Subclasses set `name`, `random` and implement `__call__`."""

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False

    def __call__(self, ex: Example, rng: np.random.Generator | None) -> Example:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON description (for export): {"name": ..., **arguments}."""
        args = {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }
        return {"name": self.name, **args}


@dataclasses.dataclass(frozen=True)
class Resize(Op):
    size: tuple[int, int]
    name: ClassVar[str] = "resize"

    def __call__(self, ex, rng):
        return {**ex, "image": resize_image(ex["image"], self.size)}


@dataclasses.dataclass(frozen=True)
class CenterCrop(Op):
    size: tuple[int, int]
    name: ClassVar[str] = "center_crop"

    def __call__(self, ex, rng):
        img = ex["image"]
        (h, w), (H, W) = self.size, img.shape[:2]
        if h > H or w > W:
            raise UserError(
                f"data.transforms: center_crop({h}, {w}) needs images at least that "
                f"large, found {H}x{W}. Fix: resize first or crop smaller."
            )
        top, left = (H - h) // 2, (W - w) // 2
        return {**ex, "image": img[top : top + h, left : left + w]}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(Op):
    """Inception-style crop: random area fraction `scale` and aspect `ratio`, resized."""

    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    name: ClassVar[str] = "random_resized_crop"
    random: ClassVar[bool] = True

    def __call__(self, ex, rng):
        img = ex["image"]
        H, W = img.shape[:2]
        box = (0, 0, W, H)  # fallback after 10 misses: the whole image
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            area = H * W * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                box = (left, top, left + w, top + h)
                break
        return {**ex, "image": resize_image(img, self.size, box=box)}


@dataclasses.dataclass(frozen=True)
class RandomFlip(Op):
    """Horizontal flip with probability `p`."""

    p: float = 0.5
    name: ClassVar[str] = "random_flip"
    random: ClassVar[bool] = True

    def __call__(self, ex, rng):
        if rng.uniform() < self.p:
            return {**ex, "image": np.ascontiguousarray(ex["image"][:, ::-1])}
        return ex


@dataclasses.dataclass(frozen=True)
class RandomRotation(Op):
    """Rotate by an angle uniform in [-degrees, degrees] about the centre; zero fill."""

    degrees: float
    name: ClassVar[str] = "random_rotation"
    random: ClassVar[bool] = True

    def __call__(self, ex, rng):
        angle = float(rng.uniform(-self.degrees, self.degrees))
        rotate = lambda im: im.rotate(angle, resample=Image.Resampling.BILINEAR)
        return {**ex, "image": _per_channel(ex["image"], rotate)}


@dataclasses.dataclass(frozen=True)
class RandomScale(Op):
    """Zoom about the centre by a factor uniform in `scale`; output size unchanged."""

    scale: tuple[float, float] = (0.9, 1.1)
    name: ClassVar[str] = "random_scale"
    random: ClassVar[bool] = True

    def __call__(self, ex, rng):
        img = ex["image"]
        H, W = img.shape[:2]
        inv = 1.0 / float(rng.uniform(*self.scale))
        cx, cy = W / 2, H / 2
        # Pillow's affine maps output (x, y) to input (a x + b y + c, d x + e y + f).
        coeffs = (inv, 0.0, cx - cx * inv, 0.0, inv, cy - cy * inv)
        warp = lambda im: im.transform(
            (W, H), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
        )
        return {**ex, "image": _per_channel(img, warp)}


@dataclasses.dataclass(frozen=True)
class Normalize(Op):
    """(x - mean) / std per channel; x in [0, 1] on input."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: ClassVar[str] = "normalize"

    def __call__(self, ex, rng):
        img = ex["image"]
        if len(self.mean) not in (1, img.shape[-1]):
            raise UserError(
                f"data.transforms: normalize has {len(self.mean)} channel means, the images have "
                f"{img.shape[-1]} channels. Fix: set data.channels={len(self.mean)} or give "
                f"normalize(mean=..., std=...) with {img.shape[-1]} values."
            )
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return {**ex, "image": ((img - mean) / std).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class OneHot(Op):
    """Integer label -> float32 [num_classes] (for MSE / sigmoid losses)."""

    num_classes: int
    name: ClassVar[str] = "one_hot"

    def __call__(self, ex, rng):
        return {**ex, "label": np.eye(self.num_classes, dtype=np.float32)[ex["label"]]}


_PRESETS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "unit": ((0.0,), (1.0,)),
    "symmetric": ((0.5,), (0.5,)),
}


def _make_normalize(preset: str | None = None, *, mean=None, std=None) -> Normalize:
    if preset is not None:
        if preset not in _PRESETS or mean is not None or std is not None:
            raise UserError(
                f"data.transforms: normalize expects one of {sorted(_PRESETS)} or "
                f"mean=..., std=..., found preset={preset!r} mean={mean} std={std}."
            )
        mean, std = _PRESETS[preset]
    if mean is None or std is None:
        raise UserError("data.transforms: normalize needs a preset or both mean and std.")
    mean = (float(mean),) if np.isscalar(mean) else tuple(float(m) for m in mean)
    std = (float(std),) if np.isscalar(std) else tuple(float(s) for s in std)
    return Normalize(mean, std)


_FACTORIES = {
    "resize": lambda size: Resize(_size2(size)),
    "center_crop": lambda size: CenterCrop(_size2(size)),
    "random_resized_crop": lambda size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3): RandomResizedCrop(
        _size2(size), tuple(map(float, scale)), tuple(map(float, ratio))
    ),
    "random_flip": lambda p=0.5: RandomFlip(float(p)),
    "random_rotation": lambda degrees: RandomRotation(float(degrees)),
    "random_scale": lambda scale=(0.9, 1.1): RandomScale(tuple(map(float, scale))),
    "normalize": _make_normalize,
    "one_hot": lambda num_classes: OneHot(int(num_classes)),
}


def _literal(node: ast.expr):
    # A bare word such as `imagenet` reads as the string "imagenet".
    return node.id if isinstance(node, ast.Name) else ast.literal_eval(node)


def _parse_string(spec: str) -> tuple[str, list, dict]:
    try:
        call = ast.parse(spec.strip(), mode="eval").body
        if isinstance(call, ast.Name):
            return call.id, [], {}
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            raise UserError("not a call")
        return (
            call.func.id,
            [_literal(a) for a in call.args],
            {k.arg: _literal(k.value) for k in call.keywords},
        )
    except (SyntaxError, ValueError) as err:
        raise UserError(
            f"data.transforms: cannot parse {spec!r} ({err}); expected the form "
            "'name' or 'name(arg, key=value)', e.g. 'resize(224)'."
        ) from None


def parse_transform(spec: str | Sequence | Mapping) -> Op:
    """One spec ("resize(224)", ("resize", {"size": 224}) or {"name": "resize", ...}) -> Op."""
    if isinstance(spec, Op):
        return spec
    if isinstance(spec, str):
        name, args, kwargs = _parse_string(spec)
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        name, args = kwargs.pop("name", None), []
    elif isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[1], Mapping):
        name, args, kwargs = spec[0], [], dict(spec[1])
    else:
        raise UserError(
            f"data.transforms: expected a string like 'resize(224)', a (name, "
            f"kwargs) pair or a dict with 'name', found {spec!r}."
        )
    if name not in _FACTORIES:
        raise UserError(
            f"data.transforms: unknown transform {name!r} in {spec!r}; valid: "
            f"{', '.join(sorted(_FACTORIES))}."
        )
    try:
        return _FACTORIES[name](*args, **kwargs)
    except TypeError as err:
        raise UserError(f"data.transforms: bad arguments in {spec!r}: {err}.") from None


def parse_transforms(specs: Sequence | None, *, field: str, allow_random: bool) -> list[Op]:
    """A list of specs -> ops. `field` names the config key in errors."""
    ops = [parse_transform(s) for s in (specs or [])]
    if not allow_random:
        for op in ops:
            if op.random:
                raise UserError(
                    f"{field}: {op.name!r} is random, but {field} is applied at "
                    "evaluation too. Fix: move it to data.train_transforms."
                )
    return ops


class TrainChain:
    """All train ops in order, sharing one per-example generator."""

    def __init__(self, ops: Sequence[Op]):
        self.ops = tuple(ops)

    def __call__(self, example: Example, rng: np.random.Generator) -> Example:
        for op in self.ops:
            example = op(example, rng)
        return example


class EvalChain:
    """Deterministic ops in order."""

    def __init__(self, ops: Sequence[Op]):
        assert not any(op.random for op in ops)
        self.ops = tuple(ops)

    def __call__(self, example: Example) -> Example:
        for op in self.ops:
            example = op(example, None)
        return example
