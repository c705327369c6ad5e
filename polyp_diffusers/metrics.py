"""Scores: segmentation overlap (IoU, Dice, precision, recall) and image realism (FID, KID)."""

import importlib

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm



def segmentation_scores(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Per-image IoU, Dice, precision and recall of binary masks `(N, 1, H, W)` (or `(N, H, W)`).

    Conventions for empty masks: an empty prediction of an empty target scores 1 on every measure; precision
    of an empty prediction of a non-empty target is 0 (nothing was found), as is its recall.
    """
    predictions = predictions.bool().flatten(1)
    targets = targets.bool().flatten(1)
    true_positive = (predictions & targets).sum(1).double()
    predicted = predictions.sum(1).double()
    actual = targets.sum(1).double()
    union = predicted + actual - true_positive
    both_empty = union == 0

    def ratio(numerator, denominator):
        return torch.where(both_empty, 1.0, numerator / denominator.clamp(min=1))

    return {
        "iou": ratio(true_positive, union),
        "dice": ratio(2 * true_positive, predicted + actual),
        "precision": ratio(true_positive, predicted),
        "recall": ratio(true_positive, actual),
    }


class ReuseLastBatch(nn.Module):
    """Lets FID and KID share one forward pass of the feature extractor for the same batch."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        self._last_images = None
        self._last_features = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images is not self._last_images:
            self._last_images, self._last_features = images, self.extractor(images)
        return self._last_features


def inception_extractor(weights_path: str | None = None) -> nn.Module:
    """
    The standard FID feature extractor: torch-fidelity's InceptionV3 (2048-d pool features, TF-compatible
    resizing to 299 px), via torchmetrics. Without `weights_path` its weights are downloaded on first use.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:
        raise ImportError("FID/KID need the [eval] extra: pip install 'polyp-diffusers[eval]'.") from error
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=weights_path)
    except Exception as error:  # the download fails with URLError, HTTPError, OSError... depending on where
        raise RuntimeError(
            f"could not load the Inception weights ({type(error).__name__}: {error}). They are downloaded on "
            f"first use from {URL_INCEPTION_V3}. Offline, download that file on a connected machine and pass it "
            f"with --inception-weights PATH (or put it into {torch.hub.get_dir()}/checkpoints/)."
        ) from error


def load_extractor(spec: str) -> nn.Module:
    """A feature extractor from 'module:factory' (called without arguments), for pluggable FID features."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"feature extractor {spec!r}; expected 'package.module:factory'.")
    extractor = getattr(importlib.import_module(module_name), attribute)()
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"{spec} returned {type(extractor).__name__}; expected a torch.nn.Module.")
    return extractor


def _uint8_batches(dataset, batch_size: int, size: int | None):
    """Images of a dataset as uint8 `(B, 3, H, W)` tensors, optionally resized so that one batch stacks."""
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size]["image"]
        if size is not None:
            images = [image.convert("RGB").resize((size, size), resample=3) for image in images]
        yield torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def fid_kid(
    real,
    generated,
    extractor: nn.Module | None = None,
    inception_weights: str | None = None,
    batch_size: int = 50,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    image_size: int | None = None,
    device: str = "cpu",
) -> dict:
    """
    FID and KID (mean and std over subsets) of two `datasets.Dataset`s with an `image` column.

    The default extractor is the standard 2048-d Inception (uint8 images in, resized to 299 inside the
    extractor); pass any `nn.Module` mapping uint8 `(N, 3, H, W)` to `(N, D)` features instead. Images of
    different sizes within a set are resized to `image_size` (bicubic) first.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    standard = extractor is None
    shared = ReuseLastBatch(extractor if extractor is not None else inception_extractor(inception_weights))
    subset_size = min(kid_subset_size, len(real), len(generated))
    fid = FrechetInceptionDistance(feature=shared, normalize=False).to(device)
    kid = KernelInceptionDistance(feature=shared, subsets=kid_subsets, subset_size=subset_size, normalize=False).to(device)
    for dataset, is_real in ((real, True), (generated, False)):
        name = "real" if is_real else "generated"
        for images in tqdm(_uint8_batches(dataset, batch_size, image_size), desc=f"Features of {name} images",
                           total=-(-len(dataset) // batch_size), unit="batch"):
            images = images.to(device)
            fid.update(images, real=is_real)
            kid.update(images, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "num_real": len(real),
        "num_generated": len(generated),
        "kid_subset_size": subset_size,
        "kid_subsets": kid_subsets,
        "features": "inception-v3-compat pool3 (2048)" if standard else type(shared.extractor).__name__,
    }
