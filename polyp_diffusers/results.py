"""Measured results as model-card material: a Markdown section and Hub model-index entries.

Every evaluation command writes `{"markdown": ..., "eval_results": [...]}` (plus its raw numbers), which
`polyp-ddpm card` puts into a saved pipeline's card.
"""

from pathlib import Path

from .data import parse_dataset_spec

METRIC_NAMES = {"iou": "IoU", "dice": "Dice"}


def fid_results(scores: dict) -> dict:
    """FID/KID scores (from `polyp_diffusers.metrics.fid_kid`) as a card section and model-index entries."""
    dataset = Path(parse_dataset_spec(scores["real"])[0]).name
    markdown = (
        f"### Image realism ({scores['num_generated']} generated vs {scores['num_real']} real images of "
        f"`{scores['real']}`, {scores['features']})\n"
        "| FID | KID (mean ± std) |\n| --- | --- |\n"
        f"| {scores['fid']:.2f} | {scores['kid_mean']:.4f} ± {scores['kid_std']:.4f} |"
    )
    common = dict(task_type="image-to-image", dataset_type=dataset, dataset_name=dataset)
    return {
        "markdown": markdown,
        "eval_results": [
            dict(common, metric_type="fid", metric_name="FID", metric_value=round(scores["fid"], 3)),
            dict(common, metric_type="kid", metric_name="KID", metric_value=round(scores["kid_mean"], 5)),
        ],
    }


def segmentation_results(runs: dict[str, dict]) -> dict:
    """The downstream benchmark (one results.json per training set) as a Markdown table and model-index entries."""
    first = next(iter(runs.values()))
    test_names = list(first["test"])
    header = "| trained on | pairs | " + " | ".join(f"{name} IoU | {name} Dice" for name in test_names) + " |"
    rows = [header, "|" + " --- |" * (2 + 2 * len(test_names))]
    eval_results = []
    for setting, run in runs.items():
        cells = [setting, str(run["num_train_pairs"])]
        for name in test_names:
            scores = run["test"][name]
            cells += [f"{scores['iou']:.4f}", f"{scores['dice']:.4f}"]
            dataset, split = parse_dataset_spec(name)
            for metric in ("iou", "dice"):
                eval_results.append(
                    dict(
                        task_type="image-segmentation",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split=split,
                        metric_type=metric,
                        metric_name=f"{run['segmenter_family']} {METRIC_NAMES[metric]}, trained on {setting}",
                        metric_value=round(scores[metric], 4),
                    )
                )
        rows.append("| " + " | ".join(cells) + " |")
    config = first["config"]
    markdown = (
        f"### Downstream segmentation ({first['segmenter']}, {config['max_train_steps']} steps of batch "
        f"{config['train_batch_size']} at {config['resolution']} px for every training set, best checkpoint by "
        "IoU on held-out real pairs; mean per-image scores)\n" + "\n".join(rows)
    )
    return {"markdown": markdown, "eval_results": eval_results}
