"""Model and dataset cards for the Hub, rendered from the templates in this folder."""

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

TEMPLATES = Path(__file__).parent
PAPER_URL = "https://arxiv.org/abs/2402.04031"
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
    synthetic: bool = False,
    resolution: int | None = None,
    license_note: str | None = None,
    title: str = "Polyp image/mask pairs",
) -> str:
    """The README of a prepared dataset: its source, license note, counts per split and how it was split."""
    total = sum(counts.values())
    card_data = DatasetCardData(
        task_categories=["image-segmentation"],
        tags=["medical", "colonoscopy", "polyp", "synthetic" if synthetic else "polyp-segmentation"],
        size_categories=["n<1K" if total < 1000 else "1K<n<10K" if total < 10000 else "10K<n<100K"],
        license="other" if not synthetic else "mit",
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
        synthetic=synthetic,
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
