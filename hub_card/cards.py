"""Model and dataset cards for the Hub, rendered from the templates in this folder.

Cards only render what they are given: the results they show come from `polyp_diffusers.results`, and
uploading is `publish.py`'s job.
"""

import hashlib
import inspect
import json
import math
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

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
        else f"{num_problems} problem(s) were found, and no pair with a problem is in the dataset; see "
        "`validation_report.json`."
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
) -> str:
    """
    The README of a saved pipeline. `results` is the JSON written by the evaluation commands
    (`{"markdown": ..., "eval_results": [...]}`); without it the card says that nothing was measured.
    """
    unet = pipeline.unet
    mask_model = type(pipeline).__name__ == "PolypMaskPipeline"
    eval_results = [EvalResult(**entry) for entry in (results or {}).get("eval_results", [])]
    card_data = ModelCardData(
        library_name="diffusers",
        license="mit",
        pipeline_tag="unconditional-image-generation" if mask_model else "image-to-image",
        tags=[
            "diffusers",
            "polyp",
            "colonoscopy",
            "medical-imaging",
            "segmentation-masks" if mask_model else "mask-to-image",
            "ddpm",
            "polyp-diffusers",
        ],  # fmt: skip
        datasets=[dataset] if dataset else None,
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
        mask_channels=pipeline.mask_channels,
        pipeline_class=type(pipeline).__name__,
        block_out_channels=tuple(unet.config.block_out_channels),
        training_config=training_config,
        results_markdown=(results or {}).get("markdown"),
    )
    return str(card)


CARD_CONTEXT_FILE = "card.json"


# In `card.json` beside the inputs: the SHA-256 of the card as rendered, which tells a card edited since.
RENDERED_DIGEST = "rendered_readme_sha256"


def model_card_files(pipeline, folder, **context) -> dict[Path, str]:
    """
    The model card (`folder/README.md`) and its inputs (`card.json`, kept for later updates, with the rendered
    card's digest), inputs first. Rendered from the inputs as `card.json` keeps them (a tuple becomes a list).
    """
    folder = Path(folder)
    context = json.loads(json.dumps(context, default=str))
    readme = render_model_card(pipeline, **context)
    record = {**context, RENDERED_DIGEST: _digest(readme)}
    return {folder / CARD_CONTEXT_FILE: json.dumps(record, indent=2) + "\n", folder / "README.md": readme}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_model_card(pipeline, folder, **context) -> Path:
    """Writes `model_card_files` into a folder being made (a staging folder: no other process reads it yet)."""
    for path, text in model_card_files(pipeline, folder, **context).items():
        path.write_text(text)
    return Path(folder) / "README.md"


def _damaged_card_inputs(path: Path, problem) -> ValueError:
    return ValueError(
        f"{path}, the inputs of the card, is damaged ({problem}); restore it, or delete it to render the card from "
        "the model alone."
    )


def check_results_file(source: str, result) -> None:
    """
    Refuses, in one line naming what is wrong, a results file that is not as the evaluation commands write it
    (one edited by hand): it would fail deep in the card's metadata, or publish a metric that is not a number.
    """
    if not isinstance(result, dict) or not {"markdown", "eval_results"} <= set(result):
        raise ValueError(
            f"{source} holds {sorted(result) if isinstance(result, dict) else type(result).__name__}; expected "
            "'markdown' and 'eval_results' (the JSON of `polyp-ddpm fid --output`, `polyp-ddpm mask-fidelity "
            "--output`, training/compare_segmentation.py or `polyp-ddpm reproduce`'s report.json)."
        )
    if not isinstance(result["markdown"], str) or not isinstance(result["eval_results"], list):
        raise ValueError(f"{source}: 'markdown' must be text and 'eval_results' a list of model-index entries.")
    for index, entry in enumerate(result["eval_results"]):
        try:
            EvalResult(**entry)
        except (TypeError, ValueError) as error:  # not a mapping, a missing field, an unknown one
            raise ValueError(f"{source}: eval_results[{index}] is not a model-index entry ({error}).") from None
        value = entry["metric_value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{source}: eval_results[{index}] has metric_value {value!r}, not a finite number.")


def _card_context(folder) -> dict:
    """The inputs a saved pipeline's card was rendered from (`card.json`), or the folder's name alone without them."""
    context = _card_record(folder)
    context.pop(RENDERED_DIGEST, None)
    return context


def _card_record(folder) -> dict:
    """`card.json` as written (the card's inputs and its digest), checked; the folder's name alone without it."""
    context_path = Path(folder) / CARD_CONTEXT_FILE
    try:
        context = json.loads(context_path.read_text()) if context_path.exists() else {"repo_id": Path(folder).name}
    except ValueError as error:
        raise _damaged_card_inputs(context_path, error) from error
    card_inputs = set(inspect.signature(render_model_card).parameters) - {"pipeline"}
    if not isinstance(context, dict) or not {"repo_id"} <= set(context) <= card_inputs | {RENDERED_DIGEST}:
        raise _damaged_card_inputs(context_path, "not an object of the card's inputs")
    return context


def model_card_files_naming(pipeline, folder, repo_id: str) -> dict[Path, str]:
    """
    A saved pipeline's `model_card_files`, all as they were (results included) but for the repo id in its code: the
    full `USER/NAME` that the Hub gives a repo created by a bare name, such as the default, the folder's name.
    """
    return model_card_files(pipeline, folder, **{**_card_context(folder), "repo_id": repo_id})


def card_is_as_rendered(pipeline, folder) -> bool:
    """
    Whether a saved pipeline's card is still as it was rendered: not edited since. `card.json` keeps the rendered
    card's digest; one written by an earlier version, without it, is compared with its inputs rendered again.
    """
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return False
    context = _card_record(folder)
    if (recorded := context.pop(RENDERED_DIGEST, None)) is not None:
        return _digest(readme.read_text()) == recorded
    return readme.read_text() == render_model_card(pipeline, **context)


RESULTS_HEADING = "## Results"  # also "## Results (FID)", as a user may have renamed it


def _section_span(text: str, heading: str) -> tuple[int, int] | None:
    """
    Where the Markdown section under `heading` (a line that starts with it) lies in `text`: from its heading to the
    next `## ` heading outside a fenced code block, or the end.
    """
    start, position, fenced = None, 0, False
    for line in text.splitlines(keepends=True):
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and start is None and line.startswith(heading):
            start = position
        elif not fenced and start is not None and line.startswith("## "):
            return start, position
        position += len(line)
    return (start, len(text)) if start is not None else None


def with_results_of(edited: str, rendered: str) -> str:
    """
    An `edited` card with the results of a `rendered` one, its Results section and its model-index metadata;
    everything else, the edits (another license, sections of one's own), is kept, line endings too. A card
    without a Results section gets one at its end.
    """
    windows_lines = "\r\n" in edited
    card, new = ModelCard(edited.replace("\r\n", "\n")), ModelCard(rendered)
    card.data.eval_results, card.data.model_name = new.data.eval_results, new.data.model_name
    start, end = _section_span(new.text, RESULTS_HEADING)
    results = new.text[start:end].rstrip("\n") + "\n"
    if (old := _section_span(card.text, RESULTS_HEADING)) is None:
        card.text = card.text.rstrip("\n") + "\n\n" + results
    else:
        card.text = card.text[: old[0]] + results + ("\n" if old[1] < len(card.text) else "") + card.text[old[1] :]
    text = str(card) if card.data.to_dict() else card.text  # no empty metadata block where there was none
    return text.replace("\n", "\r\n") if windows_lines else text


def updated_model_card_files(pipeline, folder, results: dict[str, dict]) -> dict[Path, str]:
    """
    A saved pipeline's `model_card_files` with measured results, keyed by where each came from: each a
    `{"markdown", "eval_results"}` dict (`polyp_diffusers.results`), shown as Markdown sections in order and
    joined as model-index entries. A card edited since it was rendered keeps its edits (`with_results_of`). The
    caller writes them, atomically: the folder is a published model.
    """
    for source, result in results.items():
        check_results_file(source, result)
    edited = (Path(folder) / "README.md").is_file() and not card_is_as_rendered(pipeline, folder)
    context = _card_context(folder)
    context["results"] = {
        "markdown": "\n\n".join(result["markdown"] for result in results.values() if result["markdown"]),
        "eval_results": [entry for result in results.values() for entry in result["eval_results"]],
    }
    files = model_card_files(pipeline, folder, **context)
    if edited:
        readme = Path(folder) / "README.md"
        files[readme] = with_results_of(readme.read_text(), files[readme])
    return files
