"""Reading, validating, splitting and writing image/mask pairs; the demo set; joint augmentation."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from datasets import Dataset, DatasetDict, Image, load_from_disk

from polyp_diffusers import data as data_module
from polyp_diffusers.data import (
    FEATURES,
    REPORT_FILE,
    DataValidationError,
    build_dataset,
    load_polyp_dataset,
    parse_dataset_spec,
    read_split_file,
    split_ids,
)
from polyp_diffusers.demo import make_demo_dataset
from polyp_diffusers.prepare_data import prepare_dataset
from polyp_diffusers.transforms import (
    LEVEL_VALUES,
    JointAugment,
    images_from_levels,
    levels_of_images,
    mean_color,
    pair_tensors,
    pair_tensors_nbytes,
    pair_transform,
    transformed_pairs,
)

# The two Kvasir-SEG pairs that the copy in POLYP_DATA_DIR lacks (its README).
KVASIR_MISSING_IDS = ("cju1gkndf6yi10801o1qnje19", "cju2hqt33lmra0988fr5ijv8j")


def polyp_pair(width=48, height=40, seed=0):
    """An RGB colonoscopy-coloured image and its 0/255 mask with one ellipse."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    mask = ((yy - height / 2) ** 2 / (height / 4) ** 2 + (xx - width / 2) ** 2 / (width / 4) ** 2) < 1
    image = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
    image[mask] = (220, 120, 110)
    return PIL.Image.fromarray(image), PIL.Image.fromarray(mask.astype(np.uint8) * 255)


def write_folder(root, pairs):
    """pairs: {stem: (image, mask, image_ext, mask_ext)}; image or mask None leaves that file out."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem, (image, mask, image_ext, mask_ext) in pairs.items():
        if image is not None:
            image.save(root / "images" / f"{stem}{image_ext}")
        if mask is not None:
            mask.save(root / "masks" / f"{stem}{mask_ext}")
    return root


@pytest.fixture
def good_folder(tmp_path):
    """Ten valid pairs with mixed extensions, sizes and image modes, and JPEG (lossy, RGB) masks."""
    pairs = {}
    for index in range(10):
        image, mask = polyp_pair(width=40 + 4 * index, height=36 + 2 * index, seed=index)
        image = [image, image.convert("RGBA"), image.convert("L")][index % 3]
        image_ext = [".png", ".jpg", ".tif", ".jpeg", ".bmp"][index % 5]
        if image_ext in (".jpg", ".jpeg"):
            image = image.convert("RGB")
        pairs[f"case{index:02d}"] = (image, mask.convert("RGB"), image_ext, ".jpg" if index % 2 else ".png")
    return write_folder(tmp_path / "Kvasir-SEG", pairs)


def test_folder_pairs_become_the_project_schema(good_folder):
    dataset, problems, _ = build_dataset(str(good_folder), test_size=2, seed=0)
    assert problems == []
    assert {name: len(part) for name, part in dataset.items()} == {"train": 8, "test": 2}
    train = dataset["train"]
    assert train.features == FEATURES
    for row in train:
        assert row["image"].mode == "RGB" and row["mask"].mode == "L"
        assert set(np.unique(np.asarray(row["mask"]))) == {0, 255}
        assert row["image"].size == row["mask"].size == (row["width"], row["height"])
    ids = sorted(list(dataset["train"]["id"]) + list(dataset["test"]["id"]))
    assert ids == [f"case{i:02d}" for i in range(10)]


@pytest.mark.parametrize(
    ("damaged", "content"),
    [("dataset_dict.json", '{"splits": '), ("dataset_dict.json", "[]"), ("train/state.json", "{}")],
)
def test_a_damaged_prepared_dataset_is_named_when_loaded(tmp_path, damaged, content):
    prepare_dataset("demo", tmp_path / "demo", demo_pairs=8, resolution=32)
    (tmp_path / "demo" / damaged).write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'demo'} cannot be read as a prepared dataset"):
        load_polyp_dataset(str(tmp_path / "demo"), split="train")


def test_a_saved_dataset_with_an_empty_split_is_one_clear_error(tmp_path):
    prepare_dataset("demo", tmp_path / "demo", demo_pairs=8, resolution=32)
    dataset = load_from_disk(str(tmp_path / "demo"))
    DatasetDict({"train": dataset["train"], "test": dataset["test"].select([])}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} cannot be read as a prepared dataset: a split of it"):
        load_polyp_dataset(str(tmp_path / "empty"), split="train")


def test_a_dataset_spec_splits_at_its_last_colon_unless_the_whole_is_a_folder(tmp_path):
    assert parse_dataset_spec("data/kvasir-seg") == ("data/kvasir-seg", "test")
    assert parse_dataset_spec("data/kvasir-seg:train") == ("data/kvasir-seg", "train")
    assert parse_dataset_spec("USER/kvasir:validation", "train") == ("USER/kvasir", "validation")
    timestamped = tmp_path / "runs-12:30"  # before: "runs-12" with the split "30"
    timestamped.mkdir()
    assert parse_dataset_spec(str(timestamped)) == (str(timestamped), "test")
    assert parse_dataset_spec(f"{timestamped}:train") == (str(timestamped), "train")


def test_original_image_files_are_kept_byte_for_byte(good_folder):
    dataset, *_ = build_dataset(str(good_folder), test_size=2, seed=0)
    stored = dataset["train"].cast_column("image", FEATURES["image"].__class__(decode=False))[0]
    source = next((good_folder / "images").glob(f"{dataset['train'][0]['id']}.*"))
    assert stored["image"]["bytes"] == source.read_bytes()


def test_resolution_resizes_images_and_masks(good_folder):
    dataset, *_ = build_dataset(str(good_folder), test_size=2, seed=0, resolution=32)
    row = dataset["test"][0]
    assert row["image"].size == row["mask"].size == (32, 32)
    assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}
    assert (row["width"], row["height"]) != (32, 32)  # the original size is recorded


@pytest.fixture
def good_zip(good_folder, tmp_path):
    """The good folder zipped as Kvasir-SEG is downloaded (one folder inside)."""
    archive = tmp_path / "kvasir-seg.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in good_folder.rglob("*"):
            zipped.write(path, path.relative_to(good_folder.parent))
    return archive


def test_a_zip_as_downloaded_is_read(good_zip):
    dataset, problems, _ = build_dataset(str(good_zip), test_size=2, seed=0)
    assert problems == [] and len(dataset["train"]) == 8


def test_a_truncated_zip_is_named_as_damaged(good_zip):
    good_zip.write_bytes(good_zip.read_bytes()[: good_zip.stat().st_size // 2])
    with pytest.raises(ValueError, match="kvasir-seg.zip is a damaged or incomplete zip file"):
        build_dataset(str(good_zip), test_size=2)


def test_split_is_seeded_and_deterministic():
    ids = [f"id{i}" for i in range(50)]
    assert split_ids(ids, 10, seed=3) == split_ids(ids, 10, seed=3)
    assert split_ids(ids, 10, seed=3)["test"] != split_ids(ids, 10, seed=4)["test"]
    assert len(split_ids(ids, 0.2, seed=0)["test"]) == 10
    with pytest.raises(ValueError, match="leaves no train or no test"):
        split_ids(ids, 50, seed=0)


def test_numpy_numbers_split_like_python_ones():
    ids = [f"id{i}" for i in range(50)]
    assert split_ids(ids, np.int64(10), seed=3) == split_ids(ids, 10, seed=3)
    assert split_ids(ids, np.float32(0.2), seed=3) == split_ids(ids, 0.2, seed=3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(test_size=1.5), "test size is 1.5; expected a whole count"),
        (dict(test_size=True), "test size is True"),
        (dict(test_size=float("nan")), "test size is nan"),
        (dict(resolution=0), "resolution is 0 \\(int\\); expected an int of at least 1"),
        (dict(resolution=32.5), "resolution is 32.5 \\(float\\)"),
    ],
)
def test_build_dataset_refuses_bad_arguments_before_reading_a_pair(good_folder, arguments, message, monkeypatch):
    monkeypatch.setattr(data_module, "read_pairs", pytest.fail)
    with pytest.raises(ValueError, match=message):
        build_dataset(str(good_folder), **arguments)


def test_a_split_file_decides_the_splits(good_folder, tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(
        json.dumps(
            {"source": "hand-made", "train": [f"case{i:02d}" for i in range(7)], "test": ["case07", "case08", "case09"]}
        )
    )
    dataset, *_ = build_dataset(str(good_folder), split_file=str(split_file))
    assert sorted(dataset["test"]["id"]) == ["case07", "case08", "case09"]


def test_split_file_ids_must_match_the_source(good_folder, tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [f"case{i:02d}" for i in range(8)], "test": ["case08", "missing"]}))
    with pytest.raises(DataValidationError) as raised:
        build_dataset(str(good_folder), split_file=str(split_file))
    kinds = {(p.id, p.kind) for p in raised.value.problems}
    assert kinds == {("missing", "id in split file but not in source"), ("case09", "id in source but in no split")}


@pytest.mark.parametrize(
    ("content", "message"),
    [("[1, 2]", "holds a JSON list; expected an object of split names"), ("{train: 1}", "is not valid JSON")],
)
def test_a_split_file_of_another_shape_is_named(good_folder, tmp_path, content, message):
    split_file = tmp_path / "split.json"
    split_file.write_text(content)
    with pytest.raises(ValueError, match=f"split.json {message}"):
        build_dataset(str(good_folder), split_file=str(split_file))


@pytest.mark.parametrize("name", ["../other/train", "/tmp/victim", "", "train/x", "..", "a..b"])
def test_a_split_name_that_is_not_a_folder_name_is_refused_before_anything_is_written(good_folder, tmp_path, name):
    split_file, output, other = tmp_path / "split.json", tmp_path / "prepared", tmp_path / "other"
    other.mkdir()
    ids = sorted(path.stem for path in (good_folder / "images").iterdir())
    split_file.write_text(json.dumps({"train": ids[:-2], name: ids[-2:-1], "test": ids[-1:]}))
    with pytest.raises(ValueError, match=f"split.json: not a split name: {re.escape(repr(name))}; names are"):
        prepare_dataset(str(good_folder), output, split_file=str(split_file))
    assert not output.exists() and not any(other.iterdir())


def test_split_names_may_hold_hyphens_and_dots(tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["a"], "test-cvc": ["b"], "test.kvasir_seg": ["c"]}))
    assert list(data_module.read_split_file(split_file)) == ["train", "test-cvc", "test.kvasir_seg"]


@pytest.mark.parametrize("train_ids", [["case00", "case01"], ["unknown"]])
def test_a_split_left_without_pairs_is_an_error_even_with_skip_invalid(good_folder, tmp_path, train_ids):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": train_ids, "test": ["not-in-source"]}))
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no valid image/mask pair for split\(s\) .*test of .*split.json"):
        prepare_dataset(str(good_folder), output, split_file=str(split_file), skip_invalid=True)
    assert not output.exists()


def test_an_id_in_two_splits_is_an_error_even_with_skip_invalid(good_folder, tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": [f"case{i:02d}" for i in range(8)], "test": ["case07", "case08"]}))
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"split.json lists 1 id\(s\) more than once: case07 \(train, test\)"):
        prepare_dataset(str(good_folder), output, split_file=str(split_file), skip_invalid=True)
    assert not output.exists()


@pytest.fixture
def bad_folder(tmp_path):
    """Four valid pairs and one of every problem."""
    pairs = {f"good{i}": (*polyp_pair(seed=i), ".png", ".png") for i in range(4)}
    image, mask = polyp_pair()
    pairs["orphan_image"] = (image, None, ".png", ".png")
    pairs["orphan_mask"] = (None, mask, ".png", ".png")
    pairs["mismatch"] = (image, mask.resize((20, 20)), ".png", ".png")
    pairs["empty"] = (image, PIL.Image.new("L", image.size), ".png", ".png")
    pairs["colour_mask"] = (image, image, ".png", ".png")
    root = write_folder(tmp_path / "bad", pairs)
    (root / "images" / "garbage.png").write_bytes(b"not an image at all")
    PIL.Image.new("L", (10, 10)).save(root / "masks" / "garbage.png")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    (root / "images" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    mask.save(root / "masks" / "truncated.png")
    return root


BAD_IDS = {"orphan_image", "orphan_mask", "mismatch", "empty", "colour_mask", "garbage", "truncated"}


def test_every_problem_is_reported_and_nothing_is_written(bad_folder, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(DataValidationError) as raised:
        prepare_dataset(str(bad_folder), output, test_size=1)
    problems = {p.id: f"{p.kind}: {p.detail}" for p in raised.value.problems}
    assert set(problems) == BAD_IDS
    assert problems["orphan_image"].startswith("image without mask")
    assert problems["orphan_mask"].startswith("mask without image")
    assert "size mismatch" in problems["mismatch"]
    assert "empty mask" in problems["empty"]
    assert "colour image" in problems["colour_mask"]
    assert "unreadable image" in problems["garbage"]
    assert "unreadable image" in problems["truncated"] and "truncated" in problems["truncated"]
    assert not output.exists()
    assert "--skip-invalid" in str(raised.value)


def test_skip_invalid_writes_the_valid_pairs_and_the_report(bad_folder, tmp_path):
    output = tmp_path / "out"
    prepare_dataset(str(bad_folder), output, test_size=1, skip_invalid=True)
    written = load_from_disk(str(output))
    assert sorted(list(written["train"]["id"]) + list(written["test"]["id"])) == [f"good{i}" for i in range(4)]
    report = json.loads((output / REPORT_FILE).read_text())
    assert {p["id"] for p in report["problems"]} == BAD_IDS
    assert "7 problem(s) were found, and no pair with a problem is in the dataset" in (output / "README.md").read_text()


def test_existing_output_is_not_overwritten_by_default(good_folder, tmp_path):
    output = tmp_path / "out"
    prepare_dataset(str(good_folder), output, test_size=2)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(str(good_folder), output, test_size=2)
    prepare_dataset(str(good_folder), output, test_size=3, overwrite=True)
    assert len(load_from_disk(str(output))["test"]) == 3


def test_overwrite_leaves_alone_a_folder_holding_files_prepare_data_does_not_write(good_folder, tmp_path):
    prepared, other = tmp_path / "prepared", tmp_path / "other"
    prepare_dataset(str(good_folder), prepared, test_size=2)
    (prepared / "notes.md").write_text("mine")
    other.mkdir()  # a report alone does not make a prepared dataset
    (other / "thesis.tex").write_text("mine")
    (other / "validation_report.json").write_text("{}")
    for output, held in ((prepared, "notes.md"), (other, "thesis.tex")):
        with pytest.raises(FileExistsError, match=f"holds {held}, which `polyp-ddpm prepare-data` does not write"):
            prepare_dataset(str(good_folder), output, test_size=3, overwrite=True)
        assert (output / held).read_text() == "mine"
    (prepared / "notes.md").unlink()
    (prepared / "train" / "labels.csv").write_text("mine")  # inside a split: named there
    with pytest.raises(FileExistsError, match="holds train/labels.csv, which `polyp-ddpm prepare-data` does not"):
        prepare_dataset(str(good_folder), prepared, test_size=3, overwrite=True)
    (prepared / "train" / "labels.csv").unlink()
    # Hidden files count (a dataset repo's history), but for a file browser's clutter.
    (prepared / ".git").mkdir()
    (prepared / ".git" / "HEAD").write_text("ref: refs/heads/main")
    with pytest.raises(FileExistsError, match="holds .git, which `polyp-ddpm prepare-data` does not write"):
        prepare_dataset(str(good_folder), prepared, test_size=3, overwrite=True)
    assert (prepared / ".git" / "HEAD").is_file()
    shutil.rmtree(prepared / ".git")
    (prepared / ".DS_Store").write_text("a file browser's")
    (prepared / "test" / ".DS_Store").write_text("a file browser's")
    (prepared / "empty").mkdir()  # nothing in it to lose
    prepare_dataset(str(good_folder), prepared, test_size=3, overwrite=True)
    assert len(load_from_disk(str(prepared))["test"]) == 3


def test_a_prepared_folder_is_itself_a_source(good_folder, tmp_path):
    first = prepare_dataset(str(good_folder), tmp_path / "first", test_size=2)
    second = prepare_dataset(str(tmp_path / "first"), tmp_path / "second")
    assert sorted(second["test"]["id"]) == sorted(first["test"]["id"])
    assert load_polyp_dataset(str(tmp_path / "second"), split="train").num_rows == 8
    with pytest.raises(ValueError, match="split 'valid' is not one of them") as refusal:
        load_polyp_dataset(str(tmp_path / "second"), split="valid")
    assert f"Name one as DATASET:SPLIT ({tmp_path / 'second'}:test)" in str(refusal.value)


def test_missing_source_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no 'images/' and 'masks/'"):
        build_dataset(str(tmp_path / "empty"))


def test_demo_set_is_deterministic_binary_and_small():
    first, again = make_demo_dataset(12, 32, test_size=2, seed=5), make_demo_dataset(12, 32, test_size=2, seed=5)
    other = make_demo_dataset(12, 32, test_size=2, seed=6)
    assert {name: len(part) for name, part in first.items()} == {"train": 10, "test": 2}
    assert np.array_equal(np.asarray(first["train"][0]["image"]), np.asarray(again["train"][0]["image"]))
    assert not np.array_equal(np.asarray(first["train"][0]["image"]), np.asarray(other["train"][0]["image"]))
    for row in first["train"]:
        values = set(np.unique(np.asarray(row["mask"])))
        assert values == {0, 255}


def test_prepare_data_cli_makes_the_demo_set(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polyp_diffusers.cli",
            "prepare-data",
            "demo",
            "--output",
            str(output),
            "--demo-pairs",
            "20",
            "--test-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "train: 16, test: 4" in result.stdout
    card = (output / "README.md").read_text()
    assert "Synthetic smoke-test data" in card and "image-segmentation" in card


def test_prepare_data_cli_reports_problems_and_fails(bad_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "polyp_diffusers.cli", "prepare-data", str(bad_folder), "--output", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "7 problem(s)" in result.stderr and "orphan_mask: mask without image" in result.stderr


# Joint augmentation ----------------------------------------------------------------------------------------


def _mask_batch(size=32, count=4):
    masks = torch.zeros(count, 1, size, size)
    for i in range(count):
        masks[i, 0, 4 + i : 14 + 2 * i, 6 : 20 + i] = 1
    return masks


def test_augmentation_keeps_masks_binary_and_aligned_with_images():
    masks = _mask_batch()
    images = (masks * 2 - 1).repeat(1, 3, 1, 1)  # the image draws the mask
    augmented, augmented_masks = JointAugment(degrees=45, zoom=(0.8, 1.2))(
        images, masks, torch.Generator().manual_seed(0)
    )
    assert set(augmented_masks.unique().tolist()) <= {0.0, 1.0}
    drawn = (augmented[:, :1] > 0).float()
    overlap = (drawn * augmented_masks).sum() / torch.maximum(drawn, augmented_masks).sum()
    assert overlap > 0.9
    assert not torch.equal(augmented_masks, masks)


def test_augmentation_is_deterministic_under_a_seed():
    masks, images = _mask_batch(), torch.rand(4, 3, 32, 32) * 2 - 1
    augment = JointAugment()
    first = augment(images, masks, torch.Generator().manual_seed(1))
    again = augment(images, masks, torch.Generator().manual_seed(1))
    other = augment(images, masks, torch.Generator().manual_seed(2))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_a_certain_flip_without_rotation_is_an_exact_mirror():
    masks, images = _mask_batch(), torch.rand(4, 3, 32, 32) * 2 - 1
    flipped, flipped_masks = JointAugment(degrees=0, flip_probability=1)(images, masks)
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(flipped_masks, masks.flip(-1))


def test_bad_augmentation_settings_are_refused():
    with pytest.raises(ValueError, match="flip_probability"):
        JointAugment(flip_probability=2)
    with pytest.raises(ValueError, match="do not pair up"):
        JointAugment()(torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 8, 8))


def test_masks_alone_are_augmented_as_beside_their_images():
    masks, images = _mask_batch(), torch.rand(4, 3, 32, 32) * 2 - 1
    augment = JointAugment(degrees=45, zoom=(0.8, 1.2))
    _, with_images = augment(images, masks, torch.Generator().manual_seed(3))
    no_images, alone = augment(images[:, :0], masks, torch.Generator().manual_seed(3))
    assert torch.equal(alone, with_images) and no_images.shape == (4, 0, 32, 32)


def test_pairs_kept_as_levels_are_read_back_bit_for_bit_as_decoded():
    dataset = make_demo_dataset(6, 48, test_size=2)["train"]
    levels, masks = pair_tensors(dataset, 40, progress=False)  # resized on reading, as a training run does
    assert levels.dtype == masks.dtype == torch.uint8 and pair_tensors_nbytes(4, 40) == levels.nbytes + masks.nbytes
    decoded = transformed_pairs(dataset, 40)[:]
    assert torch.equal(images_from_levels(levels), decoded["images"])
    assert torch.equal(masks, decoded["masks"].to(torch.uint8))
    assert torch.equal(levels_of_images(LEVEL_VALUES), torch.arange(256, dtype=torch.uint8))
    expected = ((decoded["images"].double().mean(dim=(0, 2, 3)) + 1) / 2).tolist()
    assert mean_color(levels) == [round(value, 4) for value in expected]


def test_masks_alone_are_read_without_decoding_an_image():
    dataset = make_demo_dataset(6, 48, test_size=2)["train"]
    masks_before = pair_tensors(dataset, 32, progress=False)[1]
    # Images that cannot be decoded: reading them would fail.
    broken = dataset.cast_column("image", Image(decode=False)).map(
        lambda pair: {"image": {"bytes": b"not an image", "path": None}}
    )
    broken = broken.cast_column("image", Image())
    with pytest.raises(PIL.UnidentifiedImageError):
        pair_tensors(broken, 32, progress=False)
    images, masks = pair_tensors(broken, 32, progress=False, with_images=False)
    assert images.shape == (4, 0, 32, 32) and images.nbytes == 0
    assert torch.equal(masks, masks_before)
    assert pair_tensors_nbytes(4, 32, with_images=False) == masks.nbytes


def test_pair_transform_works_with_dataset_with_transform():
    dataset = make_demo_dataset(8, 48, test_size=2)["train"]
    transformed = dataset.with_transform(pair_transform(32, JointAugment(), seed=0))
    loader = torch.utils.data.DataLoader(transformed, batch_size=3)
    batch = next(iter(loader))
    assert batch["images"].shape == (3, 3, 32, 32) and batch["masks"].shape == (3, 1, 32, 32)
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert set(batch["masks"].unique().tolist()) <= {0.0, 1.0}


# Real data --------------------------------------------------------------------------------------------------


def test_the_shipped_paper_split_holds_900_training_and_100_test_ids_of_kvasir_seg():
    split = read_split_file("kvasir-seg-paper")
    assert {name: len(set(ids)) for name, ids in split.items()} == {"train": 900, "test": 100}


def test_the_shipped_paper_split_is_the_shared_copys_split_plus_the_two_pairs_it_lacks(kvasir_dir):
    shipped = read_split_file("kvasir-seg-paper")
    shared = json.loads((kvasir_dir / "paper_split.json").read_text())
    assert sorted(shipped["test"]) == sorted(shared["test"])
    assert sorted(set(shipped["train"]) - set(shared["train"])) == sorted(KVASIR_MISSING_IDS)
    stems = {path.stem for path in (kvasir_dir / "images").iterdir()}
    assert set(shipped["train"]) - stems == set(KVASIR_MISSING_IDS)  # what prepare-data names, and skip_invalid skips


def test_real_kvasir_seg_loads_whole_with_the_paper_split(kvasir_dir, tmp_path):
    dataset, problems, _ = build_dataset(str(kvasir_dir), split_file=str(kvasir_dir / "paper_split.json"))
    assert problems == []
    assert {name: len(part) for name, part in dataset.items()} == {"train": 898, "test": 100}
    assert dataset["train"].features == FEATURES
    for row in dataset["test"].select(range(0, 100, 10)):
        assert row["image"].size == (256, 256) and row["mask"].mode == "L"
        assert set(np.unique(np.asarray(row["mask"]))) == {0, 255}


def test_a_hub_dataset_goes_through_the_same_validation(monkeypatch):
    """The Hub cannot be reached here: the repo is said to exist, and `load_dataset` hands over a real DatasetDict."""
    import polyp_diffusers.data as data

    hub = make_demo_dataset(6, 32, test_size=2).remove_columns(["id", "width", "height"])
    requested = []
    monkeypatch.setattr(data.HfApi, "repo_exists", lambda self, repo_id, repo_type: repo_type == "dataset")
    monkeypatch.setattr(data, "load_dataset", lambda dataset_id: requested.append(dataset_id) or hub)
    dataset, problems, _ = build_dataset("someone/polyps")
    assert requested == ["someone/polyps"]
    assert problems == [] and {name: len(part) for name, part in dataset.items()} == {"train": 4, "test": 2}
    assert dataset["train"][0]["id"] == "train-00000" and dataset["train"].features == FEATURES


def test_an_unreachable_hub_id_or_mistyped_path_is_explained():
    with pytest.raises(FileNotFoundError, match="is not a folder under .*, and the Hub could not be reached"):
        build_dataset("no-such-owner-here/no-such-dataset-here")
    for name in ("owner/a--b", "owner/a..b", "owner/name.", "owner/" + "n" * 97):  # the Hub's rule, not a near one
        with pytest.raises(FileNotFoundError, match="does not exist \\(and is not a Hub dataset id"):
            build_dataset(name)


# Mask reading rule (the pipeline's prepare_masks) as prepare-data applies it ----------------------------------


def _png_round_trip(image, path):
    image.save(path)
    with PIL.Image.open(path) as png:
        png.load()
        return png.copy()


def test_a_16_bit_png_mask_is_stored_as_0_and_255(tmp_path):
    from polyp_diffusers.data import binarize_mask

    _, mask = polyp_pair()
    sixteen_bit = _png_round_trip(PIL.Image.fromarray(np.asarray(mask).astype(np.uint16) * 257), tmp_path / "m.png")
    assert sixteen_bit.mode == "I;16" and np.asarray(sixteen_bit).max() == 65535
    binary = binarize_mask(sixteen_bit)
    assert binary.mode == "L" and np.array_equal(np.asarray(binary), np.asarray(mask))


def test_a_folder_with_16_bit_png_masks_prepares_without_problems(tmp_path):
    pairs = {}
    for index in range(4):
        image, mask = polyp_pair(seed=index)
        pairs[f"case{index}"] = (image, PIL.Image.fromarray(np.asarray(mask).astype(np.uint16) * 257), ".png", ".png")
    dataset, problems, _ = build_dataset(str(write_folder(tmp_path / "sixteen-bit", pairs)), test_size=1)
    assert problems == []
    for row in dataset["train"]:
        assert row["mask"].mode == "L" and set(np.unique(np.asarray(row["mask"]))) == {0, 255}


def test_a_polyp_that_vanishes_when_resized_is_a_problem_like_an_empty_mask(tmp_path):
    pairs = {f"case{index}": (*polyp_pair(seed=index), ".png", ".png") for index in range(3)}
    image, _ = polyp_pair()
    dot = np.zeros((40, 48), dtype=np.uint8)
    dot[21, 25] = 255  # one pixel, which nearest-neighbour resizing to 4 px skips
    pairs["dot"] = (image, PIL.Image.fromarray(dot), ".png", ".png")
    folder = str(write_folder(tmp_path / "small-polyp", pairs))
    with pytest.raises(DataValidationError, match=r"dot: invalid pair: the polyp \(0.05% of 48x40 pixels\) vanishes"):
        build_dataset(folder, test_size=1, resolution=4)
    dataset, problems, _ = build_dataset(folder, test_size=1, resolution=4, skip_invalid=True)
    assert [problem.id for problem in problems] == ["dot"] and len(dataset["train"]) + len(dataset["test"]) == 3
    assert build_dataset(folder, test_size=1, resolution=40)[1] == []  # large enough to keep it


def test_a_palette_mask_is_read_by_its_colours_not_its_indices(tmp_path):
    from polyp_diffusers.data import binarize_mask

    _, mask = polyp_pair()
    background_is_index_1 = (np.asarray(mask) == 0).astype(np.uint8)
    palette = PIL.Image.fromarray(background_is_index_1, mode="P")
    palette.putpalette([255, 255, 255, 0, 0, 0])  # index 0 white (polyp), index 1 black (background)
    binary = binarize_mask(_png_round_trip(palette, tmp_path / "m.png"))
    assert np.array_equal(np.asarray(binary), np.asarray(mask))


def test_a_mask_with_three_levels_is_refused_naming_its_values():
    from polyp_diffusers.data import binarize_mask

    values = np.asarray(polyp_pair()[1]) // 255  # 0/1
    values[0, :4] = 2
    with pytest.raises(ValueError, match=r"has values \{0, 1, 2\}; expected two levels: \{0, 1\} or \{0, 255\}"):
        binarize_mask(PIL.Image.fromarray(values))


# A researcher's own dataset (a probe of layouts and formats other than Kvasir-SEG's) ---------------------------


def _pairs(count, seed=0, **sizes):
    return {f"p{seed + i}": (*polyp_pair(seed=seed + i, **sizes), ".png", ".png") for i in range(count)}


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_frames_of_16_bits_or_floats_are_refused_not_clipped_to_white_or_black(tmp_path, mode):
    pairs = _pairs(3)
    image, mask, _, _ = pairs["p0"]
    grey = np.asarray(image.convert("L"))
    deep = grey.astype(np.uint16) * 257 if mode == "I;16" else grey.astype(np.float32) / 255
    pairs["p0"] = (PIL.Image.fromarray(deep), mask, ".png" if mode == "I;16" else ".tif", ".png")
    with pytest.raises(
        DataValidationError,
        match=rf"p0: invalid pair: the image has mode {mode} \(16-bit, 32-bit or float pixels\); convert it",
    ):
        build_dataset(str(write_folder(tmp_path / "deep", pairs)), test_size=1)


def test_train_and_test_folders_are_read_as_the_sources_splits(tmp_path):
    write_folder(tmp_path / "polyps" / "train", _pairs(6))
    write_folder(tmp_path / "polyps" / "Test", _pairs(2, seed=10))
    dataset, problems, description = build_dataset(str(tmp_path / "polyps"))
    assert problems == [] and description == "the source's own splits (test, train)."
    assert sorted(dataset["train"]["id"]) == [f"p{i}" for i in range(6)] and dataset["test"]["id"] == ["p10", "p11"]
    with pytest.raises(ValueError, match="has splits of its own \\(test, train\\), which are kept"):
        build_dataset(str(tmp_path / "polyps"), test_size=1)
    write_folder(tmp_path / "cases" / "case1", _pairs(2))
    write_folder(tmp_path / "cases" / "case2", _pairs(2, seed=5))
    with pytest.raises(ValueError, match="in 2 folders \\(case1, case2\\), which are not named as splits"):
        build_dataset(str(tmp_path / "cases"))


def test_one_folder_for_images_and_masks_is_refused(tmp_path):
    write_folder(tmp_path / "source", _pairs(2))
    with pytest.raises(ValueError, match="--image-dir and --mask-dir both name"):
        build_dataset(str(tmp_path / "source"), image_dir="images", mask_dir="images/")
    for outside in ("/elsewhere/images", "../images", "a/../../images", ""):
        with pytest.raises(ValueError, match=f"--image-dir '{re.escape(outside)}' is not a folder inside the source"):
            build_dataset(str(tmp_path / "source"), image_dir=outside)


def test_subfolders_and_files_of_other_types_are_problems_not_silent_skips(tmp_path):
    source = write_folder(tmp_path / "source", _pairs(3))
    write_folder(tmp_path / "nested", _pairs(1, seed=7))
    (tmp_path / "nested" / "images").rename(source / "images" / "patient7")
    (source / "images" / "notes.txt").write_text("taken 2024")
    (source / "images" / "Thumbs.db").write_bytes(b"clutter")  # file browsers' clutter is ignored
    os.mkfifo(source / "masks" / "p5.png")  # reading it would wait forever
    (source / "images" / "p6.png").symlink_to(tmp_path / "moved-away.png")
    image, mask = polyp_pair(seed=9)
    image.save(source / "images" / "p9.webp", lossless=True)  # WebP is read
    mask.save(source / "masks" / "p9.webp", lossless=True)
    with pytest.raises(DataValidationError) as refused:
        build_dataset(str(source), test_size=1)
    assert [(problem.id, problem.kind) for problem in refused.value.problems] == [
        ("notes", "not an image file (image)"),
        ("p6", "not a regular file (image)"),
        ("patient7", "image subfolder not read"),
        ("p5", "not a regular file (mask)"),
    ]
    dataset, problems, _ = build_dataset(str(source), test_size=1, skip_invalid=True)
    assert len(problems) == 4 and sorted([*dataset["train"]["id"], *dataset["test"]["id"]]) == ["p0", "p1", "p2", "p9"]


def test_the_default_test_size_is_10_percent_of_a_source_under_1000_pairs(tmp_path):
    dataset, _, description = build_dataset(str(write_folder(tmp_path / "source", _pairs(20))))
    assert (len(dataset["train"]), len(dataset["test"])) == (18, 2)
    assert "test size 0.1; the default: 100 pairs, or 10% of a source under 1000 pairs)" in description
    with pytest.raises(ValueError, match="out of 4. That is the default test size \\(100 pairs, or 10%"):
        build_dataset(str(write_folder(tmp_path / "tiny", _pairs(4))))


def test_a_source_with_one_split_is_split_by_an_explicit_test_size_and_kept_without(tmp_path, caplog):
    images, masks = zip(*(polyp_pair(seed=i) for i in range(5)))
    DatasetDict({"train": Dataset.from_dict({"image": images, "mask": masks})}).save_to_disk(tmp_path / "hub")
    dataset, *_ = build_dataset(str(tmp_path / "hub"), test_size=0.2)
    assert (len(dataset["train"]), len(dataset["test"])) == (4, 1)
    dataset, *_ = build_dataset(str(tmp_path / "hub"))
    assert list(dataset) == ["train"] and "has no test split (only train)" in caplog.text


def test_a_decompression_bomb_and_a_turned_cmyk_frame_are_pairs_not_crashes(tmp_path, monkeypatch):
    pairs = _pairs(3)
    image, mask, _, _ = pairs["p1"]
    cmyk = image.convert("CMYK")
    exif = cmyk.getexif()
    exif[0x0112] = 3  # upside down: turned, so decoded and stored as PNG
    source = write_folder(tmp_path / "source", {k: v for k, v in pairs.items() if k != "p1"})
    cmyk.save(source / "images" / "p1.jpg", exif=exif)
    mask.save(source / "masks" / "p1.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 40 * 48 // 3)  # every pair is a "bomb" of twice that size
    with pytest.raises(DataValidationError, match="p0: invalid pair: unreadable image: Image size .* exceeds limit"):
        build_dataset(str(source), test_size=1)
    monkeypatch.undo()
    dataset, *_ = build_dataset(str(source), test_size=1)
    turned = next(row for split in dataset.values() for row in split if row["id"] == "p1")
    assert turned["image"].mode == "RGB"
    upright = np.asarray(cmyk.convert("RGB").transpose(PIL.Image.Transpose.ROTATE_180), dtype=float)
    assert np.abs(np.asarray(turned["image"], dtype=float) - upright).mean() < 8  # the JPEG's loss alone


def test_split_file_mistakes_are_named_with_their_cause(tmp_path):
    pairs = _pairs(4)
    pairs["p3"] = (pairs["p3"][0], PIL.Image.new("L", (48, 40)), ".png", ".png")  # an empty mask
    source = write_folder(tmp_path / "source", pairs)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["p0", "p1.png", "p2"], "test": ["p3"]}), encoding="utf-8-sig")
    with pytest.raises(DataValidationError) as refused:
        build_dataset(str(source), split_file=str(split))
    assert sorted(str(problem) for problem in refused.value.problems) == [
        "p1.png: id in split file but not in source: train (ids are file names without extension: 'p1' is)",
        "p1: id in source but in no split: add it to the split file",
        "p3: invalid pair: empty mask: no polyp pixel",  # and not also "not in source"
    ]
    split.write_text(json.dumps({"train": "p0,p1,p2", "test": ["p3"]}))
    with pytest.raises(ValueError, match="'train' is not a list of ids"):
        build_dataset(str(source), split_file=str(split))
    with pytest.raises(ValueError, match="a split file and a test size both say how to split"):
        build_dataset(str(source), split_file=str(split), test_size=1)


def test_zip_problems_name_files_inside_the_zip_and_renamed_masks_get_a_hint(tmp_path):
    pairs = _pairs(3)
    pairs["p2"] = (pairs["p2"][0], None, ".png", ".png")
    source = write_folder(tmp_path / "download" / "MyPolyps", pairs)
    polyp_pair(seed=2)[1].save(source / "masks" / "p2_mask.png")
    (source / "masks" / "p1.png").write_bytes(b"not a png")
    archive = tmp_path / "polyps.zip"
    with zipfile.ZipFile(archive, "w") as written:
        for path in sorted((tmp_path / "download").rglob("*.png")):
            written.write(path, path.relative_to(tmp_path))
    with pytest.raises(DataValidationError) as refused:  # the zipped folder download/ holds MyPolyps/images
        build_dataset(str(archive), test_size=1)
    problems = {problem.id: problem.detail for problem in refused.value.problems}
    assert problems["p1"] == f"unreadable mask: cannot identify image file '{archive}:download/MyPolyps/masks/p1.png'"
    assert problems["p2"] == (
        f"{archive}:download/MyPolyps/images/p2.png (the mask 'p2_mask' is there: an image and its mask must have "
        "the same file name, apart from the extension)"
    )


def test_masks_that_look_inverted_are_warned_about_once_for_the_source(tmp_path, caplog):
    pairs = {stem: (image, PIL.ImageOps.invert(mask), ".png", ".png") for stem, (image, mask, *_) in _pairs(4).items()}
    build_dataset(str(write_folder(tmp_path / "source", pairs)), test_size=1)
    assert "the polyp covers 8" in caplog.text and "are its masks inverted?" in caplog.text


def test_pairs_of_a_dataset_without_ids_are_transformed_for_training():
    images, masks = zip(*(polyp_pair(seed=i) for i in range(2)))
    pairs = Dataset.from_dict({"image": images, "mask": masks}).with_transform(pair_transform(32))
    assert pairs[0:2]["images"].shape == (2, 3, 32, 32) and "id" not in pairs[0:2]


def test_a_zipped_folder_of_split_folders_is_read_as_its_splits(tmp_path):
    write_folder(tmp_path / "MyPolyps" / "train", _pairs(3))
    write_folder(tmp_path / "MyPolyps" / "test", _pairs(1, seed=5))
    archive = tmp_path / "polyps.zip"
    with zipfile.ZipFile(archive, "w") as written:
        for path in sorted((tmp_path / "MyPolyps").rglob("*.png")):
            written.write(path, path.relative_to(tmp_path))
        written.writestr("__MACOSX/MyPolyps/._train", b"")
    dataset, problems, _ = build_dataset(str(archive))
    assert problems == [] and (len(dataset["train"]), len(dataset["test"])) == (3, 1)
