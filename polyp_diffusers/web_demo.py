"""The web demo (`polyp-ddpm demo`): draw, upload or pick a mask in a browser, get polyp images with their masks.

A Gradio app. Its pieces are plain functions (`read_mask`, `check_mask`, `generate_pairs`, `write_pairs`) so that
tests call them without a browser; `build_demo` wires them to the page, `write_space` makes a Hub Space of it.
Gradio is the optional `[demo]` extra: only the `demo` command imports this module.
"""

import importlib.metadata
import io
import numbers
import shutil
import signal
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import PIL.Image
import torch

from .choices import SAMPLERS
from .data import is_hub_id
from .folders import check_is_folder
from .generate import DTYPES, load_pipeline, seeded_generators
from .modeling import default_device, make_sampler
from .pipelines import PolypDDPMPipeline, PolypDDPMPipelineOutput, prepare_masks
from .pipelines.pipeline_polyp_ddpm import MAX_POLYP_FRACTION, check_positive_int, resize_masks

EXAMPLE_MASKS_DIR = Path(__file__).parent / "example_masks"
# Larger masks are refused before any work: the model sees 64-256 px, and a huge image only costs memory.
MAX_MASK_SIDE = 4096
MAX_UPLOAD_SIZE = "10mb"
MAX_IMAGES = 8
# Steps a sampler starts with when picked: the trained chain for DDPM, what works for the faster solvers.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpmsolver": 25}
SAMPLER_LABELS = {"ddpm": "DDPM (as trained)", "ddim": "DDIM", "dpmsolver": "DPM-Solver++"}
CANVAS_SIDE = 512
CANVAS_HEIGHT = 420
BRUSH_RADIUS = 24
MASK_VIEW_SIDE = 256
GALLERY_HEIGHT = 620  # two rows of two: the default four images without scrolling
# The tab a mask comes from: what the page sends as `mask_source`.
MASK_FROM_FILE = "file"
MASK_FROM_DRAWING = "drawing"
EMPTY_MASK_MESSAGE = (
    "The mask is empty: draw a polyp in white on the black canvas, upload a mask (white polyp on black), or pick "
    "an example."
)
NO_UPLOAD_MESSAGE = "No mask: upload one (white polyp on black) or pick an example, or draw one on the Draw tab."


def example_masks() -> list[Path]:
    """The masks shipped with the app, for its examples."""
    return sorted(EXAMPLE_MASKS_DIR.glob("*.png"))


def read_mask(mask_source: str, drawing: dict | None, upload: str | None) -> PIL.Image.Image:
    """
    The mask on the tab the visitor is on: the drawing (the canvas's composite, white strokes over black) or the
    uploaded file as it is (its own mode: palette, 16 bits, alpha), opened lazily so that its size is checked
    before its pixels are decoded.
    """
    if mask_source == MASK_FROM_DRAWING:
        mask = None if drawing is None else drawing.get("composite")
        if mask is None:
            raise ValueError(EMPTY_MASK_MESSAGE)
        return mask
    if mask_source != MASK_FROM_FILE:
        raise ValueError(f"mask_source is {mask_source!r}; expected {MASK_FROM_FILE!r} or {MASK_FROM_DRAWING!r}.")
    if upload is None:
        raise ValueError(NO_UPLOAD_MESSAGE)
    try:
        return PIL.Image.open(upload)
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"The uploaded mask {Path(upload).name} cannot be read as an image: {error}") from error


def check_mask(mask: PIL.Image.Image, model_size: tuple[int, int]) -> torch.Tensor:
    """
    Refuses what the pipeline refuses, with its messages, and what in a demo is almost certainly a mistake: an
    empty mask (the pipeline takes it as polyp-free mucosa), a polyp too small to survive the resize to the
    model's size, a huge image. Returns the mask as the model sees it: `(1, 1, height, width)` in {0, 1}.
    """
    height, width = model_size
    if max(mask.size) > MAX_MASK_SIDE:
        raise ValueError(
            f"The mask is {mask.width}x{mask.height} pixels; this demo takes masks of at most {MAX_MASK_SIDE} "
            f"pixels a side (the model sees {width}x{height})."
        )
    binary = prepare_masks(mask, (mask.height, mask.width))
    if not binary.any():
        raise ValueError(EMPTY_MASK_MESSAGE)
    model_mask = resize_masks(binary, model_size)  # binary already: no second check of its levels
    if not model_mask.any():
        raise ValueError(
            f"The polyp is too small: it vanishes when the mask is resized to the model's {width}x{height} pixels. "
            "Draw it larger."
        )
    return model_mask


def generate_pairs(
    pipeline: PolypDDPMPipeline,
    model_mask: torch.Tensor,
    num_images: int,
    sampler: str,
    num_inference_steps: int,
    seed: int,
    trained_scheduler_config,
) -> PolypDDPMPipelineOutput:
    """
    `num_images` images of one mask. Image i uses seed `seed + i` on the pipeline's device, as in `polyp-ddpm
    generate`, so an image does not depend on how many are asked for and is the one `generate` makes. Sets the
    pipeline's scheduler: one call at a time.
    """
    check_positive_int(num_images, "num_images")
    if num_images > MAX_IMAGES:
        raise ValueError(
            f"num_images is {num_images}; this demo makes at most {MAX_IMAGES} at a time (`polyp-ddpm generate` "
            "makes any number)."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed is {seed!r}; expected a whole number of at least 0 (image i uses seed + i).")
    pipeline.scheduler = make_sampler(sampler, trained_scheduler_config)
    generators = seeded_generators(pipeline.device, [seed + index for index in range(num_images)])
    return pipeline(
        model_mask, num_images_per_mask=num_images, num_inference_steps=num_inference_steps, generator=generators
    )


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(output: PolypDDPMPipelineOutput, seeds: list[int], folder: Path) -> list[Path]:
    """One zip per image holding the image and its mask (its exact label), named by seed."""
    paths = []
    for image, mask, seed in zip(output.images, output.masks, seeds):
        path = folder / f"polyp-seed{seed}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"polyp-seed{seed}-image.png", _png_bytes(image))
            archive.writestr(f"polyp-seed{seed}-mask.png", _png_bytes(mask))
        paths.append(path)
    return paths


def build_demo(pipeline: PolypDDPMPipeline, model_name: str) -> gr.Blocks:
    """
    The page: a mask (an example or an upload on one tab, a drawing on the other), the sampling controls, and a
    gallery with downloadable image/mask pairs. On a GPU the default is the trained 250-step DDPM chain; elsewhere
    DPM-Solver++ in 25 steps.
    """
    trained_scheduler_config = pipeline.scheduler.config
    height, width = pipeline.sample_size
    device = pipeline.device.type
    default_sampler = "ddpm" if device == "cuda" else "dpmsolver"
    # Each call replaces the previous call's zips: Gradio has copied them to its own cache by then.
    pairs_folder = tempfile.TemporaryDirectory(prefix="polyp-ddpm-demo-")

    # Gradio finds the progress bar among the defaults; it follows the pipeline's own (tqdm) bar, step by step.
    def generate(
        mask_source,
        drawing,
        upload,
        num_images,
        sampler,
        num_inference_steps,
        seed,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008
    ):
        try:
            model_mask = check_mask(read_mask(mask_source, drawing, upload), pipeline.sample_size)
            if model_mask.mean() > MAX_POLYP_FRACTION:
                gr.Warning(f"The mask is over {MAX_POLYP_FRACTION:.0%} polyp: is it inverted (white is the polyp)?")
            # Ints as the page sends them (precision 0); None from a cleared box is refused by name.
            output = generate_pairs(
                pipeline, model_mask, num_images, sampler, num_inference_steps, seed, trained_scheduler_config
            )
        except ValueError as error:
            raise gr.Error(str(error)) from error
        except OSError as error:  # an upload that opens but whose pixels do not decode (a truncated file)
            raise gr.Error(f"The uploaded mask cannot be read: {error}") from error
        seeds = [seed + index for index in range(len(output.images))]
        folder = Path(pairs_folder.name)
        for old in folder.iterdir():
            old.unlink()
        pairs = write_pairs(output, seeds, folder)
        gallery = [(image, f"seed {image_seed}") for image, image_seed in zip(output.images, seeds)]
        # Shown enlarged by a whole factor without smoothing, so that every model pixel is seen; the zips hold
        # the mask at the model's size.
        zoom = max(1, MASK_VIEW_SIDE // max(height, width))
        mask_view = output.masks[0].resize((width * zoom, height * zoom), PIL.Image.Resampling.NEAREST)
        return gallery, mask_view, [str(path) for path in pairs]

    with gr.Blocks(title="Polyp-DDPM", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Polyp-DDPM: colonoscopy polyp images from a mask\n"
            "Pick an example mask, upload one, or draw where the polyp should be (white on black). Every image comes "
            "with its mask, an exact segmentation label. "
            f"Model `{model_name}`, {width}x{height} px, on {device}. Synthetic images for research, not for diagnosis."
        )
        with gr.Row():
            with gr.Column():
                # Sent with every request: the tab the visitor is on says which mask to use.
                mask_source = gr.Radio([MASK_FROM_FILE, MASK_FROM_DRAWING], value=MASK_FROM_FILE, visible=False)
                with gr.Tabs():
                    # Examples fill a plain image, not the canvas: in Gradio 6.31 a canvas that an example is loaded
                    # into after a generation can go on sending its previous content.
                    with gr.Tab("Example or upload") as file_tab:
                        upload = gr.Image(
                            value=str(example_masks()[0]),
                            label="Mask (white = polyp)",
                            type="filepath",
                            image_mode=None,
                            sources=("upload", "clipboard"),
                            height=CANVAS_HEIGHT,
                        )
                        gr.Examples(
                            examples=[[str(path)] for path in example_masks()],
                            inputs=upload,
                            example_labels=[path.stem.replace("-", " ") for path in example_masks()],
                            label="Example masks",
                        )
                    with gr.Tab("Draw") as drawing_tab:
                        drawing = gr.ImageEditor(
                            value=PIL.Image.new("RGB", (CANVAS_SIDE, CANVAS_SIDE), "black"),
                            label="Draw the polyp in white",
                            type="pil",
                            format="png",
                            sources=(),
                            brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#ffffff"], color_mode="fixed"),
                            eraser=gr.Eraser(default_size=BRUSH_RADIUS),
                            transforms=(),
                            layers=False,
                            canvas_size=(CANVAS_SIDE, CANVAS_SIDE),
                            height=CANVAS_HEIGHT,
                        )
                model_mask_view = gr.Image(
                    label=f"The mask as the model sees it ({width}x{height})", format="png", height=MASK_VIEW_SIDE
                )
            with gr.Column():
                with gr.Row():
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, precision=0, label="Images")
                    seed = gr.Number(0, precision=0, minimum=0, maximum=2**32 - 1, label="Seed (image i: seed + i)")
                with gr.Group():
                    sampler = gr.Radio(
                        [(SAMPLER_LABELS[name], name) for name in SAMPLERS], value=default_sampler, label="Sampler"
                    )
                    num_inference_steps = gr.Slider(
                        1,
                        trained_scheduler_config.num_train_timesteps,
                        value=DEFAULT_STEPS[default_sampler],
                        step=1,
                        precision=0,
                        label="Steps",
                    )
                run = gr.Button("Generate", variant="primary")
                gallery = gr.Gallery(
                    label="Generated images",
                    elem_id="generated-images",
                    columns=2,
                    height=GALLERY_HEIGHT,
                    format="png",
                    object_fit="contain",
                )
                pairs = gr.File(label="Downloads: each image with its mask (zip)", file_count="multiple")
        file_tab.select(lambda: MASK_FROM_FILE, None, mask_source, api_visibility="private")
        drawing_tab.select(lambda: MASK_FROM_DRAWING, None, mask_source, api_visibility="private")
        sampler.change(lambda name: DEFAULT_STEPS[name], sampler, num_inference_steps, api_visibility="private")
        # One call at a time: they share the pipeline, whose scheduler each call sets.
        run.click(
            generate,
            [mask_source, drawing, upload, num_images, sampler, num_inference_steps, seed],
            [gallery, model_mask_view, pairs],
            api_name="generate",
            concurrency_limit=1,
        )
    return demo


def launch_demo(
    model: str,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    device: str | None = None,
    dtype: str = "fp32",
) -> None:
    """Loads the pipeline and serves the demo until interrupted. `host`/`port` None: Gradio's (or a Space's) own."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype is {dtype!r}; expected one of {sorted(DTYPES)}.")
    pipeline = load_pipeline(model)
    pipeline.to(device or default_device(), DTYPES[dtype])
    # A stop (docker, systemd, a Space restarting) closes the server as Ctrl-C does: its temporary pairs are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    build_demo(pipeline, model).launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD_SIZE)


SPACE_APP = '''"""Hugging Face Space: the Polyp-DDPM web demo, written by `polyp-ddpm demo --write-space`."""

import os

from polyp_diffusers.web_demo import launch_demo

launch_demo(os.environ.get("POLYP_DDPM_MODEL", "{model}"))
'''

SPACE_README = """---
title: Polyp-DDPM
emoji: 🩺
colorFrom: red
colorTo: pink
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
license: mit
models:
  - {model}
short_description: Colonoscopy polyp images from a mask (Polyp-DDPM)
---

# Polyp-DDPM

Draw a polyp mask (white on black), upload one or pick an example, and get colonoscopy images with a polyp exactly
where the mask says: image/mask pairs for training segmentation models. The model is
[{model}](https://huggingface.co/{model}), a mask-conditioned DDPM (Dorjsembe et al., *Polyp-DDPM*, EMBC 2024,
[arXiv:2402.04031](https://arxiv.org/abs/2402.04031)). Set the variable `POLYP_DDPM_MODEL` to serve another one.

Synthetic images for research, not for diagnosis.
"""


def _space_requirements() -> list[str]:
    """The package's own dependencies as installed (a Space installs Gradio itself, at `sdk_version`)."""
    requirements = importlib.metadata.requires("polyp-diffusers") or []
    return [requirement for requirement in requirements if ";" not in requirement]


def write_space(folder: str | Path, model: str) -> Path:
    """
    Writes a Hugging Face Space that serves this demo for `model` (a Hub id): `app.py`, `requirements.txt`, a
    README with the Space's front matter, and a copy of this package, which the Space imports from its folder.
    """
    if Path(model).exists() or not is_hub_id(model):
        raise ValueError(
            f"--model {model} is not a Hub model id (owner/name): a Space loads its model from the Hub. Upload the "
            "model first (train.py --push_to_hub, or convert-official --push-to-hub) and pass its id."
        )
    folder = Path(folder)
    check_is_folder(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; choose a new or empty folder for the Space.")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(__file__).parent, folder / "polyp_diffusers", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "app.py").write_text(SPACE_APP.format(model=model))
    (folder / "requirements.txt").write_text("\n".join(_space_requirements()) + "\n")
    (folder / "README.md").write_text(SPACE_README.format(gradio_version=gr.__version__, model=model))
    return folder
