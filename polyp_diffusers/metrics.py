"""Image realism: FID and KID of generated against real images, on Inception or DINOv2 features (segmentation
scores: `segmentation.py`)."""

import importlib
import math
import os
import sys
import urllib.parse
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .choices import DINOV2_WEIGHTS
from .safe_loading import torch_load_safely

INCEPTION_WEIGHTS_FILE = (
    "weights-inception-2015-12-05-6726825d.pth"  # the standard FID network, as torch-fidelity names it
)


class ReuseLastBatch(nn.Module):
    """
    Lets FID and KID share one forward pass of the feature extractor for the same batch, and checks what a pluggable
    extractor gives: one finite row of features per image (else torchmetrics fails on a shape it does not name, or
    LAPACK prints its own error into the output).
    """

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        self._last_images = None
        self._last_features = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images is not self._last_images:
            features = self.extractor(images)
            if features.ndim != 2 or features.shape[0] != images.shape[0]:
                raise ValueError(
                    f"the feature extractor gave features of shape {tuple(features.shape)} for images of shape "
                    f"{tuple(images.shape)}; expected (N, D): one row of D features per image."
                )
            if not torch.isfinite(features).all():
                raise ValueError("the feature extractor gave NaN or inf features.")
            self._last_images, self._last_features = images, features
        return self._last_features


def load_inception_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Inception weights from a `.safetensors` file or a `torch.save`d state dict, read without running anything
    stored in the file: a pickle can carry a program, and weights files come from downloads and shared caches.
    Anything but a plain state dict of tensors is refused with a `ValueError` that names the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state_dict = load_file(path, device="cpu")
        except SafetensorError as error:
            raise ValueError(f"Inception weights {path} are not a readable safetensors file ({error}).") from error
    else:
        state_dict = torch_load_safely(path, "Inception weights, a state dict of tensors")
    if not (
        isinstance(state_dict, dict)
        and all(isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state_dict.items())
    ):
        raise ValueError(f"Inception weights {path} hold a {type(state_dict).__name__}, not a state dict of tensors.")
    return state_dict


def inception_cache_path(url: str | None = None) -> Path:
    """Where the official Inception weights (or those of `url`) are kept: the torch hub cache, as torch-fidelity does."""
    name = Path(urllib.parse.urlparse(url).path).name if url else INCEPTION_WEIGHTS_FILE
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def download_inception_weights(url: str) -> Path:
    """
    The official weights file in the torch hub cache (where torch-fidelity keeps it too), downloaded if absent.
    Only downloaded here, never loaded: `load_inception_state_dict` reads it like any other file.
    """
    path = inception_cache_path(url)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path))  # writes a temporary file, then renames it
    return path


def inception_extractor(weights_path: str | os.PathLike | None = None) -> nn.Module:
    """
    The standard FID feature extractor: torch-fidelity's InceptionV3 (2048-d pool features, TF-compatible
    resizing to 299 px), via torchmetrics. `weights_path` is a `.pth` state dict or a `.safetensors` file;
    without it the official weights are downloaded into the torch hub cache on first use.
    """
    try:
        from torch_fidelity import feature_extractor_inceptionv3
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:
        raise ImportError("FID/KID need the [eval] extra: pip install 'polyp-diffusers[eval]'.") from error
    url = feature_extractor_inceptionv3.URL_INCEPTION_V3
    if weights_path is None:
        try:
            weights_path = download_inception_weights(url)
        except Exception as error:  # the download fails with URLError, HTTPError, OSError... depending on where
            raise RuntimeError(
                f"could not download the Inception weights ({type(error).__name__}: {error}). They are downloaded "
                f"on first use from {url}. Offline, download that file on a connected machine and pass it with "
                f"--inception-weights PATH (or put it into {torch.hub.get_dir()}/checkpoints/)."
            ) from error
    state_dict = load_inception_state_dict(weights_path)

    # torch-fidelity's constructor loads its weights itself, with a full unpickler (`torch.load(weights_only=False)`
    # for a path, `load_state_dict_from_url` for the hub cache); here it gets the state dict read safely above.
    def checked_state_dict(*args, **kwargs):
        return state_dict

    with mock.patch.object(feature_extractor_inceptionv3, "load_state_dict_from_url", checked_state_dict):
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except RuntimeError as error:  # missing, unexpected or misshapen tensors, a line for each kind
            problems = " ".join(str(error).split())
            raise ValueError(
                f"Inception weights {weights_path} do not fit torch-fidelity's InceptionV3: "
                + (problems if len(problems) <= 400 else problems[:400] + " ...")
            ) from error


# The features of the standard FID and KID; on any other, the scores are Fréchet and kernel distances of those.
INCEPTION_FEATURES = "inception-v3-compat pool3 (2048)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Features(nn.Module):
    """
    DINOv2's class-token embedding of uint8 images, resized to 224 px (bicubic, antialiased) and normalised as
    in its training. Stein et al. ("Exposing flaws of generative model evaluation metrics", NeurIPS 2023) found
    Fréchet distances on these features to track human judgement of realism better than on Inception's.
    """

    def __init__(self, model, name: str, image_size: int = 224):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = image_size
        self.description = f"DINOv2 {name} class token ({model.config.hidden_size})"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        pixels = F.interpolate(images.float() / 255, size=size, mode="bicubic", align_corners=False, antialias=True)
        pixels = (pixels - self.mean) / self.std
        return self.model(pixel_values=pixels.to(self.model.dtype)).pooler_output.float()


def dinov2_extractor(weights: str = DINOV2_WEIGHTS) -> nn.Module:
    """DINOv2 features for FID/KID from a Hub id or a local folder (safetensors only)."""
    try:
        from transformers import Dinov2Model
    except ImportError as error:
        raise ImportError("DINOv2 features need the [eval] extra: pip install 'polyp-diffusers[eval]'.") from error
    try:
        model = Dinov2Model.from_pretrained(weights, use_safetensors=True)
    except (OSError, ValueError) as error:  # offline, not found, no safetensors file, not a valid repo id
        raise RuntimeError(
            f"could not load the DINOv2 weights {weights!r} ({type(error).__name__}: {error}). They are downloaded "
            f"from the Hub on first use; offline, download the model folder on a connected machine "
            f"(`hf download {DINOV2_WEIGHTS} --local-dir DIR`) and pass it with --dinov2-weights DIR."
        ) from error
    return Dinov2Features(model, Path(weights).name)


def load_extractor(spec: str) -> nn.Module:
    """
    A feature extractor from 'module:factory' (called without arguments), for pluggable FID features. The module
    is also looked for in the current folder, as `python -m` would: a console script does not look there.
    """
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"feature extractor {spec!r}; expected 'package.module:factory'.")
    here = os.getcwd()
    looked_here = here not in sys.path
    if looked_here:
        sys.path.append(here)  # after the installed packages, which a file of the same name cannot shadow
    try:
        module = importlib.import_module(module_name)
    finally:
        if looked_here:
            sys.path.remove(here)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"feature extractor {spec!r}: {module_name} has no function {attribute!r}.")
    extractor = factory()
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"{spec} returned {type(extractor).__name__}; expected a torch.nn.Module.")
    return extractor


def _uint8_batches(dataset, batch_size: int, size: int | None, name: str):
    """Images of a dataset as uint8 `(B, 3, H, W)` tensors, optionally resized so that one batch stacks."""
    for start in range(0, len(dataset), batch_size):
        images = dataset[start : start + batch_size]["image"]
        if size is not None:
            images = [image.convert("RGB").resize((size, size), resample=3) for image in images]
        sizes = sorted({image.size for image in images})
        if len(sizes) > 1:
            raise ValueError(
                f"the {name} images are of several sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}); pass "
                "--image-size N (image_size=N) to resize them all to N x N."
            )
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
    extractor); pass any `nn.Module` mapping uint8 `(N, 3, H, W)` to `(N, D)` features instead, such as
    `dinov2_extractor()` (its `description` names the features in the result). Images of different sizes
    within a set are resized to `image_size` (bicubic) first.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(kid_subset_size, len(real), len(generated))
    if subset_size < 2:  # KID's unbiased estimate divides by (n - 1): it would be NaN
        raise ValueError(
            f"KID needs subsets of at least 2 images; kid_subset_size is {kid_subset_size}, and the sets hold "
            f"{len(real)} real and {len(generated)} generated images."
        )
    standard = extractor is None
    shared = ReuseLastBatch(extractor if extractor is not None else inception_extractor(inception_weights))
    fid = FrechetInceptionDistance(feature=shared, normalize=False).to(device)
    kid = KernelInceptionDistance(feature=shared, subsets=kid_subsets, subset_size=subset_size, normalize=False).to(
        device
    )
    for dataset, is_real in ((real, True), (generated, False)):
        name = "real" if is_real else "generated"
        for images in tqdm(
            _uint8_batches(dataset, batch_size, image_size, name),
            desc=f"Features of {name} images",
            total=-(-len(dataset) // batch_size),
            unit="batch",
        ):
            images = images.to(device)
            fid.update(images, real=is_real)
            kid.update(images, real=is_real)
    kid_mean, kid_std = kid.compute()
    scores = {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
    if not all(math.isfinite(value) for value in scores.values()):  # features of NaN or inf: no distance to publish
        raise ValueError(f"the distances are not finite ({scores}): the feature extractor gave NaN or inf features.")
    return {
        **scores,
        "num_real": len(real),
        "num_generated": len(generated),
        "num_features": fid.real_features_sum.numel(),
        "kid_subset_size": subset_size,
        "kid_subsets": kid_subsets,
        "features": INCEPTION_FEATURES
        if standard
        else getattr(shared.extractor, "description", type(shared.extractor).__name__),
    }
