"""Model and dataset cards for the Hub, rendered from the templates in this folder."""

import json
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

TEMPLATES = Path(__file__).parent
PAPER_URL = "https://arxiv.org/abs/2402.04031"
DEMO_NOTE = (
    "**Synthetic smoke-test data.** Every image here was drawn procedurally by `polyp-diffusers` "
    "(`polyp-ddpm prepare-data demo`): colonoscopy-like colours and shapes, no patient data, no medical meaning. "
    "Use it to check that code runs, never to train or judge a model."
)
GENERATED_NOTE = (
    "**Generated images.** Every image here was synthesized by a Polyp-DDPM model from a real mask; they are "
    "not patient images. Use them to augment segmentation training data, and always score on real test data."
)
KVASIR_LICENSE_NOTE = (
    "Kvasir-SEG (Jha et al., MMM 2020, Simula) may be used for research and education; cite "
    "\"Kvasir-SEG: A Segmented Polyp Dataset\" when you use it. Check the terms of the original release "
    "before redistributing."
)


def render_dataset_card(
    counts: dict[str, int],
    source_description: str,
    split_description: str,
    num_problems: int = 0,
    synthetic_note: str | None = None,
    license: str = "other",
    resolution: int | None = None,
    license_note: str | None = None,
    title: str = "Polyp image/mask pairs",
) -> str:
    """
    The README of a prepared dataset: its source, license note, counts per split and how it was split.
    `synthetic_note` marks data that are not real patient images, and says what they are for.
    """
    synthetic = synthetic_note is not None
    total = sum(counts.values())
    card_data = DatasetCardData(
        task_categories=["image-segmentation"],
        tags=["medical", "colonoscopy", "polyp", "synthetic" if synthetic else "polyp-segmentation"],
        size_categories=["n<1K" if total < 1000 else "1K<n<10K" if total < 10000 else "10K<n<100K"],
        license=license,
    )
    problem_summary = (
        "every pair was checked; none had a problem."
        if not num_problems
        else f"{num_problems} problem(s) were found and the affected pairs left out; see `validation_report.json`."
    )
    card = DatasetCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "dataset_card.md"),
        title=title,
        synthetic_note=synthetic_note,
        source_description=source_description,
        license_note=license_note,
        counts=counts,
        split_description=split_description,
        resolution=resolution,
        problem_summary=problem_summary,
    )
    return str(card)


def render_model_card(
    pipeline,
    repo_id: str,
    model_name: str = "Polyp-DDPM",
    training_config: dict | None = None,
    dataset: str | None = None,
    results: dict | None = None,
    provenance: str | None = None,
    base_model: str | None = None,
) -> str:
    """
    The README of a saved pipeline. `results` is the JSON written by the evaluation commands
    (`{"markdown": ..., "eval_results": [...]}`); without it the card says that nothing was measured.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    unet = pipeline.unet
    eval_results = [EvalResult(**entry) for entry in (results or {}).get("eval_results", [])]
    card_data = ModelCardData(
        library_name="diffusers",
        license="mit",
        pipeline_tag="image-to-image",
        tags=["diffusers", "polyp", "colonoscopy", "medical-imaging", "mask-to-image", "ddpm", "polyp-diffusers"],
        datasets=[dataset] if dataset else None,
        base_model=base_model,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "model_card.md"),
        model_name=model_name,
        repo_id=repo_id,
        paper_url=PAPER_URL,
        provenance=provenance,
        image_size=unet.config.sample_size,
        polyp_box=(unet.config.sample_size * 5 // 16, unet.config.sample_size * 11 // 16),
        num_train_timesteps=pipeline.scheduler.config.num_train_timesteps,
        num_parameters=f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M",
        in_channels=unet.config.in_channels,
        mask_channels=unet.config.in_channels - unet.config.out_channels,
        block_out_channels=tuple(unet.config.block_out_channels),
        training_config=training_config,
        results_markdown=(results or {}).get("markdown"),
    )
    return str(card)


CARD_CONTEXT_FILE = "card.json"
METRIC_NAMES = {"iou": "IoU", "dice": "Dice"}


def write_model_card(pipeline, folder, **context) -> Path:
    """Renders the model card into `folder/README.md` and keeps its inputs in `card.json` for later updates."""
    folder = Path(folder)
    (folder / "README.md").write_text(render_model_card(pipeline, **context))
    (folder / CARD_CONTEXT_FILE).write_text(json.dumps(context, indent=2, default=str) + "\n")
    return folder / "README.md"


def merge_results(results: list[dict]) -> dict:
    """Several results files (FID/KID, segmentation) as one: Markdown sections in order, eval results joined."""
    return {
        "markdown": "\n\n".join(r["markdown"] for r in results if r.get("markdown")),
        "eval_results": [entry for r in results for entry in r.get("eval_results", [])],
    }


def update_model_card(model_dir, result_paths: list) -> Path:
    """Re-renders a saved pipeline's card with measured results (their Markdown and model-index entries)."""
    from polyp_diffusers import PolypDDPMPipeline

    folder = Path(model_dir)
    context_path = folder / CARD_CONTEXT_FILE
    context = json.loads(context_path.read_text()) if context_path.exists() else {"repo_id": folder.name}
    results = []
    for path in result_paths:
        loaded = json.loads(Path(path).read_text())
        if "markdown" not in loaded or "eval_results" not in loaded:
            raise ValueError(f"{path} has no 'markdown' and 'eval_results'; expected the JSON of `polyp-ddpm fid "
                             "--output` or training/compare_segmentation.py.")
        results.append(loaded)
    context["results"] = merge_results(results)
    return write_model_card(PolypDDPMPipeline.from_pretrained(folder), folder, **context)


def fid_results(scores: dict) -> dict:
    """FID/KID scores (from `polyp_diffusers.metrics.fid_kid`) as a card section and model-index entries."""
    dataset = Path(scores["real"].split(":")[0]).name
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
            dataset = name.split(":")[0]
            for metric in ("iou", "dice"):
                eval_results.append(dict(
                    task_type="image-segmentation", dataset_type=dataset, dataset_name=dataset,
                    dataset_split=name.split(":")[1], metric_type=metric,
                    metric_name=f"UNet++ {METRIC_NAMES[metric]}, trained on {setting}",
                    metric_value=round(scores[metric], 4),
                ))
        rows.append("| " + " | ".join(cells) + " |")
    config = first["config"]
    markdown = (
        f"### Downstream segmentation ({first['segmenter']}, {config['max_train_steps']} steps of batch "
        f"{config['train_batch_size']} at {config['resolution']} px for every training set, best checkpoint by "
        "IoU on held-out real pairs; mean per-image scores)\n" + "\n".join(rows)
    )
    return {"markdown": markdown, "eval_results": eval_results}


def push_folder(folder, repo_id: str, private: bool = False, ignore_patterns: list[str] | None = None,
                commit_message: str = "Upload Polyp-DDPM pipeline") -> str:
    """Creates the Hub model repo if needed and uploads a saved pipeline folder with its card; returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, private=private).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns)
    return repo_id


def push_dataset(dataset, card: str, repo_id: str) -> None:
    """Uploads a DatasetDict and its card to a Hub dataset repo."""
    dataset.push_to_hub(repo_id)
    DatasetCard(card).push_to_hub(repo_id)
