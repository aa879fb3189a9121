"""Pathfinder images (Linsley et al. 2018), as used by the Long Range Arena (P29): are the two markers on the same
dashed curve?

A re-implementation of the snakes generator (drewlinsley/pathfinder `snakes2.py`, MIT; read for its mechanics, see
../shared/papers/facts_P28_P54.md), drawn at `aa` times the output resolution and averaged down:
  - a snake is a chain of `contour_length` straight paddles of `paddle_length` pixels and `thickness` (0.5 px at
    32x32 = one pixel of the 2x canvas), separated by gaps of `margin` pixels;
  - each paddle's direction is drawn among 72 headings with weight cos(min(|turn| * continuity, pi/2))^2 (the
    official continuity kernel), among those that stay inside the image and keep `clearance` pixels from every
    earlier paddle except the one just before (so snakes never touch or cross, themselves or each other);
  - two target snakes A and B, then `distractors` snakes of contour_length // 3 paddles
    (20 // (contour_length // 3) of them, the official count);
  - two disc markers (radius `marker_radius`): at A's start, and at A's end (label 1) or B's end (label 0). The
    clear space is reserved around all four target ends whatever the label, so the empty area around an end
    carries no hint.
Anti-aliasing: the official code renders at a finer scale and resizes with a Lanczos filter; here the 2x canvas is
box-averaged, which keeps the ink of distinct snakes apart. Difficulty levels follow the LRA folders:
`easy` (curv_baseline, 6 paddles), `medium` (curv_contour_length_9), `hard` (curv_contour_length_14).

`sample(rng)` returns the uint8 image, the label and the 2x binary canvas with the marker centres, so a test can
check the label against the drawn paths independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVELS = {"easy": 6, "medium": 9, "hard": 14}
HEADINGS = np.linspace(-math.pi, math.pi, 72, endpoint=False)


@dataclass
class Pathfinder:
    """Generator settings in output pixels (defaults: the official 32x32 ones, at the given contour length)."""

    size: int = 32
    contour_length: int = 6
    paddle_length: float = 2.0
    margin: float = 1.0  # gap between the paddles of one snake
    clearance: float = 1.5  # minimum distance between different snakes (and non-adjacent paddles)
    continuity: float = 1.0
    marker_radius: float = 1.5
    aa: int = 2
    max_tries: int = 50

    def __post_init__(self):
        self.S = self.size * self.aa
        self.L = self.paddle_length * self.aa
        self.gap = self.margin * self.aa
        self.clear = int(round(self.clearance * self.aa))
        self.distractor_length = max(1, self.contour_length // 3)
        self.distractors = 20 // self.distractor_length
        t = np.linspace(0.0, 1.0, int(self.L * 2) + 1)  # points every half pixel along a paddle
        self._steps = t[:, None] * self.L  # (P, 1)
        self._dirs = np.stack([np.sin(HEADINGS), np.cos(HEADINGS)], -1)  # (K, 2) as (dy, dx)
        r = int(math.ceil(self.marker_radius * self.aa))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        self._disc = np.stack([yy, xx], -1)[(yy ** 2 + xx ** 2) <= (self.marker_radius * self.aa) ** 2]

    # -- drawing primitives ------------------------------------------------------------------------------------
    def _dilate(self, pix: np.ndarray, forbidden: np.ndarray) -> None:
        """Mark every canvas pixel within `clear` (Chebyshev) of the pixels `pix` (n, 2)."""
        c = self.clear
        for y, x in pix:
            forbidden[max(0, y - c):y + c + 1, max(0, x - c):x + c + 1] = True

    def _paddles(self, starts: np.ndarray, forbidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (K, P, 2) of the paddle leaving starts[k] (K, 2) along HEADINGS[k], and whether each fits (inside
        the canvas, no forbidden pixel)."""
        pts = starts[:, None, :] + self._dirs[:, None, :] * self._steps[None]  # (K, P, 2)
        pix = np.floor(pts).astype(np.int64)
        inside = ((pix >= 0) & (pix < self.S)).all(-1).all(-1)  # (K,)
        clipped = pix.clip(0, self.S - 1)
        return pix, inside & ~forbidden[clipped[..., 0], clipped[..., 1]].any(-1)

    def _snake(self, rng: np.random.Generator, n: int, forbidden: np.ndarray, ink: np.ndarray):
        """Grow one snake of n paddles; on success draw it, mark its clearance in `forbidden` and return its
        (start, end) points; None (nothing drawn) when no try fits."""
        for _ in range(self.max_tries):
            start = rng.uniform(0, self.S, size=2)
            pix, ok = self._paddles(np.broadcast_to(start, (len(HEADINGS), 2)), forbidden)
            if not ok.any():
                continue
            k = rng.choice(np.flatnonzero(ok))
            paddles, heading, end = [pix[k]], HEADINGS[k], start + self._dirs[k] * self.L
            local = forbidden.copy()  # + this snake's paddles except the last one
            for _ in range(n - 1):
                starts = end + self.gap * self._dirs  # (K, 2): a gap along each new heading
                pix, ok = self._paddles(starts, local)
                turn = np.abs((HEADINGS - heading + math.pi) % (2 * math.pi) - math.pi)
                w = np.cos(np.minimum(turn * self.continuity, math.pi / 2)) ** 2 * ok
                if w.sum() <= 1e-9:
                    break
                j = rng.choice(len(HEADINGS), p=w / w.sum())
                self._dilate(paddles[-1], local)
                paddles.append(pix[j])
                heading, end = HEADINGS[j], starts[j] + self._dirs[j] * self.L
            else:
                for p in paddles:
                    self._dilate(p, forbidden)
                    ink[p[:, 0], p[:, 1]] = 1.0
                return start, end
        return None

    def _disc_pixels(self, centre: np.ndarray) -> np.ndarray:
        pix = np.floor(centre).astype(np.int64)[None] + self._disc
        return pix[((pix >= 0) & (pix < self.S)).all(-1)]

    # -- one image ---------------------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, label: int | None = None):
        """(image uint8 (size, size), label, canvas bool (S, S) of the drawn paddles and markers, marker centres
        (2, 2) in canvas pixels). Retries with fresh draws until every snake fits."""
        label = int(rng.integers(2)) if label is None else int(label)
        for _ in range(100):
            forbidden = np.zeros((self.S, self.S), dtype=bool)
            ink = np.zeros((self.S, self.S), dtype=np.float64)
            a = self._snake(rng, self.contour_length, forbidden, ink)
            if a is None:
                continue
            for end in a:  # reserve the clear space around both ends of A before B grows
                self._dilate(self._disc_pixels(end), forbidden)
            before_b = forbidden.copy()
            b = self._snake(rng, self.contour_length, forbidden, ink)
            if b is None:
                continue
            # B grew clear of A, but a marker disc at B's ends could still reach A: then draw again
            if any(before_b[d[:, 0], d[:, 1]].any() for d in map(self._disc_pixels, b)):
                continue
            for end in b:
                self._dilate(self._disc_pixels(end), forbidden)
            if any(self._snake(rng, self.distractor_length, forbidden, ink) is None
                   for _ in range(self.distractors)):
                continue
            markers = np.stack([a[0], a[1] if label == 1 else b[1]])
            for m in markers:
                d = self._disc_pixels(m)
                ink[d[:, 0], d[:, 1]] = 1.0
            img = ink.reshape(self.size, self.aa, self.size, self.aa).mean((1, 3))
            return np.round(255 * img).astype(np.uint8), label, ink > 0, markers
        raise RuntimeError("pathfinder: could not fit the snakes in 100 tries; lower contour_length or distractors")


def generate(n: int, level: str = "easy", size: int = 32, seed: int | list[int] = 0,
             desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, size, size) uint8 and balanced labels (n,) int64 (exactly half positive, shuffled), from
    np.random.default_rng(seed); a progress bar (titled `desc`) from 2,000 images on."""
    from tqdm import tqdm

    if level not in LEVELS:
        raise ValueError(f"pathfinder level must be one of {', '.join(LEVELS)}, got {level!r}")
    gen = Pathfinder(size=size, contour_length=LEVELS[level])
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    images = np.empty((n, size, size), dtype=np.uint8)
    for i in tqdm(range(n), desc=desc or "pathfinder", leave=False, mininterval=2, disable=n < 2000):
        images[i] = gen.sample(rng, int(labels[i]))[0]
    return images, labels.astype(np.int64)
