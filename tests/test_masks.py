"""New masks from real ones (MaskAugmenter), their statistics, and `generate --new-masks --mask-augment`."""

import json

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch
from datasets import load_from_disk

from polyp_diffusers import PolypMaskPipeline, make_polyp_scheduler, make_polyp_unet_from_preset
from polyp_diffusers.cli import main as polyp_ddpm
from polyp_diffusers.demo import make_demo_dataset
from polyp_diffusers.generate import (
    GENERATED_FEATURES,
    INSERT_BLEND_RADIUS,
    PARTS_DIR,
    blend_margin,
    generate_dataset,
)
from polyp_diffusers.masks import MaskAugmenter, count_components, mask_statistics, plot_mask_statistics
from polyp_diffusers.pipelines import PolypDDPMPipeline
from polyp_diffusers.pipelines.pipeline_polyp_ddpm import dilate


@pytest.fixture(scope="module")
def real_masks():
    """The training masks of the demo set at 64 px: (masks, ids)."""
    train = make_demo_dataset(num_pairs=100, size=64, seed=1)["train"]
    return list(train["mask"]), list(train["id"])


def test_components_are_8_connected_regions():
    mask = np.zeros((12, 12), dtype=bool)
    assert count_components(mask) == 0
    mask[0, 0] = mask[1, 1] = True  # corners touch: one region
    assert count_components(mask) == 1
    mask[5:9, 2] = mask[5:9, 5] = mask[8, 2:6] = True  # a U whose arms meet only at the bottom: one region
    mask[3:6, 9:12] = True
    mask[4, 10] = False  # a ring is one region
    assert count_components(mask) == 3


def test_mask_statistics_measure_area_and_regions():
    square, two = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    square[:5, :5] = 255
    two[0, 0] = two[9, 9] = 255
    statistics = mask_statistics([square, two])
    np.testing.assert_allclose(statistics["area_fraction"], [0.25, 0.02])
    assert statistics["components"].tolist() == [1, 2]


def test_new_masks_are_binary_seeded_and_name_their_sources(real_masks):
    masks, ids = real_masks
    augmenter = MaskAugmenter(masks, 64, seed=7, ids=ids)
    mask, sources = augmenter(3)
    assert mask.shape == (64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    again, same_sources = MaskAugmenter(masks, 64, seed=7, ids=ids)(3)
    np.testing.assert_array_equal(mask, again)
    assert sources == same_sources and set(augmenter.source_id(sources).split("+")) <= set(ids)
    assert not np.array_equal(mask, MaskAugmenter(masks, 64, seed=8, ids=ids)(3)[0])
    real = augmenter.masks[sources[0], 0].numpy()
    assert ((mask > 0) & real).sum() / ((mask > 0) | real).sum() < 0.95  # not a copy of its source


def test_new_masks_keep_the_real_statistics(real_masks):
    masks, ids = real_masks
    augmenter = MaskAugmenter(masks, 64, seed=0, ids=ids)
    new = mask_statistics([augmenter(index)[0] for index in range(60)])
    real = augmenter.statistics
    low, high = augmenter.area_range
    assert low <= new["area_fraction"].min() and new["area_fraction"].max() <= high
    assert 0.67 < np.median(new["area_fraction"]) / np.median(real["area_fraction"]) < 1.5
    assert abs((new["components"] > 1).mean() - (real["components"] > 1).mean()) < 0.2


def test_composition_joins_two_real_polyps(real_masks):
    masks, ids = real_masks
    augmenter = MaskAugmenter(masks, 64, seed=0, ids=ids, compose_probability=1.0)
    sources = [augmenter(index)[1] for index in range(5)]
    assert all(len(pair) == 2 and pair[0] != pair[1] for pair in sources)
    assert "+" in augmenter.source_id(sources[0])


def test_the_histogram_png_compares_generated_with_real(real_masks, tmp_path):
    pytest.importorskip("matplotlib")
    masks, ids = real_masks
    augmenter = MaskAugmenter(masks, 64, ids=ids)
    new = mask_statistics([augmenter(index)[0] for index in range(10)])
    png = plot_mask_statistics(augmenter.statistics, new, tmp_path / "masks.png")
    assert png.startswith(b"\x89PNG") and (tmp_path / "masks.png").read_bytes() == png


GENERATION = ["--sampler", "ddim", "--steps", "2", "--batch-size", "4", "--num-images-per-mask", "2", "--seed", "5"]


def run_generate(capsys, saved_pipeline_dir, demo_masks, output, *extra):
    argv = ["generate", "--model", saved_pipeline_dir, "--mask-dataset", demo_masks, "--output", output, *extra]
    try:
        code = polyp_ddpm([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, *capsys.readouterr()


def test_generate_new_masks_makes_new_pairs_in_the_same_schema(capsys, saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "new"
    code, out, err = run_generate(
        capsys, saved_pipeline_dir, demo_masks, output, "--new-masks", "5", "--mask-augment", *GENERATION
    )
    assert code == 0, err
    assert "holds 10 generated pairs (train split)" in out
    pairs = load_from_disk(str(output))["train"]
    assert pairs.features == GENERATED_FEATURES and len(pairs) == 10
    assert pairs["id"][:3] == ["newmask-00000-syn0", "newmask-00000-syn1", "newmask-00001-syn0"]
    assert list(pairs["seed"]) == list(range(5, 15))
    real_ids = set(load_from_disk(str(demo_masks))["train"]["id"])
    assert all(set(source.split("+")) <= real_ids for source in pairs["source_id"])
    augmenter = MaskAugmenter(load_from_disk(str(demo_masks))["train"]["mask"], 32, seed=5)
    for row in (0, 4):  # both images of a mask have it; it is the augmenter's mask `j` for seed 5
        np.testing.assert_array_equal(np.asarray(pairs[row]["mask"]), augmenter(row // 2)[0])
    assert np.array_equal(np.asarray(pairs[0]["mask"]), np.asarray(pairs[1]["mask"]))
    statistics = json.loads((output / "mask_statistics.json").read_text())
    assert statistics["new"]["count"] == 5 and statistics["real"]["count"] == 6
    assert json.loads((output / "generation.json").read_text())["new_masks"] == 5
    assert "new masks made by `--mask-augment`" in (output / "README.md").read_text()


def test_an_interrupted_new_mask_generation_resumes_to_the_same_pairs(
    saved_pipeline_dir, demo_masks, tmp_path, monkeypatch
):
    arguments = dict(
        split="test", sampler="ddim", num_inference_steps=2, batch_size=2, seed=3, new_masks=3, mask_augment=True
    )
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), tmp_path / "whole", **arguments)
    calls = {"count": 0}
    original = PolypDDPMPipeline.__call__

    def crash_on_second_batch(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PolypDDPMPipeline, "__call__", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(str(saved_pipeline_dir), str(demo_masks), tmp_path / "resumed", **arguments)
    assert len(list((tmp_path / "resumed" / PARTS_DIR).glob("part-*"))) == 1
    generate_dataset(str(saved_pipeline_dir), str(demo_masks), tmp_path / "resumed", **arguments)
    whole, resumed = (load_from_disk(str(tmp_path / name))["test"] for name in ("whole", "resumed"))
    assert list(resumed["source_id"]) == list(whole["source_id"])
    for a, b in zip(resumed, whole):
        assert np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_generate_inserts_new_polyps_into_real_frames(capsys, saved_pipeline_dir, demo_masks, tmp_path):
    output = tmp_path / "inserted"
    code, _, err = run_generate(
        capsys, saved_pipeline_dir, demo_masks, output, "--new-masks", "3", "--mask-augment", "--insert", *GENERATION
    )
    assert code == 0, err
    pairs, frames = load_from_disk(str(output))["train"], load_from_disk(str(demo_masks))["train"]
    assert pairs["id"][:3] == ["inserted-00000-syn0", "inserted-00000-syn1", "inserted-00001-syn0"]
    assert pairs["source_id"][::2] == frames["id"][:3]  # mask j goes into frame j
    augmenter = MaskAugmenter(frames["mask"], 32, seed=5)
    candidates = [augmenter(index)[0] > 127 for index in range(30)]  # mask j, then j + 3, j + 6, ... on overlap
    inserted = 0
    for row in (0, 2, 4):
        frame = np.asarray(frames[row // 2]["image"].convert("RGB"))
        own, both = np.asarray(frames[row // 2]["mask"]) > 127, np.asarray(pairs[row]["mask"]) > 127
        new = both & ~own
        assert np.array_equal(both, own | new)  # the frame's own polyp stays marked
        if not new.any():  # no candidate was clear of the frame's polyp: the frame is left as it is
            assert np.array_equal(np.asarray(pairs[row]["image"]), frame)
            continue
        inserted += 1
        assert any(np.array_equal(new, candidate & ~own) for candidate in candidates[row // 2 :: 3])
        edit_region = dilate(torch.from_numpy(new)[None, None], INSERT_BLEND_RADIUS)[0, 0].numpy()
        assert not edit_region[own].any(), "the edit region must stay clear of the frame's own polyp"
        grown = PIL.Image.fromarray(new.astype(np.uint8) * 255).filter(PIL.ImageFilter.MaxFilter(11))
        # Far from the new polyp (beyond the blend margin of 4 pixels), the frame is untouched.
        near = np.asarray(grown) > 0
        assert np.array_equal(np.asarray(pairs[row]["image"])[~near], frame[~near])
    assert inserted > 0
    statistics = json.loads((output / "mask_statistics.json").read_text())
    assert statistics["new"]["count"] == 3  # the new masks as drawn, not the pairs' masks of two polyps
    assert "inserted into a real frame" in (output / "README.md").read_text()
    code, _, err = run_generate(capsys, saved_pipeline_dir, demo_masks, tmp_path / "refused", "--insert")
    assert code == 1 and "insert puts the polyps of new masks into real frames" in err


def test_the_blend_margin_follows_the_more_squeezed_side_of_a_frame():
    assert blend_margin((32, 32), (32, 32)) == INSERT_BLEND_RADIUS + 1
    assert blend_margin((96, 32), (32, 32)) == blend_margin((32, 96), (32, 32)) == 3 * (INSERT_BLEND_RADIUS + 1)


def test_inserting_into_frames_taller_than_the_model_leaves_their_own_polyp_untouched(
    capsys, saved_pipeline_dir, tmp_path
):
    # Frames 3 times taller than wide are squeezed 3 times vertically to the 32 px model: its blend margin reaches
    # 3 times as far in frame rows as in columns.
    source = tmp_path / "tall"
    for folder in ("images", "masks"):
        (source / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        frame = rng.integers(60, 200, (96, 32, 3), dtype=np.uint8)
        mask = np.zeros((96, 32), np.uint8)
        mask[40:56, 10:22] = 255  # mid-height, so that new polyps above and below come close
        PIL.Image.fromarray(frame).save(source / "images" / f"f{index}.png")
        PIL.Image.fromarray(mask).save(source / "masks" / f"f{index}.png")
    prepared = tmp_path / "tall-prepared"
    assert polyp_ddpm(["prepare-data", str(source), "--output", str(prepared), "--test-size", "1"]) == 0
    output = tmp_path / "inserted"
    code, _, err = run_generate(
        capsys, saved_pipeline_dir, prepared, output, "--new-masks", "5", "--mask-augment", "--insert", *GENERATION
    )
    assert code == 0, err
    frames = {row["id"]: row for row in load_from_disk(str(prepared))["train"]}
    for pair in load_from_disk(str(output))["train"]:
        own = np.asarray(frames[pair["source_id"]]["mask"]) > 127
        original = np.asarray(frames[pair["source_id"]]["image"].convert("RGB"))
        assert np.array_equal(np.asarray(pair["image"])[own], original[own]), pair["id"]


# A learned model of masks (PolypMaskPipeline) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_pipeline_dir(tmp_path_factory):
    """An untrained 32 px model of masks alone, saved."""
    torch.manual_seed(0)
    unet = make_polyp_unet_from_preset("tiny", image_channels=1, mask_channels=0)
    path = tmp_path_factory.mktemp("mask-model")
    PolypMaskPipeline(unet=unet, scheduler=make_polyp_scheduler()).save_pretrained(path)
    return path


def test_the_mask_pipeline_draws_binary_masks_independent_of_batching(mask_pipeline_dir):
    pipe = PolypMaskPipeline.from_pretrained(mask_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)

    def draw(batch_size):
        generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
        return pipe(
            num_masks=3, num_inference_steps=3, generator=generators, batch_size=batch_size, output_type="pt"
        ).masks

    masks = draw(3)
    assert masks.shape == (3, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, draw(2))
    images = pipe(num_masks=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).masks
    assert [image.mode for image in images] == ["L", "L"]
    with pytest.raises(ValueError, match="generator is a list of 2 generators"):
        pipe(num_masks=3, num_inference_steps=2, generator=[torch.Generator()] * 2)


def test_generate_draws_new_masks_from_a_mask_model(
    capsys, saved_pipeline_dir, demo_masks, mask_pipeline_dir, tmp_path, monkeypatch
):
    output = tmp_path / "from-model"
    sampled = []  # the mask model's sampler and steps: the command's
    original_call = PolypMaskPipeline.__call__

    def recorded_call(pipe, **kwargs):
        sampled.append((type(pipe.scheduler).__name__, kwargs["num_inference_steps"]))
        return original_call(pipe, **kwargs)

    monkeypatch.setattr(PolypMaskPipeline, "__call__", recorded_call)
    code, out, err = run_generate(
        capsys, saved_pipeline_dir, demo_masks, output, "--new-masks", "3", "--mask-model", mask_pipeline_dir,
        *GENERATION,
    )  # fmt: skip
    assert code == 0, err
    assert set(sampled) == {("DDIMScheduler", 2)}  # GENERATION's --sampler ddim --steps 2, as for the images
    pairs = load_from_disk(str(output))["train"]
    assert len(pairs) == 6 and set(pairs["source_id"]) == {"mask-model"}
    assert all(set(np.unique(np.asarray(mask)).tolist()) <= {0, 255} for mask in pairs["mask"])
    statistics = json.loads((output / "mask_statistics.json").read_text())
    assert statistics["new"]["count"] == 3 and statistics["mask_model"] == str(mask_pipeline_dir)
    card = (output / "README.md").read_text()
    # The images take seeds 5 to 10 (3 masks x 2 images); the masks follow them.
    assert "new masks drawn by the mask model" in card and "mask `j` used seed 11 + `j`" in card
    # Each model in its place: the image model is no mask model, and the mask model no image model.
    code, _, err = run_generate(capsys, mask_pipeline_dir, demo_masks, tmp_path / "swapped", *GENERATION)
    assert code == 1 and "is a model of masks alone: pass it as --mask-model" in err
    code, _, err = run_generate(
        capsys, saved_pipeline_dir, demo_masks, tmp_path / "swapped", "--new-masks", "2", "--mask-model",
        saved_pipeline_dir,
    )  # fmt: skip
    assert code == 1 and "is an image model: pass it as --model" in err
    results = tmp_path / "fid.json"
    results.write_text(json.dumps({"markdown": "| FID | 9.5 |", "eval_results": []}))
    code = polyp_ddpm(["card", str(mask_pipeline_dir), "--results", str(results)])  # a command without --mask-model
    err = capsys.readouterr().err
    assert code == 1 and f"{mask_pipeline_dir} is a model of masks alone: PolypDDPMPipeline cannot run it." in err
    small = tmp_path / "16px-mask-model"
    unet = make_polyp_unet_from_preset("tiny", image_size=16, image_channels=1, mask_channels=0)
    PolypMaskPipeline(unet=unet, scheduler=make_polyp_scheduler()).save_pretrained(small)
    code, _, err = run_generate(
        capsys, saved_pipeline_dir, demo_masks, tmp_path / "mismatch", "--new-masks", "2", "--mask-model", small
    )
    assert code == 1 and "train the mask model at the image model's size" in err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--new-masks", "3"], "needs a way to make the masks, not none"),
        (["--mask-augment"], "say how many with new_masks"),
        (["--new-masks", "3", "--mask-augment", "--mask-model", "x"], "needs one way to make the masks, not both"),
    ],
)
def test_new_masks_and_mask_augment_go_together(capsys, saved_pipeline_dir, demo_masks, tmp_path, flags, expected):
    code, _, err = run_generate(capsys, saved_pipeline_dir, demo_masks, tmp_path / "out", *flags)
    assert code == 1 and expected in err
    assert not (tmp_path / "out").exists()


def test_new_masks_must_be_a_positive_count(capsys, saved_pipeline_dir, demo_masks, tmp_path):
    code, _, err = run_generate(capsys, saved_pipeline_dir, demo_masks, tmp_path / "out", "--new-masks", "0")
    assert code == 2 and "not a whole number of at least 1" in err


def test_each_pipeline_refuses_the_other_kind_of_model_and_steps_beyond_the_schedule():
    from polyp_diffusers import PolypInpaintPipeline

    scheduler = make_polyp_scheduler()
    masks_alone = make_polyp_unet_from_preset("tiny", image_channels=1, mask_channels=0)
    images = make_polyp_unet_from_preset("tiny")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 1
    frame = np.full((32, 32, 3), 128, np.uint8)
    for call, refusal in [
        (lambda: PolypDDPMPipeline(unet=masks_alone, scheduler=scheduler)(mask), "cannot run a model of masks alone"),
        (lambda: PolypMaskPipeline(unet=images, scheduler=scheduler)(), "cannot run a model of images"),
        (
            lambda: PolypInpaintPipeline(unet=masks_alone, scheduler=scheduler)(image=frame, mask_image=mask),
            "cannot run a model of masks alone",
        ),
        (lambda: PolypMaskPipeline(unet=masks_alone, scheduler=scheduler)(num_inference_steps=251), "has 250 steps"),
        (
            lambda: PolypInpaintPipeline(unet=images, scheduler=scheduler)(
                image=frame, mask_image=mask, num_inference_steps=1000
            ),
            "has 250 steps",
        ),
        (
            lambda: PolypInpaintPipeline(unet=images, scheduler=scheduler)(
                image=PIL.Image.fromarray(np.full((32, 32), 30000, np.uint16)), mask_image=mask
            ),
            "convert it to 8-bit RGB first",
        ),
        (
            lambda: PolypInpaintPipeline(unet=images, scheduler=scheduler)(image=frame.astype(object), mask_image=mask),
            "has dtype object",
        ),
    ]:
        with pytest.raises(ValueError, match=refusal):
            call()
