"""The web demo as visitors and API clients meet it: a real server in a subprocess with the tiny model, driven over
HTTP with gradio_client and, once, in a headless chromium; its pieces (mask checks, the Space) called directly."""

import contextlib
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile

import numpy as np
import PIL.Image
import pytest

import polyp_diffusers
from polyp_diffusers import prepare_masks
from polyp_diffusers.cli import main as polyp_ddpm

from .conftest import REPO_ROOT

gradio_client = pytest.importorskip("gradio_client", reason="the web demo needs the [demo] extra (gradio)")
web_demo = pytest.importorskip("polyp_diffusers.web_demo", reason="the web demo needs the [demo] extra (gradio)")

MODEL_SIZE = (32, 32)
STARTUP_SECONDS = 180
FAST = dict(sampler="ddim", num_inference_steps=2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(command, cwd=None, **env):
    """Runs a command that serves the demo and yields its URL once it serves; its output says why it did not."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", **env}
    server = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in server.stdout] + [lines.put(None)], daemon=True
    ).start()
    log = []
    try:
        while (line := lines.get(timeout=STARTUP_SECONDS)) is not None:
            log.append(line)
            if found := re.search(r"Running on local URL:\s+(\S+)", line):
                yield found.group(1)
                return
        pytest.fail("the demo exited before serving:\n" + "".join(log))
    except queue.Empty:
        pytest.fail(f"the demo did not serve within {STARTUP_SECONDS} s:\n" + "".join(log))
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def demo_url(saved_pipeline_dir):
    """`polyp-ddpm demo` serving the tiny model, started as a user starts it."""
    command = [sys.executable, "-m", "polyp_diffusers.cli", "demo", "--model", str(saved_pipeline_dir)]
    with serving([*command, "--port", str(free_port()), "--device", "cpu"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(demo_url, tmp_path_factory):
    return gradio_client.Client(demo_url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def generate(client, mask_path, num_images=2, seed=0):
    """Asks for images of a mask file, as the page does for an upload or an example; returns (images as arrays,
    captions, pair zip paths)."""
    gallery, _, pairs = client.predict(
        web_demo.MASK_FROM_FILE,
        None,
        gradio_client.handle_file(str(mask_path)),
        num_images,
        FAST["sampler"],
        FAST["num_inference_steps"],
        seed,
        api_name="/generate",
    )
    images = [np.asarray(PIL.Image.open(item["image"])) for item in gallery]
    return images, [item["caption"] for item in gallery], pairs


def save_png(array, path):
    PIL.Image.fromarray(array).save(path)
    return path


# Over HTTP ------------------------------------------------------------------------------------------------------


def test_an_example_mask_gives_the_requested_images_each_with_its_mask(client):
    example = web_demo.example_masks()[0]
    images, captions, pairs = generate(client, example, num_images=3, seed=7)
    assert [image.shape for image in images] == [(*MODEL_SIZE, 3)] * 3
    assert captions == ["seed 7", "seed 8", "seed 9"]
    expected_mask = prepare_masks(PIL.Image.open(example), MODEL_SIZE)[0, 0].numpy() * 255
    for image, pair, seed in zip(images, pairs, (7, 8, 9)):
        with zipfile.ZipFile(pair) as archive:
            assert sorted(archive.namelist()) == [f"polyp-seed{seed}-image.png", f"polyp-seed{seed}-mask.png"]
            with archive.open(f"polyp-seed{seed}-image.png") as stored_image:
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(stored_image)), image)
            with archive.open(f"polyp-seed{seed}-mask.png") as stored_mask:
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(stored_mask)), expected_mask)


def test_a_seed_gives_the_same_images_and_image_i_uses_seed_plus_i(client):
    example = web_demo.example_masks()[0]
    first, _, _ = generate(client, example, num_images=2, seed=3)
    again, _, _ = generate(client, example, num_images=2, seed=3)
    second_alone, _, _ = generate(client, example, num_images=1, seed=4)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], second_alone[0])
    assert not np.array_equal(first[0], first[1])


def test_an_uploaded_mask_file_of_any_size_is_resized_to_the_model(client, tmp_path):
    mask = np.zeros((90, 140), dtype=np.uint8)
    mask[20:70, 30:100] = 255
    images, _, pairs = generate(client, save_png(mask, tmp_path / "my-mask.png"), num_images=1)
    assert images[0].shape == (*MODEL_SIZE, 3)
    with zipfile.ZipFile(pairs[0]) as archive, archive.open("polyp-seed0-mask.png") as stored_mask:
        assert PIL.Image.open(stored_mask).size == MODEL_SIZE


def test_a_colour_photo_as_a_mask_gets_the_pipelines_message(client, tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    with pytest.raises(
        gradio_client.exceptions.AppError, match="is a colour image.*expected a binary segmentation mask"
    ):
        generate(client, save_png(photo, tmp_path / "photo.png"))


def test_a_truncated_upload_is_refused_as_unreadable(client, tmp_path):
    whole = save_png(np.full((64, 64), 255, dtype=np.uint8), tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(gradio_client.exceptions.AppError, match="The uploaded mask cannot be read"):
        generate(client, tmp_path / "truncated.png")


def test_an_empty_canvas_is_refused_with_a_request_to_draw_a_polyp(client, tmp_path):
    black = gradio_client.handle_file(str(save_png(np.zeros((64, 64), dtype=np.uint8), tmp_path / "black.png")))
    canvas = {"background": black, "layers": [], "composite": black}
    with pytest.raises(gradio_client.exceptions.AppError, match="The mask is empty: draw a polyp"):
        client.predict(
            web_demo.MASK_FROM_DRAWING,
            canvas,
            None,
            1,
            FAST["sampler"],
            FAST["num_inference_steps"],
            0,
            api_name="/generate",
        )


def test_a_cleared_seed_box_is_refused_with_a_request_for_a_seed(client):
    with pytest.raises(gradio_client.exceptions.AppError, match="seed is None; expected a whole number"):
        generate(client, web_demo.example_masks()[0], seed=None)


# In a browser ---------------------------------------------------------------------------------------------------


def test_a_visitor_gets_images_from_an_example_and_from_a_drawing_in_a_real_browser(demo_url, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [dev] extra)")
    gallery_images = "#generated-images img"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(demo_url)
        page.get_by_text("two polyps").click()
        page.wait_for_load_state("networkidle")  # the example is in the mask image
        page.get_by_role("button", name="Generate").click()
        sync_api.expect(page.locator(gallery_images)).to_have_count(4, timeout=120_000)
        screenshot = tmp_path / "web-demo.png"
        page.screenshot(path=screenshot, full_page=True)
        example_image = page.locator(gallery_images).first.get_attribute("src")

        page.get_by_role("tab", name="Draw").click()
        canvas = page.locator("canvas").first.bounding_box()
        x, y = canvas["x"] + canvas["width"] / 3, canvas["y"] + canvas["height"] / 3
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + canvas["width"] / 4, y + canvas["height"] / 6, steps=10)
        page.mouse.up()
        page.get_by_role("button", name="Generate").click()
        sync_api.expect(page.locator(gallery_images).first).not_to_have_attribute("src", example_image, timeout=120_000)
        sync_api.expect(page.locator(gallery_images)).to_have_count(4)
        browser.close()
    assert PIL.Image.open(screenshot).width == 1280


# The pieces, called directly ------------------------------------------------------------------------------------


def test_the_example_masks_are_small_valid_masks_with_a_polyp():
    examples = web_demo.example_masks()
    assert 3 <= len(examples) <= 4
    for path in examples:
        assert path.stat().st_size < 5000, path
        assert web_demo.check_mask(PIL.Image.open(path), MODEL_SIZE).any(), path


def test_a_huge_mask_is_refused_before_any_work():
    with pytest.raises(ValueError, match="The mask is 5000x10 pixels; this demo takes masks of at most 4096"):
        web_demo.check_mask(PIL.Image.new("L", (5000, 10)), MODEL_SIZE)


def test_a_polyp_that_vanishes_at_the_model_size_is_refused():
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[3, 3] = 255
    with pytest.raises(ValueError, match="too small: it vanishes .* 32x32 pixels"):
        web_demo.check_mask(PIL.Image.fromarray(mask), MODEL_SIZE)


def test_a_missing_or_unreadable_mask_is_named(tmp_path):
    with pytest.raises(ValueError, match="The mask is empty"):
        web_demo.read_mask(web_demo.MASK_FROM_DRAWING, None, None)
    with pytest.raises(ValueError, match="No mask: upload one"):
        web_demo.read_mask(web_demo.MASK_FROM_FILE, None, None)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="The uploaded mask notes.png cannot be read as an image"):
        web_demo.read_mask(web_demo.MASK_FROM_FILE, None, str(tmp_path / "notes.png"))


def test_too_many_images_are_refused_with_the_limit(tiny_pipeline, square_mask):
    mask = web_demo.check_mask(PIL.Image.fromarray(square_mask), MODEL_SIZE)
    config = tiny_pipeline.scheduler.config
    with pytest.raises(ValueError, match=f"num_images is {web_demo.MAX_IMAGES + 1}; this demo makes at most"):
        web_demo.generate_pairs(
            tiny_pipeline, mask, web_demo.MAX_IMAGES + 1, seed=0, **FAST, trained_scheduler_config=config
        )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(num_images=None), "num_images is None"),
        (dict(num_inference_steps=None), "num_inference_steps is None"),
        (dict(num_inference_steps=251), "num_inference_steps is 251; the model's schedule has 250 steps"),
        (dict(seed=None), "seed is None; expected a whole number"),
    ],
)
def test_a_cleared_box_or_more_steps_than_the_schedule_is_refused_by_name(tiny_pipeline, square_mask, setting, message):
    mask = web_demo.check_mask(PIL.Image.fromarray(square_mask), MODEL_SIZE)
    arguments = dict(num_images=1, seed=0, **FAST, trained_scheduler_config=tiny_pipeline.scheduler.config)
    with pytest.raises(ValueError, match=message):
        web_demo.generate_pairs(tiny_pipeline, mask, **{**arguments, **setting})


def test_the_space_folder_builds_the_same_app_for_a_hub_model(tmp_path):
    space = web_demo.write_space(tmp_path / "space", "someone/polyp-ddpm")
    app = (space / "app.py").read_text()
    assert "launch_demo(" in app and '"someone/polyp-ddpm"' in app and "POLYP_DDPM_MODEL" in app
    compile(app, "app.py", "exec")
    front_matter = (space / "README.md").read_text().split("---")[1]
    for field in ("sdk: gradio", f"sdk_version: {web_demo.gr.__version__}", "app_file: app.py", "license: mit"):
        assert field in front_matter
    assert re.search(r"^title: ", front_matter, re.MULTILINE)
    requirements = (space / "requirements.txt").read_text().split()
    assert any(line.startswith("diffusers") for line in requirements) and not any("extra" in r for r in requirements)
    assert (space / "polyp_diffusers" / "web_demo.py").is_file()
    assert (space / "polyp_diffusers" / "pipelines" / "pipeline_polyp_ddpm.py").is_file()
    assert len(list((space / "polyp_diffusers" / "example_masks").glob("*.png"))) == len(web_demo.example_masks())


def test_the_space_app_serves_the_demo_from_its_own_copy_of_the_package(tmp_path, saved_pipeline_dir):
    space = web_demo.write_space(tmp_path / "space", "someone/polyp-ddpm")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    model = {"POLYP_DDPM_MODEL": str(saved_pipeline_dir), "GRADIO_SERVER_PORT": str(free_port())}
    with serving([sys.executable, "app.py"], cwd=space, TMPDIR=str(temporary), **model) as url:
        client = gradio_client.Client(url, verbose=False, download_files=str(tmp_path))
        images, _, _ = generate(client, web_demo.example_masks()[0], num_images=1)
        assert list(temporary.glob("polyp-ddpm-demo-*/*.zip"))
    assert images[0].shape == (*MODEL_SIZE, 3)
    # Stopped by SIGTERM, it removed the pairs it wrote (before, every stopped demo left them in /tmp).
    assert not list(temporary.glob("polyp-ddpm-demo-*"))


def test_a_space_needs_a_hub_model_id_and_a_new_folder(tmp_path, saved_pipeline_dir):
    with pytest.raises(ValueError, match="is not a Hub model id"):
        web_demo.write_space(tmp_path / "space", str(saved_pipeline_dir))
    (tmp_path / "used" / "file.txt").parent.mkdir()
    (tmp_path / "used" / "file.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not empty"):
        web_demo.write_space(tmp_path / "used", "someone/polyp-ddpm")
    with pytest.raises(FileExistsError, match=f"the output {tmp_path / 'used' / 'file.txt'} is a file; expected a"):
        web_demo.write_space(tmp_path / "used" / "file.txt", "someone/polyp-ddpm")


def test_the_commands_work_without_gradio_and_the_demo_says_which_extra_it_needs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now fails
    monkeypatch.delitem(sys.modules, "polyp_diffusers.web_demo")
    monkeypatch.delattr(polyp_diffusers, "web_demo")
    with pytest.raises(SystemExit) as help_exit:
        polyp_ddpm(["--help"])
    assert help_exit.value.code == 0 and "demo" in capsys.readouterr().out
    assert polyp_ddpm(["demo", "--model", str(REPO_ROOT)]) == 1
    assert "pip install 'polyp-diffusers[demo]'" in capsys.readouterr().err
