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
