"""The paper's downstream test: segmenters (UNet++ as in the paper, or SegFormer), their training sets (real,
synthetic or both) and their scores.

`training/train_segmentation.py` trains one setting with these pieces; `training/compare_segmentation.py`
runs all three.
"""

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets
from monai.losses import DiceCELoss
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix
from monai.networks.nets import BasicUNetPlusPlus
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .data import (
    GENERATION_SETTINGS_FILE,
    generation_settings,
    load_polyp_dataset,
    local_path_or_id,
    pair_ids,
    parse_dataset_spec,
    split_ids,
)
from .pipelines import non_finite_names
from .transforms import images_from_levels, pair_tensors

TRAIN_SETS = ("real", "synthetic", "real+synthetic")
ARCHITECTURES = ("monai", "smp", "segformer")
# What a trained segmenter's `results.json` config must hold to be loaded and scored with (`load_trained_segmenter`).
SAVED_SETTINGS = ("architecture", "resolution", "seed", "train", "validation_size")
# What results call each architecture's segmenter (tables, model-index entries, progress bars).
SEGMENTER_FAMILIES = {"monai": "UNet++", "smp": "UNet++", "segformer": "SegFormer"}
# SegFormer's MiT encoder sizes (Xie et al. 2021), as in the configs of nvidia/mit-b0, -b1 and -b2.
SEGFORMER_SIZES = {
    "b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b1": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
}
# The package each optional architecture imports, and the extra that installs it.
ARCHITECTURE_EXTRAS = {"smp": ("segmentation_models_pytorch", "smp"), "segformer": ("transformers", "eval")}
# The smallest size each segmenter runs at (found by running each at every size up to 69 px): MONAI's UNet++ needs
# more than one pixel for its instance norm after four halvings; SegFormer's first stage (a quarter of the size)
# must cover its 8-pixel attention reduction. smp's ResNet-34 UNet++ needs a multiple of its output stride, 32.
SMALLEST_RESOLUTION = {"monai": 32, "smp": 32, "segformer": 29}
RESOLUTION_MULTIPLE = {"monai": 1, "smp": 32, "segformer": 1}


def segmentation_scores(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Per-image IoU, Dice, precision and recall of binary masks `(N, 1, H, W)` (or `(N, H, W)`), from MONAI's
    confusion matrix.

    Conventions for empty masks: an empty prediction of an empty target scores 1 on every measure; precision
    of an empty prediction of a non-empty target is 0 (nothing was found), as is its recall.
    """
    predictions, targets = (mask.reshape(len(mask), 1, -1).double() for mask in (predictions, targets))
    confusion = get_confusion_matrix(predictions, targets)  # (N, 1, 4): tp, fp, tn, fn
    true_positive, false_positive, _, false_negative = confusion[:, 0].unbind(-1)
    both_empty = true_positive + false_positive + false_negative == 0

    def score(metric: str) -> torch.Tensor:
        value = compute_confusion_matrix_metric(metric, confusion)[:, 0]
        return torch.where(both_empty, 1.0, value.nan_to_num(0.0))

    return {
        "iou": score("threat score"),
        "dice": score("f1"),
        "precision": score("precision"),
        "recall": score("recall"),
    }


class FullResolutionLogits(nn.Module):
    """SegFormer predicts at a quarter of the input size; the benchmark trains and scores at full size."""

    def __init__(self, segformer: nn.Module):
        super().__init__()
        self.segformer = segformer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.segformer(pixel_values=images).logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_segmenter(
    architecture: str,
    encoder_weights: str | None = None,
    segformer_size: str = "b0",
    segformer_config: dict | None = None,
) -> torch.nn.Module:
    """
    A binary segmenter (one logit per pixel): MONAI's UNet++ trained from scratch (`monai`), the paper's
    ResNet-34 UNet++ (`smp`, an optional extra; `encoder_weights="imagenet"` downloads the encoder), or a
    SegFormer (`segformer`, transformers; `encoder_weights` names a Hub id or folder such as `nvidia/mit-b0`,
    otherwise `segformer_size` picks a randomly initialised MiT encoder; `segformer_config`, a saved
    `SegformerConfig` as a dict, rebuilds one without weights or a download).
    """
    if architecture == "monai":
        return BasicUNetPlusPlus(spatial_dims=2, in_channels=3, out_channels=1)
    if architecture == "segformer":
        import_extra(architecture)  # missing: one line that names the extra
        from transformers import SegformerConfig, SegformerForSemanticSegmentation  # only this architecture's

        if segformer_config is not None:
            segformer = SegformerForSemanticSegmentation(SegformerConfig.from_dict(segformer_config))
        elif encoder_weights:
            segformer = SegformerForSemanticSegmentation.from_pretrained(
                encoder_weights, num_labels=1, ignore_mismatched_sizes=True, use_safetensors=True
            )
        elif segformer_size in SEGFORMER_SIZES:
            segformer = SegformerForSemanticSegmentation(
                SegformerConfig(num_labels=1, **SEGFORMER_SIZES[segformer_size])
            )
        else:
            raise ValueError(f"SegFormer size {segformer_size!r}; expected one of {sorted(SEGFORMER_SIZES)}.")
        return FullResolutionLogits(segformer)
    if architecture != "smp":
        raise ValueError(f"architecture {architecture!r}; expected one of {ARCHITECTURES}.")
    smp = import_extra(architecture)
    return smp.UnetPlusPlus(encoder_name="resnet34", encoder_weights=encoder_weights, in_channels=3, classes=1)


def import_extra(architecture: str):
    """
    The optional package an architecture needs (`ARCHITECTURE_EXTRAS`), imported only for it; missing, an
    `ImportError` of one line that names the extra to install. `None` for an architecture that needs none.
    """
    if architecture not in ARCHITECTURE_EXTRAS:
        return None
    module, extra = ARCHITECTURE_EXTRAS[architecture]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"--architecture {architecture} needs the [{extra}] extra ({error}): pip install 'polyp-diffusers[{extra}]'."
        ) from error


def check_resolution(architecture: str, resolution: int) -> None:
    """Refuses, before any work, a size the segmenter cannot run at (it would fail deep in its first step)."""
    smallest, multiple = SMALLEST_RESOLUTION[architecture], RESOLUTION_MULTIPLE[architecture]
    if resolution < smallest or resolution % multiple:
        needed = f"a multiple of {multiple}" if multiple > 1 else f"at least {smallest}"
        raise ValueError(f"--resolution {resolution}: --architecture {architecture} needs {needed} pixels.")


def load_trained_segmenter(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """
    A segmenter as `training/train_segmentation.py` left it (its best weights, safetensors only), and the
    configuration it was trained with. Pretrained weights it started from are not downloaded again: the saved
    weights replace them (a SegFormer is rebuilt from the configuration saved in `results.json`).
    """
    run = Path(run_dir)
    results, weights = run / "results.json", run / "best.safetensors"
    if not results.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a train_segmentation.py output folder: it needs results.json and best.safetensors."
        )
    try:
        saved = json.loads(results.read_text())
        config = saved["config"]
    except (ValueError, KeyError, TypeError) as error:  # bad JSON, a list, no config
        raise ValueError(
            f"{results} is damaged ({type(error).__name__}: {error}); train the segmenter again."
        ) from None
    missing = [key for key in SAVED_SETTINGS if key not in config] if isinstance(config, dict) else list(SAVED_SETTINGS)
    if missing or config["architecture"] not in ARCHITECTURES:
        problem = f"no {', '.join(missing)} in its config" if missing else f"architecture {config['architecture']!r}"
        raise ValueError(f"{results} is damaged ({problem}); train the segmenter again.")
    architecture = config["architecture"]
    encoder_weights = config.get("encoder_weights") if architecture == "segformer" else None
    # A SegFormer's saved configuration rebuilds it offline; runs older than it name the pretrained weights.
    segformer_config = saved.get("segformer_config")
    model = build_segmenter(architecture, encoder_weights, config.get("segformer_size", "b0"), segformer_config)
    try:
        state = load_file(str(weights))
    except SafetensorError as error:  # truncated or empty: a copy cut short, a full disk
        raise ValueError(f"{weights} is damaged ({error}); train the segmenter again.") from None
    non_finite = non_finite_names(state.items())
    if non_finite:  # a run that diverged before it was stopped for it: it would score 0 as if it were a result
        raise ValueError(
            f"{weights} has NaN or inf in {len(non_finite)} weight tensors (first: {non_finite[0]}): its training "
            "diverged; train the segmenter again with a lower --learning_rate."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # weights of another architecture or size: hundreds of names, said in one line
        first_line = str(error).splitlines()[0]
        raise ValueError(
            f"{weights} does not fit the {architecture} segmenter {results} describes ({first_line})"
        ) from None
    return model.eval(), config


def describe_segmenter(architecture: str, encoder_weights: str | None = None, segformer_size: str = "b0") -> str:
    if architecture == "monai":
        return "MONAI BasicUNetPlusPlus, random init"
    if architecture == "segformer":
        return f"SegFormer ({encoder_weights or f'MiT-{segformer_size}, random init'})"
    return f"smp UnetPlusPlus, ResNet-34 encoder, encoder_weights={encoder_weights}"


def logits_of(model, images):
    out = model(images)
    return out[0] if isinstance(out, (list, tuple)) else out  # MONAI's UNet++ returns a list of heads


def make_training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """
    The segmenter's training step on a batch (`images` in `[-1, 1]`, `masks` in {0, 1}): Dice + cross-entropy
    loss, `backward(loss)`, one optimizer step. It reads nothing back to the host and leaves the gradients at
    `None`, so that `training_utils.GraphedStep` can replay it as a CUDA graph; it returns the loss.
    """
    loss_function = DiceCELoss(sigmoid=True)

    def training_step(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        loss = loss_function(logits_of(model, images), masks)
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return training_step


@torch.no_grad()
def evaluate(model, images: torch.Tensor, masks: torch.Tensor, batch_size: int) -> dict:
    """
    Mean per-image IoU, Dice, precision and recall of thresholded predictions on pairs from
    `transforms.pair_tensors` (images as 8-bit levels), computed where the model runs.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = {"iou": [], "dice": [], "precision": [], "recall": []}
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        predictions = logits_of(model, images_from_levels(images[batch].to(device))).float() > 0
        for name, values in segmentation_scores(predictions, masks[batch].to(device) > 0).items():
            scores[name].append(values)
    model.train(was_training)
    result = {name: float(torch.cat(values).mean()) for name, values in scores.items()}
    result["num_images"] = len(images)
    return result


def mask_fidelity(model: nn.Module, config: dict, generated: Dataset, batch_size: int = 32) -> dict:
    """
    How well generated images obey their masks: the scores of `model` (a segmenter from `load_trained_segmenter`,
    on its device, ideally trained on real pairs only) on `generated` against the masks they were made from.
    """
    # The pairs stay in CPU memory (a generated set has no size bound); evaluate moves each batch.
    return evaluate(model, *pair_tensors(generated, config["resolution"]), batch_size)


def _sources_of(synthetic: Dataset) -> list[set[str]]:
    """The real pairs each synthetic pair came from: its `source_id` (`a+b` for a new mask made of two), else its id."""
    sources = synthetic["source_id"] if "source_id" in synthetic.column_names else synthetic["id"]
    return [set(source.split("+")) for source in sources]


def held_out_ids(real: Dataset, validation_size: int | float, seed: int) -> set[str]:
    """The ids of the real training pairs held out for checkpoint selection: a seeded part, the same in every setting."""
    return set(split_ids(sorted(real["id"]), validation_size, seed, "--validation_size", "validation")["test"])


def held_out_synthetic(real: Dataset, synthetic: Dataset, validation_size: int | float, seed: int) -> Dataset:
    """
    The synthetic pairs made from the held-out real masks: a segmenter trained on the other real pairs has seen
    neither their masks nor their images, so its score on them measures how well the images obey their masks.
    """
    validation_ids = held_out_ids(real, validation_size, seed)
    return synthetic.select([i for i, sources in enumerate(_sources_of(synthetic)) if sources <= validation_ids])


def pairs_from_learned_masks(generated: Dataset, generated_path: str, config: dict) -> int:
    """
    How many generated pairs were made from masks (or frames) that a segmenter learned from: its real training
    pairs (`config`, from its `results.json`), but for those it held out. 0 where a record to tell is missing;
    an error (`OSError`, `ValueError`) where those pairs cannot be read.
    """
    generation = _generation_of(generated_path)
    real, real_split = config.get("real"), config.get("real_split")
    if generation is None or not real or not real_split or local_path_or_id(generation[0]) != local_path_or_id(real):
        return 0
    real_pairs = load_polyp_dataset(real, split=real_split)
    learned = set(real_pairs["id"]) - held_out_ids(real_pairs, config["validation_size"], config["seed"])
    return sum(1 for sources in _sources_of(generated) if sources & learned)


def training_pairs(
    train_set: str, real: Dataset, synthetic: Dataset | None, validation_size: int | float, seed: int
) -> tuple[Dataset, Dataset]:
    """
    The chosen training set and the fixed real validation pairs: a seeded part of the real training pairs,
    held out of every training set (their synthetic twins too), so all settings select checkpoints alike.
    """
    if train_set not in TRAIN_SETS:
        raise ValueError(f"training set {train_set!r}; expected one of {TRAIN_SETS}.")
    ids = list(real["id"])
    validation_ids = held_out_ids(real, validation_size, seed)
    keep = [i for i, pair_id in enumerate(ids) if pair_id not in validation_ids]
    held_out = [i for i, pair_id in enumerate(ids) if pair_id in validation_ids]
    parts = []
    if "real" in train_set.split("+"):
        parts.append(real.select(keep))
    if "synthetic" in train_set.split("+"):
        if synthetic is None:
            raise ValueError(f"training on {train_set} needs a synthetic dataset.")
        kept = [i for i, sources in enumerate(_sources_of(synthetic)) if not sources & validation_ids]
        parts.append(synthetic.select(kept))
    columns = ["image", "mask", "id"]
    return concatenate_datasets([part.select_columns(columns) for part in parts]), real.select(held_out)


def _generation_of(synthetic: str) -> tuple[str, str, dict[str, str]] | None:
    """
    `(mask_dataset, split, models)` from a generated folder's `generation.json`: where its masks (or frames) came
    from, and the models that made it, as `generate`'s flags name them (`{"--model": folder, ...}`).
    """
    try:
        settings = generation_settings(synthetic)
        if settings is None:
            return None
        models = {
            flag: settings[key]
            for flag, key in (("--model", "model"), ("--mask-model", "mask_model"))
            if settings.get(key)
        }
        return settings["mask_dataset"], settings["split"], models
    except (ValueError, KeyError) as error:
        where = Path(synthetic) / GENERATION_SETTINGS_FILE
        raise ValueError(
            f"{where} is damaged ({type(error).__name__}: {error}): the real pairs that --synthetic was made from "
            "cannot be told apart from the test pairs."
        ) from error


def _models_training_sets(models: dict[str, str]) -> list[tuple[str, str, str]]:
    """
    `(model, dataset, split)` for each model folder that `training/train.py` trained on a dataset in a local folder
    (its `training_config.json`): the real pairs it learned from, which its images or masks may reproduce. A Hub
    id, a converted model or a dataset on the Hub records nothing local to compare.
    """
    found = []
    for flag, folder in models.items():
        config_path = Path(folder) / "training_config.json"
        if not config_path.is_file():
            continue
        try:
            config = json.loads(config_path.read_text())
        except ValueError as error:
            raise ValueError(
                f"{config_path} is damaged ({type(error).__name__}: {error}): the real pairs that trained {flag} "
                f"{folder} cannot be told apart from the test pairs."
            ) from error
        if not isinstance(config, dict):
            continue
        # The resolved path (since session 13); before, the path as given to train.py, read from the current folder.
        dataset, split = config.get("dataset_path") or config.get("dataset"), config.get("train_split")
        if isinstance(dataset, str) and isinstance(split, str) and Path(dataset).is_dir():
            found.append((f"{flag} {folder}", dataset, split))
    return found


def check_tests_apart(
    real: str,
    real_split: str,
    tests: list[str],
    synthetic: str | None = None,
    synthetic_split: str = "train",
    models: dict[str, str] | None = None,
) -> None:
    """
    Refuses test sets (`DATASET[:SPLIT]` specs) that hold pairs the segmenter learns from, before any training: the
    real pairs it trains and selects its checkpoint on, the synthetic pairs it trains on, the real pairs whose
    masks (or frames, `generate --insert`) made them (their `source_id`s in the dataset that `generation.json`
    names; a relative folder there is read from the current one, as `generate` read it), or the real pairs the
    models that made them were trained on (a model that learned a test image may reproduce it): those
    `generation.json` names, and `models` (`{flag: folder}`) for pairs still to be generated. Ids are compared within
    one dataset only (the same folder or Hub id): CVC-ClinicDB and ETIS, for one, both name their frames by number.
    """
    learned = [
        (
            f"--real {real} (split {real_split}), which the segmenter learns from",
            real,
            set(pair_ids(load_polyp_dataset(real, real_split), real_split)),
        )
    ]
    models = dict(models or {})
    if synthetic is not None:
        pairs = load_polyp_dataset(synthetic, split=synthetic_split)
        learned.append(
            (
                f"--synthetic {synthetic} (split {synthetic_split}), which the segmenter learns from",
                synthetic,
                set(pair_ids(pairs, synthetic_split)),
            )
        )
        if (generation := _generation_of(synthetic)) is not None:
            mask_dataset, split, generators = generation
            if "source_id" in pairs.column_names:
                sources = set().union(*_sources_of(pairs))
                what = f"the real pairs whose masks made --synthetic {synthetic} ({mask_dataset}, split {split})"
                learned.append((what + ", which the segmenter learns from", mask_dataset, sources))
            models.update(generators)
    for model, dataset, split in _models_training_sets(models):
        what = f"the real pairs that trained {model} ({dataset}, split {split}), whose output the segmenter learns from"
        learned.append((what, dataset, set(pair_ids(load_polyp_dataset(dataset, split=split), split))))
    for spec in tests:
        path, split = parse_dataset_spec(spec)
        test_ids = set(pair_ids(load_polyp_dataset(path, split=split), split))
        for what, dataset, ids in learned:
            if local_path_or_id(dataset) == local_path_or_id(path) and (shared := ids & test_ids):
                raise ValueError(
                    f"test set {spec} shares {len(shared)} of its {len(test_ids)} pairs with {what}: its scores would "
                    "not be a test. Test on pairs that neither the segmenter nor the models behind its synthetic "
                    "pairs have seen (another split or dataset)."
                )


def name_test_sets(specs: list[str]) -> list[str]:
    """
    A name for each `DATASET[:SPLIT]` test set, its folder's name and split (`kvasir-seg:test`), with as many parent
    folders as tell apart sets whose folders share a name (`a/data:test`, `b/data:test`). The same set twice (by
    its resolved path) is refused: it would be scored once, under one name.
    """
    places = [parse_dataset_spec(spec) for spec in specs]
    seen = {}
    for spec, (path, split) in zip(specs, places):
        if (place := (local_path_or_id(path), split)) in seen:
            raise ValueError(f"--test {seen[place]} and --test {spec} are the same test set: name it once.")
        seen[place] = spec
    # Named as written (a symlink keeps its own name), made absolute so that parents can tell sets apart.
    parts = [Path(os.path.abspath(path) if Path(path).exists() else path).parts for path, _ in places]
    depths = [1] * len(specs)
    while True:
        names = [f"{Path(*part[-depth:]).as_posix()}:{split}" for part, depth, (_, split) in zip(parts, depths, places)]
        clashes = [i for i, name in enumerate(names) if names.count(name) > 1]
        if not clashes:
            return names
        longer = [i for i in clashes if depths[i] < len(parts[i])]
        if not longer:  # distinct sets whose whole paths read alike (a Hub id and a folder of that name)
            raise ValueError(f"--test {specs[clashes[0]]} and --test {specs[clashes[1]]} cannot be told apart.")
        for i in longer:
            depths[i] += 1


def load_test_sets(specs: list[str]) -> dict[str, Dataset]:
    """`DATASET[:SPLIT]` specs (split default: test) as datasets, named by `name_test_sets`."""
    return {
        name: load_polyp_dataset(path, split=split)
        for name, (path, split) in zip(name_test_sets(specs), map(parse_dataset_spec, specs))
    }
