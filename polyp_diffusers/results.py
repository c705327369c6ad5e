"""Measured results as model-card material: a Markdown section and Hub model-index entries.

Every evaluation command writes `{"markdown": ..., "eval_results": [...]}` (plus its raw numbers), which
`polyp-ddpm card` puts into a saved pipeline's card.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .data import generation_settings, local_path_or_id, parse_dataset_spec
from .folders import write_text_atomically
from .hub_card.cards import CARD_CONTEXT_FILE, card_is_as_rendered, model_card_files_naming
from .metrics import INCEPTION_FEATURES
from .modeling import unet_weights_digest

logger = logging.getLogger(__name__)

METRIC_NAMES = {"iou": "IoU", "dice": "Dice"}


def few_images_note(scores: dict) -> str | None:
    """
    What to know of a Fréchet distance (FID, FD) from fewer images than features (its covariances cannot be full
    rank): it is biased upward, comparable only at as many images. None for enough images, or scores without a count.
    """
    fewest, features = min(scores["num_real"], scores["num_generated"]), scores.get("num_features")
    if features is None or fewest >= features:
        return None
    return (
        f"{fewest} images are fewer than the {features} features, so this Fréchet distance is biased upward; "
        "compare it only with distances of as many images (the paper compares 1,000 generated with 1,000 real)."
    )


def distance_names(scores: dict) -> tuple[str, str]:
    """
    The names of the two distances: FID and KID are defined on Inception features; on others (DINOv2, a plug-in)
    the same distances are named by their features, so that no other score is called FID.
    """
    if scores["features"] == INCEPTION_FEATURES:
        return "FID", "KID"
    return f"FD ({scores['features']})", f"KD ({scores['features']})"


def kid_text(scores: dict) -> str:
    """KID's mean and its spread over subsets, unless every subset holds every image (two sets of at most
    `--kid-subset-size` images each), where all subsets are the same and the spread of 0 says nothing."""
    if scores.get("kid_subset_size", 0) >= max(scores["num_real"], scores["num_generated"]):
        return f"{scores['kid_mean']:.4f} (each subset holds every image: no spread)"
    return f"{scores['kid_mean']:.4f} ± {scores['kid_std']:.4f}"


def fid_results(scores: dict) -> dict:
    """FID/KID scores (from `polyp_diffusers.metrics.fid_kid`) as a card section and model-index entries."""
    dataset = Path(parse_dataset_spec(scores["real"])[0]).name
    fid_name, kid_name = distance_names(scores)
    fid_type, kid_type = ("fid", "kid") if fid_name == "FID" else ("fd", "kd")
    markdown = (
        f"### Image realism ({scores['num_generated']} generated vs {scores['num_real']} real images of "
        f"`{scores['real']}`, {scores['features']})\n"
        f"| {fid_name} | {kid_name} (mean ± std over subsets) |\n| --- | --- |\n"
        f"| {scores['fid']:.2f} | {kid_text(scores)} |"
    )
    if few := few_images_note(scores):
        markdown += f"\n\nNote: {few}"
    common = dict(task_type="image-to-image", dataset_type=dataset, dataset_name=dataset)
    return {
        "markdown": markdown,
        "eval_results": [
            dict(common, metric_type=fid_type, metric_name=fid_name, metric_value=round(scores["fid"], 3)),
            dict(common, metric_type=kid_type, metric_name=kid_name, metric_value=round(scores["kid_mean"], 5)),
        ],
    }


def mask_fidelity_results(scores: dict, segmenter_family: str) -> dict:
    """
    Mask fidelity (`segmentation.mask_fidelity` on generated pairs, with the `dataset`, `segmenter_trained_on` and
    `generated_by` that `polyp-ddpm mask-fidelity` adds) as a card section and model-index entries.
    """
    dataset = Path(parse_dataset_spec(scores["dataset"])[0]).name
    trained_on = scores["segmenter_trained_on"]
    # Pairs without the record of a model that made them (a set moved without its generation.json, or real pairs).
    pairs = "generated pairs" if scores.get("generated_by") else "pairs (no record of the model that made them)"
    markdown = (
        f"### Mask fidelity ({scores['num_images']} {pairs} of `{scores['dataset']}`, scored by a "
        f"{segmenter_family} trained on {trained_on} pairs against the masks the images were generated from)\n"
        "| IoU | Dice | precision | recall |\n| --- | --- | --- | --- |\n"
        f"| {scores['iou']:.4f} | {scores['dice']:.4f} | {scores['precision']:.4f} | {scores['recall']:.4f} |"
    )
    if learned := scores.get("pairs_from_learned_masks"):
        markdown += (
            f"\n\n{learned} of these pairs were made from masks the segmenter learned from: the score is flattered."
        )
    common = dict(task_type="image-to-image", dataset_type=dataset, dataset_name=dataset)
    return {
        "markdown": markdown,
        "eval_results": [
            dict(
                common,
                metric_type=metric,
                metric_name=f"mask fidelity {METRIC_NAMES[metric]} ({segmenter_family} trained on {trained_on})",
                metric_value=round(scores[metric], 4),
            )
            for metric in ("iou", "dice")
        ],
    }


def check_results_of(model_dir: str | Path, results: dict[str, dict]) -> None:
    """
    Refuses results that do not belong in `model_dir`'s card: a file whose `generated_by` model holds other weights
    (images of another model), and two files with the same results (one table and its entries twice).
    """
    tables: dict[str, str] = {}
    own_weights = unet_weights_digest(model_dir)
    for source, result in results.items():  # each as `hub_card.cards.check_results_file` let it through
        if (earlier := tables.setdefault(result["markdown"], source)) != source:
            raise ValueError(f"--results {source} holds the same results as {earlier}: name each once.")
        generated_by = result.get("generated_by")
        if generated_by is not None and not isinstance(generated_by, str):
            raise ValueError(f"--results {source}: 'generated_by' is {generated_by!r}, not the path or id of a model.")
        # The weights that made the images; files older than that record name only the model.
        weights = result.get("generated_by_weights") or (unet_weights_digest(generated_by) if generated_by else None)
        if weights in (None, own_weights):
            continue
        if generated_by is not None and local_path_or_id(generated_by) == local_path_or_id(str(model_dir)):
            raise ValueError(
                f"--results {source} scores images that {model_dir} generated before it was trained again (UNet "
                f"SHA-256 {weights[:12]} then, {own_weights and own_weights[:12]} now): generate and score them again."
            )
        raise ValueError(
            f"--results {source} scores images generated by {generated_by}, whose weights are not those of "
            f"{model_dir}: a model card holds its own model's results."
        )


def provenance(generated: str) -> dict:
    """
    Whose images a results file scores, for `check_results_of`: the model that generated the dataset `generated`
    (its `generation.json`) and the SHA-256 of that model's UNet weights when it generated them, so that the record
    still holds once the model folder is moved or trained again. None for a dataset of real pairs.
    """
    try:
        settings = generation_settings(generated) or {}
    except ValueError:  # damaged: no model to name
        settings = {}
    model = settings.get("model")
    if not isinstance(model, str):
        return {"generated_by": None, "generated_by_weights": None}
    # As generate recorded them (sets made before that record: as they are now).
    return {
        "generated_by": model,
        "generated_by_weights": settings.get("model_weights_sha256") or unet_weights_digest(model),
    }


def summarize_scores(scores: list[dict]) -> dict:
    """IoU and Dice of several seeds' scores: mean, standard deviation (0 for one seed) and the number of seeds."""
    summary = {}
    for metric in ("iou", "dice"):
        values = [score[metric] for score in scores]
        spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary.update({f"{metric}_mean": float(np.mean(values)), f"{metric}_std": spread})
    return {**summary, "seeds": len(scores)}


def summarize_segmentation(runs: list[dict]) -> dict:
    """
    Segmentation runs (`results.json` of `train_segmentation.py`), several seeds per training set, as
    `{setting: {test set: {iou_mean, iou_std, dice_mean, dice_std, seeds, train_pairs}}}`.
    """
    by_setting: dict[str, list[dict]] = {}
    for run in runs:
        by_setting.setdefault(run["train"], []).append(run)
    summary = {}
    for setting, setting_runs in by_setting.items():
        summary[setting] = {}
        for test_name in setting_runs[0]["test"]:
            scores = summarize_scores([run["test"][test_name] for run in setting_runs])
            summary[setting][test_name] = {**scores, "train_pairs": setting_runs[0]["num_train_pairs"]}
    return summary


def segmentation_results(runs: list[dict]) -> dict:
    """
    The downstream benchmark (one `results.json` per training set and seed) as a Markdown table (mean ± std over
    seeds), model-index entries (the means) and the summary they come from.
    """
    summary = summarize_segmentation(runs)
    first = runs[0]
    seeds = max(scores["seeds"] for setting in summary.values() for scores in setting.values())
    test_names = list(first["test"])
    header = "| trained on | pairs | " + " | ".join(f"{name} IoU | {name} Dice" for name in test_names) + " |"
    rows = [header, "|" + " --- |" * (2 + 2 * len(test_names))]
    eval_results = []
    for setting, by_test in summary.items():
        cells = [setting, str(next(iter(by_test.values()))["train_pairs"])]
        for name in test_names:
            scores = by_test[name]
            for metric in ("iou", "dice"):
                mean, spread = scores[f"{metric}_mean"], scores[f"{metric}_std"]
                cells.append(f"{mean:.4f} ± {spread:.4f}" if scores["seeds"] > 1 else f"{mean:.4f}")
                dataset, split = parse_dataset_spec(name)
                over_seeds = f", mean of {scores['seeds']} seeds" if scores["seeds"] > 1 else ""
                eval_results.append(
                    dict(
                        task_type="image-segmentation",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split=split,
                        metric_type=metric,
                        metric_name=f"{first['segmenter_family']} {METRIC_NAMES[metric]}, trained on {setting}{over_seeds}",
                        metric_value=round(mean, 4),
                    )
                )
        rows.append("| " + " | ".join(cells) + " |")
    config = first["config"]
    seed_note = f"mean ± std over {seeds} seeds of " if seeds > 1 else ""
    markdown = (
        f"### Downstream segmentation ({first['segmenter']}, {config['max_train_steps']} steps of batch "
        f"{config['train_batch_size']} at {config['resolution']} px for every training set, best checkpoint by "
        f"IoU on held-out real pairs; {seed_note}mean per-image scores)\n" + "\n".join(rows)
    )
    for name in test_names:
        for setting in summary:
            if "real" in summary and setting.startswith("real+"):
                gain = summary[setting][name]["iou_mean"] - summary["real"][name]["iou_mean"]
                added = setting.removeprefix("real+")
                markdown += f"\n\nAdding the {added} pairs to the real ones changed the IoU on {name} by {gain:+.4f}."
    return {"markdown": markdown, "eval_results": eval_results, "summary": summary}


def card_naming(pipeline, folder) -> Callable[[str], None]:
    """`push_folder`'s `name_repo` for a saved pipeline: its card written again, atomically, naming the full repo id."""

    def name_repo(repo_id: str) -> None:
        if not (Path(folder) / CARD_CONTEXT_FILE).exists():  # a card of unknown inputs is left as it is
            return
        if not card_is_as_rendered(pipeline, folder):  # rendered anew, it would lose its edits
            logger.warning(
                f"The card in {folder} was edited since it was written: left as it is, so its examples may not name "
                f"the repo {repo_id}."
            )
            return
        for path, text in model_card_files_naming(pipeline, folder, repo_id).items():
            write_text_atomically(path, text)

    return name_repo
