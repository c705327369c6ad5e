"""New masks from real ones, and the statistics that compare sets of masks.

`MaskAugmenter` makes masks that no training pair has: a real polyp deformed elastically, rotated, mirrored,
scaled to a polyp area drawn from the real masks and moved to where a real polyp was; sometimes two real polyps
together. Every mask is seeded by its index, binary, and says which real masks it came from.
`mask_statistics` measures polyp area fraction and connected components per mask, and
`plot_mask_statistics` draws them as histograms, generated against real.
"""

import inspect
import io
import itertools
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .pipelines.pipeline_polyp_ddpm import check_positive_int, prepare_masks

# Real masks are binarized and resized in chunks of this many, to bound memory for large sets.
CHUNK = 64
# Smooth random displacement of the elastic deformation: a sum of this many plane waves, each with a spatial
# frequency between these bounds, in waves per polyp radius.
ELASTIC_WAVES = 4
ELASTIC_FREQUENCY = (0.25, 0.75)
# A new mask whose area is further than this factor from the area drawn for it (a polyp pushed mostly out of
# the frame) is drawn again, up to MAX_ATTEMPTS times.
AREA_TOLERANCE = 1.5
MAX_ATTEMPTS = 20
# Component counts at or above this one share the last bar of the histogram.
COMPONENTS_CAP = 5
# What a run records about the augmenter (with the real masks and the seed, they decide every mask).
AUGMENT_METHOD = "elastic-affine-compose"
AUGMENT_PARAMETERS = ("elastic_strength", "max_rotation", "compose_probability", "area_jitter")


def count_components(mask: np.ndarray) -> int:
    """The number of 8-connected polyp regions of one binary `(H, W)` mask (runs of each row, joined by union-find)."""
    mask = np.asarray(mask, dtype=bool)
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    start_rows, starts = (indices.tolist() for indices in np.nonzero(edges == 1))
    ends = np.nonzero(edges == -1)[1].tolist()  # the same rows, in the same order: every run starts and ends
    parent = list(range(len(starts)))

    def root(run: int) -> int:
        while parent[run] != run:
            parent[run] = parent[parent[run]]
            run = parent[run]
        return run

    previous, current, row = [], [], -1
    for run, (y, start, end) in enumerate(zip(start_rows, starts, ends)):
        if y != row:
            previous, current = (current if y == row + 1 else []), []
            row = y
        for other in previous:  # runs of the row above touch when they overlap or meet at a corner
            if starts[other] <= end and start <= ends[other]:
                parent[root(other)] = root(run)
        current.append(run)
    return len({root(run) for run in range(len(starts))})


def _as_binary_arrays(masks) -> list[np.ndarray]:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray):
        masks = masks.reshape(-1, *masks.shape[-2:]) if masks.ndim > 2 else masks[None]
    return [np.asarray(mask) > (127 if np.asarray(mask).dtype == np.uint8 else 0.5) for mask in masks]


def mask_statistics(masks) -> dict[str, np.ndarray]:
    """
    Per-mask statistics of binary masks: `area_fraction` (polyp pixels / all pixels) and `components`
    (8-connected polyp regions).

    Args:
        masks: binary masks as `(H, W)` arrays (bool, 0/1, or uint8 0/255, as mode "L" images read with
            `np.asarray`), a list of them, or an array or tensor `(N, H, W)` / `(N, 1, H, W)`.
    """
    arrays = _as_binary_arrays(masks)
    return {
        "area_fraction": np.array([mask.mean() for mask in arrays], dtype=np.float64),
        "components": np.array([count_components(mask) for mask in arrays], dtype=np.int64),
    }


def summarize_statistics(statistics: dict[str, np.ndarray]) -> dict:
    """`mask_statistics` as JSON-ready numbers: count, area fraction mean/std/quantiles, share per component count."""
    area, components = statistics["area_fraction"], statistics["components"]
    quantiles = dict(zip(("p05", "p25", "median", "p75", "p95"), np.quantile(area, [0.05, 0.25, 0.5, 0.75, 0.95])))
    counts = np.minimum(components, COMPONENTS_CAP)
    shares = {
        (f"{value}+" if value == COMPONENTS_CAP else str(value)): round(float((counts == value).mean()), 4)
        for value in range(COMPONENTS_CAP + 1)
        if (counts == value).any()
    }
    return {
        "count": len(area),
        "area_fraction": {
            "mean": float(area.mean()),
            "std": float(area.std()),
            **{k: float(v) for k, v in quantiles.items()},
        },
        "components": shares,
    }


def plot_mask_statistics(
    real: dict[str, np.ndarray],
    generated: dict[str, np.ndarray],
    path: str | os.PathLike | None = None,
    labels: tuple[str, str] = ("real training masks", "generated masks"),
) -> bytes:
    """
    Draws two histograms, polyp area fraction and connected components per mask, of `generated` against `real`
    (both from `mask_statistics`), as PNG bytes; also written to `path` when given. Needs matplotlib (the
    `[eval]` extra).
    """
    try:
        from matplotlib.figure import Figure  # an optional extra; Figure needs no display or pyplot state
    except ModuleNotFoundError as error:
        raise ImportError(
            f"the mask statistics plot needs matplotlib ({error}): pip install 'polyp-diffusers[eval]'."
        ) from error
    figure = Figure(figsize=(10, 4), layout="constrained")
    area_axes, component_axes = figure.subplots(1, 2)
    top = max(real["area_fraction"].max(), generated["area_fraction"].max(), 1e-3)
    bins = np.linspace(0, top, 26)
    for statistics, label, colour in ((real, labels[0], "tab:blue"), (generated, labels[1], "tab:orange")):
        count = len(statistics["area_fraction"])
        area_axes.hist(
            statistics["area_fraction"], bins=bins, density=True, alpha=0.5, color=colour, label=f"{label} ({count})"
        )
    area_axes.set(xlabel="polyp area fraction per mask", ylabel="density", title="Polyp size")
    area_axes.legend()
    values = np.arange(1, COMPONENTS_CAP + 1)
    for offset, (statistics, label, colour) in enumerate(
        ((real, labels[0], "tab:blue"), (generated, labels[1], "tab:orange"))
    ):
        counts = np.minimum(statistics["components"], COMPONENTS_CAP)
        shares = [(counts == value).mean() for value in values]
        component_axes.bar(values + (offset - 0.5) * 0.4, shares, width=0.4, color=colour, label=label)
    component_axes.set_xticks(values, [str(v) if v < COMPONENTS_CAP else f"{v}+" for v in values])
    component_axes.set(xlabel="connected polyp regions per mask", ylabel="share of masks", title="Polyps per mask")
    component_axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    png = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(png)
    return png


class MaskAugmenter:
    """
    New binary masks from real ones, each one a deterministic function of `(seed, index)`.

    Mask `index`: one real polyp (or two, with probability `compose_probability`) is deformed by a smooth random
    displacement of up to about `elastic_strength` times its radius, rotated by up to `max_rotation` degrees,
    mirrored with probability 1/2, scaled so that the polyp area fraction is that of a randomly drawn real mask
    (times `exp(N(0, area_jitter))`), and centred where a randomly drawn real polyp was centred. Two polyps share
    the drawn area and are joined. The mask is resampled bilinearly and thresholded at 1/2, so it is binary with
    smooth edges. A draw whose polyp falls mostly outside the frame, or whose area leaves the real range, is
    drawn again.

    Args:
        masks: the real masks, any iterable of what `prepare_masks` takes (PIL images, arrays), read a chunk at a
            time; empty masks are left out.
        size: `(height, width)` or side of the new masks (and of the real ones, resized with nearest-neighbour).
        seed: seeds every mask together with its index.
        ids: names of the real masks, for `source_id` (default: their indices).
        elastic_strength: displacement amplitude, in polyp radii.
        max_rotation: rotation drawn uniformly from `[-max_rotation, max_rotation]` degrees.
        compose_probability: chance that a mask joins two real polyps. Default (None): the share of real masks
            that have more than one connected region; the sources are then single-region masks, so the new set
            has about as many multi-polyp masks as the real one.
        area_jitter: spread of the drawn area around the real area it copies (log scale).
    """

    def __init__(
        self,
        masks,
        size: int | tuple[int, int],
        seed: int = 0,
        ids: list[str] | None = None,
        elastic_strength: float = 0.15,
        max_rotation: float = 180.0,
        compose_probability: float | None = None,
        area_jitter: float = 0.15,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        for side in self.size:
            check_positive_int(side, "size")
        chunks, remaining = [], iter(masks)
        while chunk := list(itertools.islice(remaining, CHUNK)):  # decoded a chunk at a time: bounded memory
            chunks.append(prepare_masks(chunk, self.size).bool())
        if not chunks:
            raise ValueError("masks is empty; new masks are made from real ones, so at least one is needed.")
        self.masks = torch.cat(chunks)
        self.ids = list(ids) if ids is not None else [str(i) for i in range(len(self.masks))]
        if len(self.ids) != len(self.masks):
            raise ValueError(f"ids has {len(self.ids)} names for {len(self.masks)} masks.")
        self.statistics = mask_statistics(self.masks[:, 0])
        polyp = np.flatnonzero(self.statistics["area_fraction"] > 0)
        if len(polyp) == 0:
            raise ValueError("every mask is empty; new masks are made from real polyps.")
        area = self.statistics["area_fraction"]
        self.area_range = (float(area[polyp].min()), float(area[polyp].max()))
        self.centroids = self._centroids()
        single = polyp[self.statistics["components"][polyp] == 1]
        self.polyp_indices = polyp
        self.source_indices = single if len(single) > 0 else polyp
        if compose_probability is None:
            compose_probability = float((self.statistics["components"][polyp] > 1).mean()) if len(single) else 0.0
        if not 0 <= compose_probability <= 1 or not (elastic_strength >= 0 and area_jitter >= 0 and max_rotation >= 0):
            raise ValueError(
                "need 0 <= compose_probability <= 1 and elastic_strength, area_jitter, max_rotation >= 0; got "
                f"{compose_probability}, {elastic_strength}, {area_jitter} and {max_rotation}."
            )
        self.seed = seed
        self.elastic_strength = elastic_strength
        self.max_rotation = max_rotation
        self.compose_probability = compose_probability
        self.area_jitter = area_jitter

    @property
    def config(self) -> dict:
        """The parameters that decide the masks (with the real masks and the seed); `compose_probability` resolved."""
        return {"method": AUGMENT_METHOD} | {name: getattr(self, name) for name in AUGMENT_PARAMETERS}

    @classmethod
    def default_config(cls) -> dict:
        """The parameters of an augmenter built with the defaults, before it sees the real masks."""
        parameters = inspect.signature(cls).parameters
        return {"method": AUGMENT_METHOD} | {name: parameters[name].default for name in AUGMENT_PARAMETERS}

    def _centroids(self) -> np.ndarray:
        """`(N, 2)` polyp centroids `(x, y)` in `affine_grid` coordinates, -1 to 1 across the frame."""
        height, width = self.size
        ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
        xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
        weights = self.masks[:, 0].float()
        total = weights.sum(dim=(1, 2)).clamp(min=1)
        return torch.stack([(weights.sum(1) * xs).sum(1) / total, (weights.sum(2) * ys).sum(1) / total], 1).numpy()

    def source_id(self, sources: list[int]) -> str:
        """The `source_id` of a new mask: the names of the real masks it came from, joined by `+`."""
        return "+".join(self.ids[source] for source in sources)

    def __call__(self, index: int) -> tuple[np.ndarray, list[int]]:
        """New mask `index`: `(mask, sources)`, a uint8 `(H, W)` array of 0 and 255 and the real masks it used."""
        rng = np.random.default_rng([self.seed % 2**64, index])
        for _ in range(MAX_ATTEMPTS):
            compose = len(self.source_indices) > 1 and rng.random() < self.compose_probability
            sources = rng.choice(self.source_indices, size=2 if compose else 1, replace=False).tolist()
            area = self.statistics["area_fraction"][rng.choice(self.polyp_indices)]
            area *= math.exp(rng.normal(0, self.area_jitter))
            share = rng.uniform(0.35, 0.65) if compose else 1.0
            mask = torch.zeros(self.size, dtype=torch.bool)
            for source, part in zip(sources, (share, 1 - share)):
                mask |= self._place(source, area * part, self.centroids[rng.choice(self.polyp_indices)], rng)
            made = mask.float().mean().item()
            low, high = self.area_range
            if made > 0 and low <= made <= high and abs(math.log(made / area)) <= math.log(AREA_TOLERANCE):
                return mask.numpy().astype(np.uint8) * 255, sources
        # Practically unreachable: a real polyp itself, unchanged, is still a valid mask.
        return self.masks[sources[0], 0].numpy().astype(np.uint8) * 255, sources[:1]

    def _place(self, source: int, area: float, centre: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Real mask `source` deformed, rotated, mirrored and scaled to polyp area fraction `area` around `centre`."""
        source_area = self.statistics["area_fraction"][source]
        scale = math.sqrt(area / source_area)  # output length per input length
        angle = math.radians(rng.uniform(-self.max_rotation, self.max_rotation))
        mirror = -1.0 if rng.random() < 0.5 else 1.0
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        # Output (x, y) -> input: rotate and scale about the drawn centre, then land on the source's centroid.
        linear = np.array([[cos * mirror, sin], [-sin * mirror, cos]])
        offset = self.centroids[source] - linear @ centre
        theta = torch.tensor(np.concatenate([linear, offset[:, None]], axis=1), dtype=torch.float32)[None]
        height, width = self.size
        grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)[0]
        # Elastic part: a smooth random displacement (plane waves over the polyp) of the input coordinates.
        radius = math.sqrt(4 * source_area / math.pi)  # in grid units: the frame spans 2 x 2
        local = (grid - torch.tensor(self.centroids[source], dtype=torch.float32)) / radius
        displacement = torch.zeros_like(grid)
        for _ in range(ELASTIC_WAVES):
            direction = rng.uniform(0, 2 * math.pi)
            frequency = 2 * math.pi * rng.uniform(*ELASTIC_FREQUENCY)
            wave = torch.tensor([math.cos(direction), math.sin(direction)], dtype=torch.float32) * frequency
            amplitude = torch.tensor(rng.normal(0, 1, size=2), dtype=torch.float32)
            displacement += amplitude * torch.sin(local @ wave + rng.uniform(0, 2 * math.pi))[..., None]
        grid = grid + displacement * (self.elastic_strength * radius / math.sqrt(ELASTIC_WAVES))
        warped = F.grid_sample(self.masks[source][None].float(), grid[None], mode="bilinear", align_corners=False)
        return warped[0, 0] > 0.5
