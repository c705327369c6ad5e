"""A built-in synthetic demo set: procedurally drawn colonoscopy-like frames with polyp-like blobs and masks.

It exists so that tests and the CPU demo run anywhere without patient data. It is not medical data and
teaches a model nothing about real polyps.
"""

import numpy as np
from datasets import Dataset, DatasetDict

from .data import FEATURES, png_cell, split_ids


def _polyp_blob(yy, xx, rng):
    """A lobed ellipse: returns (inside mask, normalised radius 0 at the centre and 1 at the rim)."""
    cy, cx = rng.uniform(-0.5, 0.5, size=2)
    radius = rng.uniform(0.15, 0.35)
    aspect = rng.uniform(0.7, 1.3)
    angle = np.arctan2(yy - cy, (xx - cx) * aspect)
    lobes = sum(rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    distance = np.hypot(yy - cy, (xx - cx) * aspect) / (radius * (1 + lobes))
    return distance < 1, np.clip(distance, 0, 1)


def draw_demo_pair(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One `(image uint8 HxWx3, mask uint8 HxW in {0, 255})` pair."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    mucosa = np.array([0.78, 0.42, 0.36]) + rng.normal(0, 0.04, size=3)
    # A dark lumen somewhere near the centre, circular folds around it, and a vignette at the borders.
    ly, lx = rng.uniform(-0.6, 0.6, size=2)
    lumen_distance = np.hypot(yy - ly, xx - lx)
    light = 0.35 + 0.65 * (1 - np.exp(-(lumen_distance**2) / rng.uniform(0.05, 0.2)))
    light *= 1 - 0.5 * np.clip(np.hypot(yy, xx) - 0.9, 0, 1)
    folds = 0.06 * np.sin(lumen_distance * rng.uniform(12, 20) + rng.uniform(0, 2 * np.pi))
    vessels = sum(
        0.03 * np.sin(rng.uniform(5, 15) * (np.cos(t) * xx + np.sin(t) * yy) + rng.uniform(0, 2 * np.pi))
        for t in rng.uniform(0, np.pi, size=4)
    )
    image = mucosa[None, None] * (light + folds + vessels)[..., None]

    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.choice([1, 1, 1, 2])):
        inside, radius = _polyp_blob(yy, xx, rng)
        polyp = np.array([0.85, 0.50, 0.42]) + rng.normal(0, 0.05, size=3)
        dome = 0.75 + 0.35 * (1 - radius**2)  # lit from the front: brighter at the top of the dome
        image = np.where(inside[..., None], polyp[None, None] * dome[..., None], image)
        highlight = np.exp(-((radius - 0.3) ** 2) / 0.005) * (rng.uniform() < 0.7)
        image = image + 0.4 * (highlight * inside)[..., None]
        mask |= inside
    image = image + rng.normal(0, 0.015, size=image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8) * 255


def make_demo_dataset(num_pairs: int = 200, size: int = 64, test_size: int | float = 0.1, seed: int = 0) -> DatasetDict:
    """The demo set as a train/test `DatasetDict` in the project's schema; identical for identical arguments."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_pairs):
        image, mask = draw_demo_pair(size, rng)
        rows.append(
            {"image": png_cell(image), "mask": png_cell(mask), "id": f"demo-{index:05d}", "width": size, "height": size}
        )
    by_id = {row["id"]: row for row in rows}
    splits = split_ids(sorted(by_id), test_size, seed)
    return DatasetDict(
        {split: Dataset.from_list([by_id[i] for i in ids], features=FEATURES) for split, ids in splits.items()}
    )
