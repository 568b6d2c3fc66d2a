"""Image rendering of the procedural data: a class's shape and texture over a cluttered background."""

from __future__ import annotations

import colorsys
import math
from typing import Any

import numpy as np

from methods.data.prototypes import (
    BACKGROUND_SATURATION,
    HUE_SPREAD,
    MAX_ROTATION,
    OBJECT_SATURATION,
    RADIUS,
    VISUAL,
    Domain,
)



def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (object units, negative inside) of a unit-sized shape."""
    if shape == "plus":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == "half_disc":
        return np.maximum(np.hypot(u, v + 0.35) - 1.0, -(v + 0.35))
    if shape == "chevron":
        au = np.abs(u)
        return np.maximum(np.abs(v - 0.8 * au + 0.2) - 0.25, au - 1.0)
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.72) - 0.28
    if shape == "box":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":
        return np.maximum(-v - 0.55, 0.866 * np.abs(u) + 0.5 * v - 0.45)
    if shape == "ellipse":
        return np.hypot(u, v * 2.0) / 1.4 - 0.7
    if shape == "crescent":
        return np.maximum(np.hypot(u, v) - 1.0, 0.75 - np.hypot(u - 0.55, v))
    if shape == "clock":
        disc = np.hypot(u, v) - 1.0
        hand = np.maximum(np.abs(u) - 0.12, np.abs(v + 0.3) - 0.45)
        return np.maximum(disc, -hand)
    if shape == "figure_eight":
        return np.minimum(np.hypot(u, v + 0.45) - 0.55, np.hypot(u, v - 0.5) - 0.45)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray:
    """Texture intensity in [0, 1] over object coordinates; ``freq`` in cycles per object unit."""
    w = 2 * np.pi * freq
    if kind == "stripes_u":
        return 0.5 + 0.5 * np.sin(w * u + phase)
    if kind == "stripes_v":
        return 0.5 + 0.5 * np.sin(w * v + phase)
    if kind == "diagonal":
        return 0.5 + 0.5 * np.sin((0.7 * w) * (u + v) + phase)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(w * np.hypot(u, v) + phase)
    if kind == "checker":
        s = np.sin(0.5 * w * u + phase) * np.sin(0.5 * w * v)
        return np.clip(4.0 * s + 0.5, 0.0, 1.0)
    if kind == "dots":
        s = np.sin(0.5 * w * u + phase) * np.sin(0.5 * w * v)
        return np.clip(3.0 * (np.abs(s) - 0.5), 0.0, 1.0)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(w * u + 2.0 * np.sin(w * v) + phase)
    if kind == "shade":
        # A smooth highlight instead of a pattern.
        return np.clip(0.5 * (u + v) + 0.5, 0.0, 1.0)
    return np.zeros_like(u)


def object_radius(latent: dict[str, float]) -> float:
    """Object radius in half-sides of the image (or of a panorama's square tile)."""
    return RADIUS[0] + (RADIUS[1] - RADIUS[0]) * latent["size"]


def hsv(h: float, s: float, v: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.asarray(rgb, dtype=np.float32)


class ImageRenderer:
    """Draws one image with vectorised numpy on a fixed coordinate grid (no per-pixel loops).

    Coordinates span [-1, 1]; a shape is a signed-distance function in its own rotated,
    scaled frame, turned into anti-aliased coverage with a one-pixel ramp. Layers are composited
    back to front with the "over" operator.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        c = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.y_SS, self.x_SS = np.meshgrid(c, c, indexing="ij")
        # Separable grids: a rotated, shifted coordinate is a row term plus a column term, so
        # each costs one full-size operation.
        self.x_1S = c[None, :]
        self.y_S1 = c[:, None]
        self.pixel = 2.0 / size

    def _coverage(self, sdf_grid: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf_grid * (1.0 / self.pixel), 0.0, 1.0)

    def _frame(self, cx: Any, cy: Any, radius: Any, angle: Any, aspect: Any
               ) -> tuple[np.ndarray, np.ndarray]:
        """Object coordinates (u, v) of every pixel; arguments are scalars or (n, 1, 1) arrays.

        u = ((x - cx) cos a + (y - cy) sin a) / (r * aspect),
        v = ((y - cy) cos a - (x - cx) sin a) * aspect / r.
        """
        ca, sa = np.cos(angle), np.sin(angle)
        su, sv = 1.0 / (radius * aspect), aspect / radius
        u = (self.x_1S - cx) * (ca * su) + (self.y_S1 - cy) * (sa * su)
        v = (self.y_S1 - cy) * (ca * sv) - (self.x_1S - cx) * (sa * sv)
        return u, v

    def render(self, rng: np.random.Generator, cls: int, latent: dict[str, float],
               dom: Domain) -> np.ndarray:
        """Background, clutter behind the object, the object, pixel noise; (3, S, S) in [0, 1]."""
        img_3SS = self._background(rng, dom)
        img_3SS = self._clutter(rng, dom, img_3SS)

        q = rng.random(10).tolist()
        margin = 1.0 - 0.7 * object_radius(latent)
        cx, cy = (2 * q[0] - 1) * margin, (2 * q[1] - 1) * margin
        cover_SS, obj_3SS = self.object_layer(cls, latent, dom, q, cx, cy)
        img_3SS += cover_SS * (obj_3SS - img_3SS)

        img_3SS += (rng.random(img_3SS.shape, dtype=np.float32) - 0.5) * (dom.pixel_noise * 3.46)
        return np.clip(img_3SS, 0.0, 1.0, out=img_3SS)

    def object_layer(self, cls: int, latent: dict[str, float], dom: Domain, q: list[float],
                     cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
        """(coverage (S, S) in [0, 1], colour (3, S, S)) of one object centred at (cx, cy).

        Scale from the size latent, colour value from the brightness latent, texture frequency
        from the texture latent; ``q`` holds the instance's uniform draws (q[2:9] are read).
        """
        proto = VISUAL[cls]
        radius = object_radius(latent)
        angle = MAX_ROTATION * (2 * q[2] - 1)
        aspect = math.exp(0.3 * q[3] - 0.15)
        u, v = self._frame(cx, cy, radius, angle, aspect)
        cover_SS = self._coverage(_shape_sdf(proto.shape, u, v) * radius)
        hue = proto.hue + HUE_SPREAD * (2 * q[4] - 1) + dom.hue_shift
        value = 0.4 + 0.6 * latent["brightness"]
        saturation = OBJECT_SATURATION + (1 - OBJECT_SATURATION) * q[5]
        col = hsv(hue, saturation * dom.saturation, value)
        col2 = hsv(hue + 0.3 + 0.4 * q[6], 0.2 + 0.6 * q[7], value * 0.6)
        freq = 1.2 + 2.0 * latent["texture"]
        tex_SS = proto.texture_depth * _texture(proto.texture, u, v, freq, 2 * np.pi * q[8])
        obj_3SS = col[:, None, None] + (col2 - col)[:, None, None] * tex_SS
        return cover_SS, obj_3SS

    def _background(self, rng: np.random.Generator, dom: Domain) -> np.ndarray:
        q = rng.random(10).tolist()
        a = 2 * np.pi * q[0]
        t_SS = 0.5 + (0.5 / 1.42) * (self.x_SS * math.cos(a) + self.y_SS * math.sin(a))
        lo, hi = (0.05, 0.3) if dom.background == "dark" else (0.3, 0.9)
        c1 = hsv(q[1], BACKGROUND_SATURATION * q[2], lo + (hi - lo) * q[3])
        c2 = hsv(q[4], BACKGROUND_SATURATION * q[5], lo + (hi - lo) * q[6])
        img_3SS = c1[:, None, None] + (c2 - c1)[:, None, None] * t_SS
        if dom.background == "stripes":
            b = np.pi * q[7]
            f = 2.0 + 3.0 * q[8]
            ramp_SS = self.x_SS * math.cos(b) + self.y_SS * math.sin(b)
            img_3SS += 0.08 * np.sin((np.pi * f) * ramp_SS)
        return img_3SS

    def _clutter(self, rng: np.random.Generator, dom: Domain, img_3SS: np.ndarray) -> np.ndarray:
        """Axis-aligned boxes, bars and ellipses of random colours behind the object.

        Axis-aligned shapes keep every mask separable (a row term and a column term), which
        makes clutter cheap enough to draw several layers per image.
        """
        n = int(rng.integers(dom.clutter[0], dom.clutter[1] + 1))
        inv_px = 1.0 / self.pixel
        for r in rng.random((n, 9)).tolist():
            cx, cy = 2 * r[0] - 1, 2 * r[1] - 1
            radius = 0.08 + 0.22 * r[2]
            aspect = math.exp(2.4 * r[3] - 1.2)
            hx, hy = radius * aspect, radius / aspect
            alpha = 0.3 + 0.5 * r[4]
            if r[5] < 0.5:
                # Box: coverage is the product of two 1-D ramps.
                cov_x = np.clip((hx - np.abs(self.x_1S - cx)) * inv_px + 0.5, 0.0, 1.0)
                cov_y = np.clip((hy - np.abs(self.y_S1 - cy)) * inv_px + 0.5, 0.0, 1.0)
                cover_SS = (alpha * cov_y) * cov_x
            else:
                d_SS = np.sqrt(((self.x_1S - cx) * (1.0 / hx)) ** 2
                               + ((self.y_S1 - cy) * (1.0 / hy)) ** 2)
                ramp_SS = (1.0 - d_SS) * (min(hx, hy) * inv_px) + 0.5
                cover_SS = alpha * np.clip(ramp_SS, 0.0, 1.0)
            col = hsv(r[6], r[7] * dom.saturation, 0.2 + 0.8 * r[8])
            img_3SS += cover_SS * (col[:, None, None] - img_3SS)
        return img_3SS


