"""SynthDerm rendering: star-shaped outlines, the image and mask of a record, the record itself,
and contact sheets. Factors and texts are in :mod:`vgmedgen.platform.datasets.synthderm.factors`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vgmedgen.platform.datasets.synthderm.factors import (
    _CAPTION_TEMPLATES,
    _TAG_PIXELS,
    CLASSES,
    PIGMENT_RGB,
    SIZE_AREA_FRACTION,
    SKIN_RGB,
    SynthDermError,
    _caption,
    _check_int,
    _draw_factors,
    anatomy_text_of,
    style_text_of,
)
from vgmedgen.platform.records import decode_png, encode_png

__all__ = ["contact_sheet", "iter_synthderm", "synthderm_record"]

# Target centroid offsets from the image centre, as fractions of the side. Quadrant lesions sit at
# least _QUADRANT_MIN_OFFSET off-centre on both axes, centred ones within _CENTRE_MAX_OFFSET.
_QUADRANT_MIN_OFFSET = 0.12
_QUADRANT_MAX_OFFSET = 0.28
_CENTRE_MAX_OFFSET = 0.04
_HAIR_RGB = np.array([30.0, 22.0, 18.0], dtype=np.float32)
_RULER_RGB = np.array([34.0, 34.0, 38.0], dtype=np.float32)
# Secondary colours inside heterogeneous lesions (regression white, deep red lacunae, ...).
_SECONDARY_RGB: dict[str, tuple[float, float, float]] = {
    "darker": (0.0, 0.0, 0.0),  # placeholder: "darker" means 0.6 x the pigment colour
    "black": (40.0, 30.0, 34.0),
    "blue-grey": (104.0, 114.0, 150.0),
    "white": (236.0, 222.0, 220.0),
    "red": (176.0, 44.0, 58.0),
    "purple": (112.0, 52.0, 92.0),
    "tan": (186.0, 132.0, 100.0),
}

# ---------------------------------------------------------------------------------------------
# Geometry: star-shaped outlines r(theta)
# ---------------------------------------------------------------------------------------------

_N_THETA = 128
_DTHETA = 2 * np.pi / _N_THETA
_THETA = -np.pi + _DTHETA * np.arange(_N_THETA)
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)
_K = np.arange(2, 9)  # harmonics of border noise (k=1 would only shift the shape)
_COS_K = np.cos(_K[:, None] * _THETA[None, :])  # (K, N_THETA)
_SIN_K = np.sin(_K[:, None] * _THETA[None, :])
# Rendering looks r(theta) up in a finer periodic table (nearest sample), one gather per pixel.
_N_FINE = 1024
_FINE_POS = np.arange(_N_FINE) * (_N_THETA / _N_FINE)  # fine sample -> fractional coarse index
_FINE_I0 = _FINE_POS.astype(np.intp)
_FINE_I1 = (_FINE_I0 + 1) % _N_THETA
_FINE_W = (_FINE_POS - _FINE_I0).astype(np.float32)


def _harmonics(rng: np.random.Generator, std: float, decay: float) -> np.ndarray:
    """Low-frequency radial noise ``(N_THETA,)`` with standard deviation ``std`` (log-radius units)."""
    a, b = rng.standard_normal((2, _K.size)) / _K**decay
    # The std of sum_k a_k cos(k t) + b_k sin(k t) over a period is sqrt(sum(a^2 + b^2) / 2).
    norm = std / max(float(np.sqrt(0.5 * (a @ a + b @ b))), 1e-9)
    return (a * norm) @ _COS_K + (b * norm) @ _SIN_K


def _outline(rng: np.random.Generator, shape: str) -> np.ndarray:
    """Unit-scale radius per angle ``(N_THETA,)`` for a shape factor."""
    if shape == "round":
        return np.exp(_harmonics(rng, 0.015, 1.5))
    if shape in ("oval", "irregular"):
        ratio, phi, std = rng.uniform((0.5, 0.0, 0.13), (0.72, np.pi, 0.2))
        if shape == "irregular":
            # Asymmetric, notched blobs: a milder elongation plus strong low harmonics.
            ratio = 0.7 + (ratio - 0.5)
            noise = _harmonics(rng, std, 1.6)
        else:
            noise = _harmonics(rng, 0.02, 1.5)
        c, s = np.cos(_THETA - phi), np.sin(_THETA - phi)
        return np.exp(noise) / np.sqrt(c * c + (s / ratio) ** 2)
    # lobulated: a union of discs that all contain the origin; along direction u the boundary of
    # disc (d, r) is at u.d + sqrt(r^2 - |d|^2 + (u.d)^2), and the union's radius is the max.
    n = int(rng.integers(3, 6))
    start = rng.uniform(0, 2 * np.pi)
    jitter, dist, extra = rng.uniform((-0.3, 0.42, 0.18), (0.3, 0.6, 0.32), (n, 3)).T
    ang = start + 2 * np.pi * np.arange(n) / n + jitter
    rad = dist + extra
    dx, dy = dist * np.cos(ang), dist * np.sin(ang)
    ud = _COS[None, :] * dx[:, None] + _SIN[None, :] * dy[:, None]  # (n, N_THETA)
    exit_r = ud + np.sqrt(rad[:, None] ** 2 - dist[:, None] ** 2 + ud**2)
    return np.maximum(exit_r.max(0), 0.55)  # a central disc of radius 0.55 fills the middle


def _area_centroid(r: np.ndarray) -> tuple[float, float, float]:
    """Area and centroid (relative to the origin) of a star-shaped outline r(theta)."""
    r2 = r * r
    area = 0.5 * _DTHETA * float(r2.sum())
    r3 = r2 * r
    return area, _DTHETA / 3 * float(r3 @ _COS) / area, _DTHETA / 3 * float(r3 @ _SIN) / area


@dataclass(frozen=True)
class _Geometry:
    """Where the lesion is, in pixels (per view: the second view is rotated)."""

    r: np.ndarray  # (N_THETA,) radius per angle, px
    origin: tuple[float, float]
    r_eq: float  # radius of the disc of the main lesion's area, px
    sat: tuple[float, float, float] | None  # (x, y, radius) px


def _geometry(lrng: np.random.Generator, f: Mapping[str, str], view_turn: int, size: int) -> _Geometry:
    """Lay out the lesion: outline, scale to the area bin, satellite, centroid in the position region.

    Every draw here comes from the lesion stream in a fixed order, so both views (and every
    rendered size) share the same lesion; ``view_turn`` rotates the outline by whole angle steps.
    """
    lo, hi = SIZE_AREA_FRACTION[f["size"]]
    u_area, sat_share, sat_dir, sat_gap, ux, uy = lrng.random(6).tolist()
    area_total = (lo + u_area * (hi - lo)) * size * size
    sat_share, sat_dir, sat_gap = 0.05 + 0.05 * sat_share, 2 * sat_dir - 1, 0.3 + 0.3 * sat_gap
    unit = _outline(lrng, f["shape"])
    if view_turn:
        unit = np.roll(unit, view_turn)
    # The satellite needs a visible radius even at 32 px; its area comes out of the total.
    r_sat = max(np.sqrt(sat_share * area_total / np.pi), 0.9) if f["count"] == "satellite" else 0.0
    area_main = max(area_total - np.pi * r_sat * r_sat, 0.5 * area_total)
    a_unit, cx_unit, cy_unit = _area_centroid(unit)
    scale = float(np.sqrt(area_main / a_unit))
    r = unit * scale
    r_eq = float(np.sqrt(area_main / np.pi))
    # Direction signs of the position (x: -1 left, +1 right; y: -1 upper, +1 lower).
    pos = f["position"]
    sx = -1.0 if "left" in pos else (1.0 if "right" in pos else 0.0)
    sy = -1.0 if "upper" in pos else (1.0 if "lower" in pos else 0.0)
    # Satellite relative to the origin; towards the image centre for corner lesions so it stays in view.
    if r_sat > 0:
        psi = np.arctan2(-sy, -sx) + sat_dir * 1.2 if pos != "centre" else sat_dir * np.pi
        j = int(round((psi + np.pi) / _DTHETA)) % _N_THETA
        d = r[j] + sat_gap * r_eq + r_sat
        sat_rel = (d * np.cos(psi), d * np.sin(psi))
    else:
        sat_rel = (0.0, 0.0)
    a_sat = np.pi * r_sat * r_sat
    a_all = area_main + a_sat
    # Combined centroid relative to the origin (main outline's own centroid + satellite).
    cen_x = (area_main * cx_unit * scale + a_sat * sat_rel[0]) / a_all
    cen_y = (area_main * cy_unit * scale + a_sat * sat_rel[1]) / a_all

    def target(sign: float, u: float, along: np.ndarray, sat_c: float, cen: float) -> float:
        if sign == 0.0:
            return size * (0.5 + _CENTRE_MAX_OFFSET * (2 * u - 1))
        # Reach of the lesion beyond its centroid towards the near edge, to keep it in the image.
        reach = max(float((sign * along).max()), sign * sat_c + r_sat) - sign * cen + 0.5
        top = min(_QUADRANT_MAX_OFFSET * size, 0.5 * size - reach)
        low = _QUADRANT_MIN_OFFSET * size
        off = low + u * (top - low) if top > low else low  # too large to fit: the border clips it
        return size * 0.5 + sign * off

    tx = target(sx, ux, r * _COS, sat_rel[0], cen_x)
    ty = target(sy, uy, r * _SIN, sat_rel[1], cen_y)
    origin = (tx - cen_x, ty - cen_y)
    sat = (origin[0] + sat_rel[0], origin[1] + sat_rel[1], r_sat) if r_sat > 0 else None
    return _Geometry(r=r, origin=origin, r_eq=r_eq, sat=sat)


# ---------------------------------------------------------------------------------------------
# Rendering (images are (3, H, W) float32 while drawn: per-channel planes broadcast fast)
# ---------------------------------------------------------------------------------------------

_Q = 4  # centres are snapped to 1/_Q px so that polar coordinates come from cached tables
_TABLE_MAX_SIZE = 160  # above this, polar coordinates are computed per record (tables grow as size^2)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_NOISE_STD = 1.6  # sensor noise, grey levels


@lru_cache(maxsize=16)
def _grid(size: int) -> dict[str, Any]:
    """Per-size constants: pixel centres, radius from the image centre, upsamplers, a noise bank."""
    c = np.arange(size, dtype=np.float32) + 0.5
    margin = min(size, 64)
    # Distance from the image centre in units of the half side: 1 at the edge midpoints.
    rad = np.sqrt((c[None, :] - size / 2) ** 2 + (c[:, None] - size / 2) ** 2) / (size / 2)
    return {
        "c": c,
        "rad2": (rad * rad).astype(np.float32),
        "even_light": (1 - 0.04 * rad * rad).astype(np.float32),
        "up6": _upsampler(size, 6),
        "up12": _upsampler(size, 12),
        "up24": _upsampler(size, 24),
        # A fixed bank of sensor noise, sliced at a random offset (< margin) per record: drawing
        # 3 x H x W normals per record costs more than the rest of the rendering.
        "noise": np.random.default_rng(_TAG_PIXELS).standard_normal(
            (3, size + margin, size + margin), dtype=np.float32
        )
        * _NOISE_STD,
        "noise_margin": margin,
    }


@lru_cache(maxsize=4)
def _polar_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine angle index (int16) and distance (float32) from a centre, each (Q, Q, 2H, 2W).

    Entry ``[ky, kx, S + j, S + i]`` holds the polar coordinates of pixel offset ``(j, i)`` from a
    centre at sub-pixel phase ``(ky/Q, kx/Q)``; a record slices an (H, W) window out of it.
    """
    d = np.arange(-size, size, dtype=np.float64)[None, :] + 0.5 - np.arange(_Q)[:, None] / _Q  # (Q, 2S)
    dy, dx = d[:, None, :, None], d[None, :, None, :]
    ang = np.arctan2(dy, dx)  # (Q, Q, 2S, 2S)
    idx = (np.rint((ang + np.pi) * (_N_FINE / (2 * np.pi))).astype(np.int32) % _N_FINE).astype(np.int16)
    return idx, np.sqrt(dx * dx + dy * dy).astype(np.float32)


def _polar(size: int, x: float, y: float, want_angle: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """(H, W) fine angle index (or None) and distance of every pixel centre from the point (x, y), snapped to 1/Q px."""
    qx, qy = int(round(x * _Q)), int(round(y * _Q))
    nx, kx = divmod(qx, _Q)
    ny, ky = divmod(qy, _Q)
    if size <= _TABLE_MAX_SIZE and 0 <= nx <= size and 0 <= ny <= size:
        idx, rho = _polar_tables(size)
        rows, cols = slice(size - ny, 2 * size - ny), slice(size - nx, 2 * size - nx)
        return (idx[ky, kx, rows, cols] if want_angle else None), rho[ky, kx, rows, cols]
    c = _grid(size)["c"]
    dx = c[None, :] - np.float32(qx / _Q)
    dy = c[:, None] - np.float32(qy / _Q)
    rho = np.sqrt(dx * dx + dy * dy)
    if not want_angle:
        return None, rho
    ang = np.arctan2(dy, dx)
    return (np.rint((ang + np.pi) * (_N_FINE / (2 * np.pi))).astype(np.int32) % _N_FINE), rho


_BLAS_MAX_SIZE = 96  # above this, upsample by gathers: OpenBLAS threads there and stalls on busy cores


def _upsampler(size: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear upsampling of a (g, g) grid to (size, size), in two equivalent forms.

    Returns ``(U, U.T, i0, i1, frac)``: the (size, g) interpolation matrix with its contiguous
    transpose (``U @ G @ U.T``), and the per-pixel node indices and weights for the gather form.
    """
    pos = (np.arange(size) + 0.5) / size * (g - 1)
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, g - 2)
    frac = (pos - i0).astype(np.float32)
    u = np.zeros((size, g), dtype=np.float32)
    u[np.arange(size), i0] = 1 - frac
    u[np.arange(size), i0 + 1] = frac
    return u, np.ascontiguousarray(u.T), i0, i0 + 1, frac


def _smooth_fields(up: tuple[np.ndarray, ...], grids: np.ndarray) -> np.ndarray:
    """(k, g, g) random grids -> (k, H, W) smooth fields with unit standard deviation (approx.)."""
    u, ut, i0, i1, frac = up
    grids = grids.astype(np.float32)
    if u.shape[0] <= _BLAS_MAX_SIZE:
        f = u @ grids @ ut  # (k, H, W)
    else:
        rows = u @ grids  # (k, H, g): small
        f = rows[:, :, i0] * (1 - frac) + rows[:, :, i1] * frac  # (k, H, W)
    return f * np.float32(1.0 / 0.62)  # bilinear averaging of N(0,1) nodes leaves a std of about 0.62


def _saturate(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale the chroma of a (3, H, W) image around its luma."""
    # Written out rather than a tensordot: BLAS would thread on large images and stall on busy cores.
    gray = img[0] * _LUMA[0] + img[1] * _LUMA[1] + img[2] * _LUMA[2]  # (H, W)
    return gray + (img - gray) * np.float32(factor)


def _splat(size: int, pts: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Bilinear splat of (M, 2) points (x, y in px) with weights (M,) into an (H, W) map."""
    x = pts[:, 0] - 0.5
    y = pts[:, 1] - 0.5
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx, fy = x - x0, y - y0
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    acc = np.zeros(size * size + 1, dtype=np.float64)  # the last cell collects points off the image
    for ox, oy, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xi, yi = x0 + ox, y0 + oy
        flat = np.where((xi >= 0) & (xi < size) & (yi >= 0) & (yi < size), yi * size + xi, size * size)
        acc += np.bincount(flat, weights=w * weight, minlength=size * size + 1)
    return acc[:-1].reshape(size, size).astype(np.float32)


def _hairs(vrng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) hair coverage in [0, 0.95]: dark curved strands (quadratic Bezier curves)."""
    n = int(vrng.integers(3, 8))
    p0 = vrng.uniform(-0.1, 1.1, (n, 2)) * size
    ang, length, bend, strength = vrng.uniform((0, 0.5, -0.3, 0.7), (2 * np.pi, 1.3, 0.3, 1.0), (n, 4)).T
    length = length * size
    direction = np.stack([np.cos(ang), np.sin(ang)], 1)
    p2 = p0 + direction * length[:, None]
    normal = np.stack([-direction[:, 1], direction[:, 0]], 1)
    p1 = (p0 + p2) / 2 + normal * (bend * length)[:, None]
    m = int(2.5 * size)  # samples per hair: about 2 per pixel of its length
    t = np.linspace(0, 1, m)[None, :, None]
    pts = (1 - t) ** 2 * p0[:, None] + 2 * (1 - t) * t * p1[:, None] + t**2 * p2[:, None]  # (n, m, 2)
    w = np.broadcast_to((strength * length * 1.1 / m)[:, None], (n, m))  # ink per px of length ~ strength
    width = max(1.0, size / 72)  # about 1 px at 64 px, thicker at higher resolution
    cover = _splat(size, pts.reshape(-1, 2), w.reshape(-1))
    if width > 1.2:
        cover += _splat(size, (pts + normal[:, None, :] * (width - 1.0)).reshape(-1, 2), w.reshape(-1))
    return np.minimum(cover * 1.1, 0.95)


def _ruler(vrng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) ruler coverage: a line with ticks along one edge (a long tick every fifth)."""
    edge, spacing, inset, start = vrng.random(4).tolist()
    spacing = size / (9.0 + 4.0 * spacing)
    inset = int(round(0.04 * inset * size))
    thick = max(1, int(round(size / 64)))
    m = np.zeros((size, size), dtype=np.float32)
    short, long_ = max(2, int(round(0.05 * size))), max(3, int(round(0.1 * size)))
    m[inset + long_ : inset + long_ + thick, :] = 0.8  # the ruler's base line
    for k, x in enumerate(np.arange(start * spacing, size, spacing)):
        xi = int(x)
        m[inset + (0 if k % 5 == 0 else long_ - short) : inset + long_, xi : xi + thick] = 0.9
    return np.rot90(m, int(edge * 4))


def _bubbles(vrng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W) brightening in [0, 1]: gel bubbles as bright rings with a faintly bright inside."""
    n = int(vrng.integers(1, 5))
    cx, cy, rad = vrng.uniform((0.05, 0.05, 0.04), (0.95, 0.95, 0.12), (n, 3)).T * size
    width = max(0.5, size / 110)
    out = np.zeros((size, size), dtype=np.float32)
    for i in range(n):
        _, d = _polar(size, cx[i], cy[i], want_angle=False)
        ring = np.exp(-(((d - max(rad[i], 1.5)) * np.float32(1 / width)) ** 2))
        out = np.maximum(out, 0.75 * ring + 0.1 * (d < rad[i]))
    return out


def _glints(vrng: np.random.Generator, geo: _Geometry, size: int) -> np.ndarray:
    """(H, W) specular glare of non-polarised (contact) dermoscopy: small white spots, mostly on the lesion."""
    n = int(vrng.integers(3, 8))
    ang, dist, sigma, amp = vrng.uniform((0, 0, 0.4, 0.5), (2 * np.pi, 1.2, 0.9, 0.9), (n, 4)).T
    x0 = np.clip(geo.origin[0] + dist * geo.r_eq * np.cos(ang), 0, size)
    y0 = np.clip(geo.origin[1] + dist * geo.r_eq * np.sin(ang), 0, size)
    sigma = np.maximum(sigma * size / 64, 0.45)
    c = _grid(size)["c"]
    gx = np.exp(-((c[None, :] - x0[:, None]) ** 2) / (2 * sigma[:, None] ** 2))  # (n, W)
    gy = np.exp(-((c[None, :] - y0[:, None]) ** 2) / (2 * sigma[:, None] ** 2)) * amp[:, None]  # (n, H)
    # Separable gaussians: sum_n gy[n, i] gx[n, j] (einsum's own loop, no BLAS threads).
    return np.minimum(np.einsum("ni,nj->ij", gy.astype(np.float32), gx.astype(np.float32)), 1.0)


def _render(
    label: str,
    f: Mapping[str, str],
    geo: _Geometry,
    lrng: np.random.Generator,
    vrng: np.random.Generator,
    size: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw the image (H, W, 3) uint8 and mask (H, W) uint8 0/255; return measured attributes too.

    Every random draw is size-independent (the lesion stream for what belongs to the lesion, the
    view stream for the acquisition), so one record rendered at 32 and 128 px shows the same scene.
    """
    cls = CLASSES[label]
    g = _grid(size)
    # Lesion-level draws (shared by both views), in a fixed order.
    het, has_sec, sec_pick = lrng.random(3).tolist()
    het = cls.heterogeneity[0] + het * (cls.heterogeneity[1] - cls.heterogeneity[0])
    has_sec = has_sec < cls.secondary[0]
    sec_name = cls.secondary[1][min(int(sec_pick * len(cls.secondary[1])), len(cls.secondary[1]) - 1)]
    jit = lrng.standard_normal(7).astype(np.float32)
    pig_jitter = 1.0 + 0.05 * jit[:3]
    skin_jitter = 1.0 + 0.03 * jit[3] + 0.02 * jit[4:]
    lesion_grids = lrng.standard_normal((2, 6, 6))
    texture_grids = (lrng.standard_normal((1, 12, 12)), lrng.standard_normal((1, 24, 24)))
    # View-level draws.
    skin_grids = vrng.standard_normal((2, 6, 6))
    vignette, aperture, noise_x, noise_y = vrng.random(4).tolist()

    # --- signed distance to the lesion border (px, positive inside) ---
    ang, rho = _polar(size, *geo.origin)
    r = geo.r.astype(np.float32)
    r_fine = r[_FINE_I0] * (1 - _FINE_W) + r[_FINE_I1] * _FINE_W  # periodic linear interpolation
    sd = r_fine[ang] - rho  # (H, W)
    if geo.sat is not None:
        sd = np.maximum(
            sd, np.float32(geo.sat[2]) - _polar(size, geo.sat[0], geo.sat[1], want_angle=False)[1]
        )
    mask = sd > 0
    # Feathered alpha: about one pixel of anti-aliasing for sharp borders, a wide ramp for blurred.
    width = 1.0 if f["border"] == "sharp" else max(1.5, 0.55 * geo.r_eq)
    a = np.clip(sd * np.float32(1 / width) + np.float32(0.5), 0.0, 1.0)
    alpha = a * a * (3 - 2 * a)

    # --- skin: tone, blotchy redness, fine texture ---
    skin_fields = _smooth_fields(g["up6"], skin_grids)  # (2, H, W)
    skin = (np.asarray(SKIN_RGB[f["skin_tone"]], dtype=np.float32) * skin_jitter)[:, None, None]  # (3, 1, 1)
    img = skin * (1 + np.float32(0.03) * skin_fields[0])  # (3, H, W)
    img[1:] -= np.float32(5.0) * np.maximum(skin_fields[1], 0)  # erythema lowers green and blue

    # --- lesion colour with internal variation ---
    lf = _smooth_fields(g["up6"], lesion_grids)  # (2, H, W)
    # Clods (12 x 12 cells) and finer dots / network (24 x 24), fixed to the lesion at every size.
    texture = (
        _smooth_fields(g["up12"], texture_grids[0])[0] + 0.8 * _smooth_fields(g["up24"], texture_grids[1])[0]
    )
    depth = np.clip(sd * np.float32(1 / max(geo.r_eq, 1.0)), 0, 1)  # 0 at the border, 1 deep inside
    # Dots, clods and network are darker than the pigment around them: a one-sided texture term.
    dots = np.float32(0.03) * texture - np.float32(0.07 + 0.1 * het) * np.maximum(texture, 0)
    shade = (1 + np.float32(0.07 + 0.18 * het) * lf[0] + dots) * (
        1 - np.float32(cls.centre_darkening) * depth
    )
    pig = (np.asarray(PIGMENT_RGB[f["pigment"]], dtype=np.float32) * pig_jitter)[:, None, None]
    lesion = pig * shade  # (3, H, W)
    if has_sec:
        sec = (
            pig * 0.6
            if sec_name == "darker"
            else np.asarray(_SECONDARY_RGB[sec_name], dtype=np.float32)[:, None, None]
        )
        if cls.central_secondary:
            w2 = np.clip(depth * 2.2 - 0.9, 0, 1) * np.float32(0.5 + 0.4 * het)
        else:
            w2 = np.clip((lf[1] - 0.5) * 1.5, 0, 1) * np.float32(0.35 + 0.45 * het)
        lesion += (sec - lesion) * w2
    img += (lesion - img) * (alpha * np.float32(0.94))

    # --- artefacts on the skin surface ---
    art = f["artefact"]
    if art == "hair":
        img += (_HAIR_RGB[:, None, None] - img) * _hairs(vrng, size)
    elif art == "ruler":
        img += (_RULER_RGB[:, None, None] - img) * _ruler(vrng, size)
    elif art == "bubbles":
        img += (255.0 - img) * _bubbles(vrng, size)

    # --- device look: polarised = saturated, no glare; non-polarised = paler, specular glints ---
    if f["device"] == "polarised":
        img = (_saturate(img, 1.1) - 128.0) * np.float32(1.06) + np.float32(128.0)
    else:
        img = _saturate(img, 0.86) + np.float32(8.0)
        img += (250.0 - img) * _glints(vrng, geo, size)

    # --- illumination: even (a trace of falloff) or vignetted (falloff + dark circular aperture) ---
    if f["illumination"] == "even":
        light = g["even_light"]
    else:
        rad2 = g["rad2"]
        edge = 2 * (0.52 + 0.12 * aperture)  # aperture radius, in units of the half side
        ap = np.clip((edge * edge - rad2) * np.float32(size / (12.0 * edge)), 0, 1)  # ~3 px soft edge
        light = (1 - np.float32(0.25 + 0.2 * vignette) * rad2) * (np.float32(0.08) + np.float32(0.92) * ap)
    img *= light

    # --- sensor noise, then (H, W, 3) uint8 ---
    ox, oy = int(noise_x * g["noise_margin"]), int(noise_y * g["noise_margin"])
    img += g["noise"][:, oy : oy + size, ox : ox + size]
    img += np.float32(0.5)  # round to nearest on the cast below
    np.clip(img, 0, 255, out=img)
    image = np.empty((size, size, 3), dtype=np.uint8)
    np.copyto(image, img.transpose(1, 2, 0), casting="unsafe")
    mask_u8 = mask.view(np.uint8) * np.uint8(255)
    n_px = int(np.count_nonzero(mask))
    c = g["c"]
    extra = {
        "heterogeneity": round(het, 4),
        "secondary_colour": sec_name if has_sec else None,
        "area_fraction": round(n_px / (size * size), 5),
        "centroid_x": round(float(mask.sum(0) @ c) / n_px / size, 4) if n_px else None,
        "centroid_y": round(float(mask.sum(1) @ c) / n_px / size, 4) if n_px else None,
    }
    return image, mask_u8, extra


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def synthderm_record(seed: int, index: int, size: int) -> dict[str, Any]:
    """One SynthDerm record: every column of ``RECORD_SCHEMA`` except ``split``.

    Args:
        seed: dataset seed (>= 0); records of different seeds differ.
        index: record index (>= 0); the record depends only on (seed, index) and ``size``.
        size: image side in pixels (8 to 2048); factors do not depend on it.

    Returns:
        A dict with id, dataset, group, label, image (PNG bytes, RGB), mask (PNG bytes, 0/255),
        caption, anatomy_text, style_text, attributes (a JSON-serialisable dict with the true
        factors, class, lesion, view and measured area fraction and centroid) and source.
    """
    seed, index = _check_int("seed", seed, 0), _check_int("index", index, 0)  # numpy ints become ints
    size = _check_int("size", size, 8, 2048)
    drawn = _draw_factors(seed, index)
    label, f, lesion, view = drawn["label"], drawn["factors"], drawn["lesion"], drawn["view"]
    lrng, vrng = drawn["lesion_rng"], drawn["view_rng"]
    # The second view is turned by 10-25 degrees (whole angle steps), so it is not a pixel copy.
    turn = 0
    if view == 1:
        steps = int(vrng.integers(4, 10))
        turn = steps if vrng.random() < 0.5 else -steps
    geo = _geometry(lrng, f, turn, size)
    template = int(vrng.integers(len(_CAPTION_TEMPLATES)))
    image, mask, extra = _render(label, f, geo, lrng, vrng, size)
    attributes = {
        **f,
        "class": label,
        "lesion": lesion,
        "view": view,
        "n_views": 1 if drawn["partner"] is None else 2,
        "paired_index": drawn["partner"],
        "template": template,
        **extra,
    }
    return {
        "id": f"synthderm-{seed}-{index:06d}",
        "dataset": "synthderm",
        "group": f"synthderm-{seed}-lesion-{lesion:06d}",
        "label": label,
        "image": encode_png(image),
        "mask": encode_png(mask),
        "caption": _caption(f, template),
        "anatomy_text": anatomy_text_of(f),
        "style_text": style_text_of(f),
        "attributes": attributes,
        "source": f"synthderm://{seed}/{index}",
    }


def iter_synthderm(seed: int, start: int, stop: int, size: int) -> Iterator[dict[str, Any]]:
    """Records ``start <= index < stop`` in order (see :func:`synthderm_record`)."""
    start = _check_int("start", start, 0)
    stop = _check_int("stop", stop, start)
    for index in range(start, stop):
        yield synthderm_record(seed, index, size)


# ---------------------------------------------------------------------------------------------
# Contact sheet
# ---------------------------------------------------------------------------------------------


def contact_sheet(
    records: Sequence[Mapping[str, Any]], path: str | Path, columns: int = 8, scale: int = 1
) -> Path:
    """Write a PNG grid of the records' images with each label drawn under its tile.

    Args:
        records: record dicts (or rows) with ``image`` PNG bytes and ``label``.
        path: output PNG path (parent directories are created).
        columns: tiles per row.
        scale: nearest-neighbour upscaling of each tile (small images are easier to inspect).

    Returns:
        The written path.
    """
    from PIL import Image, ImageDraw

    columns = _check_int("columns", columns, 1)
    scale = _check_int("scale", scale, 1, 16)
    if not records:
        raise SynthDermError("contact_sheet needs at least one record")
    tiles = [decode_png(r["image"]) for r in records]
    th = max(t.shape[0] for t in tiles) * scale
    tw = max(t.shape[1] for t in tiles) * scale
    label_h, pad = 12, 2
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (rec, tile) in enumerate(zip(records, tiles)):
        x = pad + (i % columns) * (tw + pad)
        y = pad + (i // columns) * (th + label_h + pad)
        im = Image.fromarray(tile)
        if scale > 1:
            im = im.resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.NEAREST)
        sheet.paste(im, (x, y))
        draw.text((x + 1, y + th), str(rec.get("label", "")), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
