"""Image/mask pairs as a `datasets.DatasetDict`: reading, validating, splitting and writing them.

Sources: a Kvasir-SEG-style folder (`images/` + `masks/`, matched by file stem), the same as a zip file, a
`save_to_disk` folder or a Hub dataset id. Every source goes through one validation pass before anything is
written; problems are reported, never silently dropped. The `prepare-data` command itself (card, demo set,
upload) is `prepare_data.py`.
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

import numpy as np
import PIL.Image
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .arguments import check_test_size
from .folders import check_is_folder, is_clutter, is_empty, replace_folder, staging_folder
from .pipelines.pipeline_polyp_ddpm import MAX_POLYP_FRACTION, check_frame_mode, check_positive_int, prepare_masks

logger = logging.getLogger(__name__)

# A split's name, as `datasets` names them (`datasets.naming`: letters, digits and '_', parts joined by '.'), and
# '-', which `save_to_disk` takes too: each is a folder of the dataset, never a path out of it.
SPLIT_NAME = re.compile(r"[\w-]+(\.[\w-]+)*")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".tif", ".tiff", ".bmp", ".webp")
# Folders one level below a source that hold its own splits (train/images, test/images, ...), and their split names.
SPLIT_FOLDERS = {
    "train": "train", "training": "train", "test": "test", "testing": "test",
    "val": "validation", "valid": "validation", "validation": "validation",
}  # fmt: skip

FEATURES = Features(
    {
        "image": ImageFeature(mode="RGB"),
        "mask": ImageFeature(mode="L"),
        "id": Value("string"),
        "width": Value("int32"),
        "height": Value("int32"),
    }
)
REPORT_FILE = "validation_report.json"
# What `polyp-ddpm generate` records beside its pairs: how they were made, from which dataset's masks
# (`mask_dataset`, `split`). The segmentation benchmark reads it to keep the test pairs out of training.
GENERATION_SETTINGS_FILE = "generation.json"
# The paper: 900 of Kvasir-SEG's 1000 pairs for training, 100 for testing; 10% of a source under 1000 pairs.
DEFAULT_TEST_SIZE = 100
DEFAULT_TEST_FRACTION = 0.1
# Masks whose polyp covers more than this share of the frame, in the middle mask of a source: likely inverted
# (Kvasir-SEG's middle mask: 11%).
INVERTED_MEDIAN_FRACTION = 0.5
DEFAULT_SPLIT_SEED = 42
# EXIF orientation tag values and the transposition that shows the picture upright.
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}


class DataValidationError(ValueError):
    """Raised when a source has invalid pairs; `problems` lists every one of them."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(
            f"{len(problems)} problem(s) found; nothing was written. Fix them, or pass skip_invalid=True "
            f"(--skip-invalid) to write only the valid pairs and this report:\n{lines}"
        )


@dataclass
class Problem:
    id: str
    kind: str
    detail: str

    def __str__(self):
        return f"{self.id}: {self.kind}: {self.detail}"


@dataclass
class RawPair:
    """A pair before validation: where its image and mask come from (file paths or encoded file bytes)."""

    id: str
    image: "str | bytes"
    mask: "str | bytes"


def _open_fully(source: "str | bytes") -> PIL.Image.Image:
    """Opens and decodes an image completely, so truncated files fail here and not later."""
    with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return image.copy()


def binarize_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """A mask as a one-channel 0/255 image of the same size (JPEG artifacts thresholded away)."""
    binary = prepare_masks(mask, (mask.height, mask.width))[0, 0]
    return PIL.Image.fromarray((binary.numpy() * 255).astype(np.uint8), mode="L")


def png_cell(image: "PIL.Image.Image | np.ndarray") -> dict:
    """An image (or uint8 array) as a lossless PNG value for a `datasets.Image` column."""
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _file_bytes(source: "str | bytes") -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _orientation(image: PIL.Image.Image) -> int:
    return image.getexif().get(EXIF_ORIENTATION, 1)


def validate_pair(pair: RawPair, resolution: int | None = None) -> dict:
    """
    Decodes, checks and encodes one pair as a row of `FEATURES`; raises ValueError naming the problem.

    An image with an EXIF orientation tag is turned upright, and its mask with it (annotation tools draw on
    the stored pixel grid, which is the mask's grid): `datasets` would otherwise rotate the image on decode and
    leave the mask as it is.
    """
    try:
        image = _open_fully(pair.image)
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable image: {error}") from error
    try:
        mask = _open_fully(pair.mask)
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"unreadable mask: {error}") from error
    check_frame_mode(image, "the image")
    orientation, mask_orientation = _orientation(image), _orientation(mask)
    if image.size != mask.size:
        turned = orientation in (5, 6, 7, 8) and mask_orientation == 1 and image.size == mask.size[::-1]
        hint = (
            f" (the image's EXIF orientation {orientation} shows it upright as {image.height}x{image.width}, the "
            "mask's size: masks must be drawn on the image as stored; turn the mask back, or drop the image's tag)"
            if turned
            else ""
        )
        raise ValueError(
            f"size mismatch: image is {image.width}x{image.height}, mask is {mask.width}x{mask.height}{hint}"
        )
    if mask_orientation not in (1, orientation):
        raise ValueError(f"EXIF orientation {orientation} of the image and {mask_orientation} of the mask disagree")
    try:
        binary = binarize_mask(mask)
    except ValueError as error:
        raise ValueError(f"invalid mask: {error}") from error
    polyp_fraction = np.asarray(binary).mean() / 255
    if polyp_fraction == 0:
        raise ValueError("empty mask: no polyp pixel")
    if polyp_fraction > MAX_POLYP_FRACTION:
        logger.warning(
            f"{pair.id}: the polyp covers {polyp_fraction:.0%} of the mask; is the mask inverted "
            "(white should be the polyp, black the background)?"
        )
    if orientation in ORIENTATION_TRANSPOSE:
        image = image.convert("RGB").transpose(ORIENTATION_TRANSPOSE[orientation])
        binary = binary.transpose(ORIENTATION_TRANSPOSE[orientation])
    width, height = image.size
    keep_image_bytes = resolution is None and orientation == 1
    if resolution is not None:
        image = image.convert("RGB").resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
        binary = binary.resize((resolution, resolution), PIL.Image.Resampling.NEAREST)
        if not np.asarray(binary).any():  # an empty mask, as refused above, made by the resize
            raise ValueError(
                f"the polyp ({polyp_fraction:.2%} of {width}x{height} pixels) vanishes when resized to "
                f"{resolution}x{resolution}: use a larger --resolution"
            )
    # Files are kept byte for byte (no recompression); decoded, turned or resized images are stored as PNG.
    return {
        "image": {"bytes": _file_bytes(pair.image), "path": None} if keep_image_bytes else png_cell(image),
        "mask": png_cell(binary),
        "id": pair.id,
        "width": width,
        "height": height,
    }


def _files_by_stem(folder: Path, kind: str, problems: list[Problem]) -> dict[str, Path]:
    """The image files of a folder by stem; a subfolder or a file of another type is a problem, not a silent skip."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or is_clutter(path.name):
            continue
        if path.is_dir():
            problems.append(
                Problem(path.name, f"{kind} subfolder not read", f"{path}: pairs are read from {folder} itself")
            )
            continue
        if not path.is_file():  # reading a pipe or a device would wait forever; a broken link has nothing to read
            problems.append(
                Problem(path.stem, f"not a regular file ({kind})", f"{path}: a broken link, pipe or device")
            )
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            supported = ", ".join(extension[1:] for extension in IMAGE_EXTENSIONS)
            problems.append(Problem(path.stem, f"not an image file ({kind})", f"{path} (read: {supported})"))
            continue
        if path.stem in files:
            problems.append(Problem(path.stem, f"duplicate {kind}", f"{files[path.stem].name} and {path.name}"))
            continue
        files[path.stem] = path
    return files


def _find_pair_folders(root: Path, image_dir: str, mask_dir: str) -> dict[str, Path]:
    """
    The folder holding `image_dir` and `mask_dir`, as `{"all": folder}`: the root itself or one level below (as
    in the Kvasir-SEG zip). Several such folders one level below are the source's own splits when they are named
    as splits (`train/`, `test/`, `val/`, ...), and refused otherwise.
    """
    for flag, folder in (("--image-dir", image_dir), ("--mask-dir", mask_dir)):
        # Inside the source: elsewhere, an output checked apart from the source could land among the pairs read.
        if not PurePath(folder).parts or PurePath(folder).is_absolute() or ".." in PurePath(folder).parts:
            raise ValueError(
                f"{flag} {folder!r} is not a folder inside the source; name it relative to the source (or to each "
                "of its split folders), without '..'."
            )
    if (root / image_dir).resolve() == (root / mask_dir).resolve():
        raise ValueError(
            f"--image-dir and --mask-dir both name {root / image_dir}: images and masks must be in two folders, "
            "matched by file name."
        )
    if (root / image_dir).is_dir() and (root / mask_dir).is_dir():
        return {"all": root}
    below = sorted(p for p in root.iterdir() if p.is_dir())
    holding = [folder for folder in below if (folder / image_dir).is_dir() and (folder / mask_dir).is_dir()]
    if len(holding) == 1:
        return {"all": holding[0]}
    if holding:
        splits = {SPLIT_FOLDERS.get(folder.name.lower()): folder for folder in holding}
        if None not in splits and len(splits) == len(holding):
            return splits
        first = holding[0].name
        raise ValueError(
            f"{root} holds '{image_dir}/' and '{mask_dir}/' in {len(holding)} folders "
            f"({', '.join(folder.name for folder in holding)}), which are not named as splits (train, test, val); "
            f"read one with --image-dir {first}/{image_dir} --mask-dir {first}/{mask_dir}, or put all pairs in one "
            "pair of folders."
        )
    for folder in [root, *below]:
        missing = [name for name in (image_dir, mask_dir) if not (folder / name).is_dir()]
        if len(missing) == 1:
            option = "--image-dir" if missing[0] == image_dir else "--mask-dir"
            raise FileNotFoundError(
                f"{folder} has no '{missing[0]}/' folder; name the folder that holds the "
                f"{'images' if option == '--image-dir' else 'masks'} with {option}."
            )
    present = ", ".join(f"'{folder.name}/'" for folder in below[:8]) or "no folder"
    raise FileNotFoundError(
        f"{root} has no '{image_dir}/' and '{mask_dir}/' folders (nor one level below; it holds {present}); "
        "name them with --image-dir and --mask-dir (paths inside the source, names match case)."
    )


def pairs_from_folder(
    root: Path, image_dir: str = "images", mask_dir: str = "masks"
) -> tuple[dict[str, list[RawPair]], list[Problem]]:
    """
    Pairs images and masks by file stem, per split (`{"all": pairs}` unless the source has split folders, see
    `_find_pair_folders`); orphans on either side are problems.
    """
    problems: list[Problem] = []
    by_split = {}
    for split, folder in _find_pair_folders(root, image_dir, mask_dir).items():
        images = _files_by_stem(folder / image_dir, "image", problems)
        masks = _files_by_stem(folder / mask_dir, "mask", problems)
        orphan_masks = masks.keys() - images.keys()
        for stem in sorted(images.keys() - masks.keys()):
            problems.append(Problem(stem, "image without mask", str(images[stem]) + _named_alike(stem, orphan_masks)))
        for stem in sorted(orphan_masks):
            problems.append(Problem(stem, "mask without image", str(masks[stem])))
        by_split[split] = [
            RawPair(stem, str(images[stem]), str(masks[stem])) for stem in sorted(images.keys() & masks.keys())
        ]
    return by_split, problems


def _named_alike(stem: str, orphan_masks: set[str]) -> str:
    """A hint for an image without a mask when an orphan mask's name holds the image's (`a` and `a_mask`)."""
    alike = sorted(mask for mask in orphan_masks if stem in mask and len(mask) - len(stem) <= 8)
    if not alike:
        return ""
    return f" (the mask {alike[0]!r} is there: an image and its mask must have the same file name, apart from the extension)"


def _check_pair_columns(splits: DatasetDict, source: str) -> None:
    for split, dataset in splits.items():
        if not {"image", "mask"} <= set(dataset.column_names):
            raise ValueError(
                f"{source} (split {split!r}) has columns {dataset.column_names}; expected 'image' and 'mask': rename "
                "its columns (`DatasetDict.rename_columns({'pixel_values': 'image', 'label': 'mask'})`, with its "
                "own names), save it with `save_to_disk`, and make it a dataset with `polyp-ddpm prepare-data`."
            )


def _encoded(cell: dict) -> "str | bytes":
    """An undecoded `datasets.Image` cell: its file bytes, or the file it points at."""
    return cell["bytes"] if cell["bytes"] is not None else cell["path"]


def pair_ids(dataset: Dataset, split: str) -> list[str]:
    """
    A split's pair ids: its `id` column, or `SPLIT-00000`... for a dataset without one. Preparing, generating and
    the segmenter's leakage check all name pairs by this rule, so that their ids match.
    """
    if "id" in dataset.column_names:
        return list(dataset["id"])
    return [f"{split}-{i:05d}" for i in range(len(dataset))]


def _pairs_from_datasets(splits: DatasetDict, source: str) -> dict[str, list[RawPair]]:
    """
    The pairs of a dataset as their encoded files: `datasets` would apply an image's EXIF orientation on decode
    (and not its mask's), so `validate_pair` must see the files as stored.
    """
    _check_pair_columns(splits, source)
    by_split = {}
    for split, dataset in splits.items():
        ids = pair_ids(dataset, split)
        encoded = dataset.cast_column("image", ImageFeature(decode=False)).cast_column(
            "mask", ImageFeature(decode=False)
        )
        by_split[split] = [
            RawPair(str(i), _encoded(row["image"]), _encoded(row["mask"])) for i, row in zip(ids, encoded)
        ]
    return by_split


def read_pairs(
    source: str, scratch: str | os.PathLike, image_dir: str = "images", mask_dir: str = "masks"
) -> tuple[dict[str, list[RawPair]], list[Problem]]:
    """
    Reads a source into raw pairs per split (`{"all": [...]}` when the source has no splits of its own).

    `source` is a folder (Kvasir-SEG layout or a `save_to_disk` folder), a zip of such a folder (extracted
    into `scratch`), or a Hub dataset id.
    """
    path = Path(source)
    if path.is_file() and (path.suffix.lower() == ".zip" or zipfile.is_zipfile(path)):
        _extract_zip(path, scratch)
        try:
            by_split, problems = pairs_from_folder(_zipped_folder(Path(scratch), image_dir), image_dir, mask_dir)
        except (OSError, ValueError) as error:  # named by the zip, not by the scratch folder that is gone after
            raise type(error)(_in_zip(str(error), scratch, path)) from None
        for problem in problems:
            problem.detail = _in_zip(problem.detail, scratch, path)
        return by_split, problems
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
            splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"all": loaded})
            return _pairs_from_datasets(splits, source), []
        return pairs_from_folder(path, image_dir, mask_dir)
    if path.exists():
        raise ValueError(f"{source} is neither a folder nor a zip file.")
    return _pairs_from_datasets(_load_hub_dataset(source), source), []


def _zipped_folder(root: Path, image_dir: str) -> Path:
    """
    Where an extracted zip's pairs begin: the one folder it holds when it holds nothing else (a zipped folder, whose
    pair folders, or split folders, are then one level further down), else its root.
    """
    entries = [entry for entry in root.iterdir() if not entry.name.startswith(".") and entry.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and not (root / image_dir).is_dir():
        return entries[0]
    return root


def _in_zip(text: str, scratch: str | os.PathLike, archive: Path) -> str:
    """A message about extracted files, naming them inside the zip (`data.zip:folder/file.png`)."""
    return text.replace(f"{Path(scratch)}{os.sep}", f"{archive}:").replace(str(Path(scratch)), f"{archive}")


def _extract_zip(path: Path, folder: str | os.PathLike) -> None:
    """Extracts a zip source; a truncated or corrupt download is named as such, not as "not a zip file"."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(folder)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is a damaged or incomplete zip file ({error}); download it again.") from error


def is_hub_id(name: str) -> bool:
    """
    Whether a name that is not an existing path may be a Hub repo id (`owner/name`). A name whose first part
    is a local folder (`data/kvasir-seg` where `data/` exists) is a missing path, not a Hub id.
    """
    owner, _, repo = name.partition("/")
    try:
        validate_repo_id(name)  # the Hub's own rule
    except HFValidationError:
        return False
    return bool(owner and repo) and not Path(owner).is_dir()


def check_hub_repo(name: str, repo_type: str) -> None:
    """
    Raises `FileNotFoundError`, saying which, for a name that is neither a local path nor a Hub repo. One request,
    no retries: a mistyped path fails at once instead of after a minute of download retries.
    """
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name} does not exist (and is not a Hub {repo_type} id of the form 'owner/name').")
    try:
        exists = HfApi().repo_exists(name, repo_type=repo_type)
    except Exception as error:  # offline mode, no network, a proxy: several types
        raise FileNotFoundError(
            f"{name} is not a folder under {Path.cwd()}, and the Hub could not be reached to look for a {repo_type} "
            f"of that name ({type(error).__name__}: {error})."
        ) from error
    if not exists:
        raise FileNotFoundError(
            f"{name} is neither a folder under {Path.cwd()} nor a {repo_type} on the Hub (if it is a private or "
            "gated repo, log in first: `hf auth login`)."
        )


def _load_hub_dataset(dataset_id: str) -> DatasetDict:
    """`datasets.load_dataset` for a Hub id, after checking that the name is one (see `check_hub_repo`)."""
    check_hub_repo(dataset_id, "dataset")
    try:
        return load_dataset(dataset_id)
    except Exception as error:  # datasets raises several types: not found, gated, no data files, ...
        raise FileNotFoundError(
            f"loading the Hub dataset {dataset_id} failed: {type(error).__name__}: {error}"
        ) from error


def split_ids(
    ids: list[str], test_size: int | float, seed: int, name: str = "test_size", held_out: str = "test"
) -> dict[str, list[str]]:
    """
    A seeded random train/test split; `test_size` (the option `name`) is a count or a fraction. `held_out` is what
    the caller calls the "test" part, for its error.
    """
    count = round(test_size * len(ids)) if test_size < 1 else int(test_size)
    if not 0 < count < len(ids):
        raise ValueError(f"{name} {test_size} leaves no train or no {held_out} pair out of {len(ids)}.")
    order = np.random.default_rng(seed).permutation(len(ids))
    test = {ids[i] for i in order[:count]}
    return {"train": [i for i in ids if i not in test], "test": [i for i in ids if i in test]}


# Published splits shipped with the package, by the name `--split-file` takes instead of a path.
SHIPPED_SPLITS = {"kvasir-seg-paper": Path(__file__).parent / "splits" / "kvasir-seg-paper.json"}


def split_file_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped split's file (`SHIPPED_SPLITS`), or the path itself."""
    return SHIPPED_SPLITS.get(str(name_or_path), Path(name_or_path))


def read_split_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """
    A JSON object whose list-valued keys are split names and their ids (other keys are ignored); `path` may also
    name a shipped split (`SHIPPED_SPLITS`). An id listed twice is refused, whatever `skip_invalid` says: in two
    splits it leaks test pairs into training (scores that look better than they are), and dropping it instead
    would silently change a published split's counts.
    """
    path = split_file_path(path)
    expected = 'expected an object of split names and their ids, e.g. {"train": [ids], "test": [ids]}'
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # Windows editors may write a BOM
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({error}); {expected}.") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}; {expected}.")
    misshapen = [name for name, ids in content.items() if name.lower() in SPLIT_FOLDERS and not isinstance(ids, list)]
    if misshapen:
        raise ValueError(f"{path}: {', '.join(map(repr, misshapen))} is not a list of ids; {expected}.")
    splits = {name: [str(i) for i in ids] for name, ids in content.items() if isinstance(ids, list)}
    if not splits:
        raise ValueError(f"{path} has no list of ids; {expected}.")
    # Each split is saved as a folder of that name: '../x' or '/x' would write outside the dataset.
    misnamed = [name for name in splits if not SPLIT_NAME.fullmatch(name)]
    if misnamed:
        raise ValueError(
            f"{path}: not a split name: {', '.join(map(repr, misnamed))}; names are letters, digits, '_' and '-', in "
            "parts joined by '.' ('train', 'test', 'test.cvc')."
        )
    splits_of: dict[str, list[str]] = {}
    for name, ids in splits.items():
        for i in ids:
            splits_of.setdefault(i, []).append(name)
    repeated = [f"{i} ({', '.join(names)})" for i, names in splits_of.items() if len(names) > 1]
    if repeated:
        raise ValueError(
            f"{path} lists {len(repeated)} id(s) more than once: {'; '.join(repeated)}; give each one split."
        )
    return splits


def _assign_splits(
    ids: list[str], valid: set[str], split_lists: dict[str, list[str]], problems: list[Problem]
) -> dict[str, list[str]]:
    """The valid ids of each split of a split file; ids of the file and of the source that the other lacks are problems."""
    known = set(ids)
    assigned = {i for members in split_lists.values() for i in members}
    for split, members in split_lists.items():
        for i in members:
            if i not in known:
                stem = Path(i).stem
                hint = f" (ids are file names without extension: {stem!r} is)" if stem != i and stem in known else ""
                problems.append(Problem(i, "id in split file but not in source", split + hint))
    for i in ids:
        if i not in assigned:
            problems.append(Problem(i, "id in source but in no split", "add it to the split file"))
    return {split: [i for i in members if i in valid] for split, members in split_lists.items()}


class BuiltDataset(NamedTuple):
    dataset: DatasetDict
    problems: list[Problem]
    split_description: str  # how the pairs were split, for the dataset card


def default_test_size(num_pairs: int) -> int | float:
    """The paper's 100 test pairs of Kvasir-SEG's 1000, or 10% of a source with fewer pairs."""
    return DEFAULT_TEST_SIZE if num_pairs >= DEFAULT_TEST_SIZE / DEFAULT_TEST_FRACTION else DEFAULT_TEST_FRACTION


def build_dataset(
    source: str,
    test_size: int | float | None = None,
    seed: int = DEFAULT_SPLIT_SEED,
    split_file: str | None = None,
    skip_invalid: bool = False,
    resolution: int | None = None,
    image_dir: str = "images",
    mask_dir: str = "masks",
) -> BuiltDataset:
    """
    Reads, validates and splits a source into a `DatasetDict` with `FEATURES`; returns it with the problems found
    and a description of its split.

    A source without splits is split into train/test (`split_file` ids, or a seeded random `test_size`: by default
    `default_test_size`); a dataset that has splits (or folders named as splits) keeps them, and `test_size` is
    refused for it unless it has a single split, which is then split. With `skip_invalid=False` any problem
    raises `DataValidationError` listing all of them; otherwise the valid pairs are kept and the problems returned.
    """
    if test_size is not None:
        check_test_size(test_size)  # and the rest before validating a single pair
        if split_file is not None:
            raise ValueError("a split file and a test size both say how to split the pairs: give one of them.")
    if resolution is not None:
        check_positive_int(resolution, "resolution")
    split_file_lists = read_split_file(split_file) if split_file is not None else None
    rows: dict[str, dict] = {}
    split_of: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="polyp-data-") as scratch:
        raw_splits, problems = read_pairs(source, scratch, image_dir, mask_dir)
        own_splits = sorted(set(raw_splits) - {"all"})
        if len(own_splits) > 1 and test_size is not None:
            raise ValueError(
                f"{source} has splits of its own ({', '.join(own_splits)}), which are kept; a test size splits only "
                "a source without them (or with one): leave it out, or give a split file."
            )
        with logging_redirect_tqdm():  # a pair's warning on a line of its own, not inside the progress bar
            for split, pairs in raw_splits.items():
                for pair in tqdm(pairs, desc=f"Validating {split} pairs", unit="pair"):
                    if pair.id in split_of:
                        problems.append(Problem(pair.id, "duplicate id", f"in {split_of[pair.id]} and {split}"))
                        continue
                    try:
                        rows[pair.id] = validate_pair(pair, resolution)
                        split_of[pair.id] = split
                    except ValueError as error:
                        problems.append(Problem(pair.id, "invalid pair", _in_zip(str(error), scratch, Path(source))))
    _warn_if_inverted(rows, source)

    if split_file is not None:
        source_ids = sorted({pair.id for pairs in raw_splits.values() for pair in pairs})
        split_lists = _assign_splits(source_ids, set(rows), split_file_lists, problems)
        description = f"the ids listed in `{Path(split_file).name}`."
    if problems and not skip_invalid:
        raise DataValidationError(problems)
    if not rows:
        raise ValueError(f"{source} has no valid image/mask pair.")
    if split_file is None and (not own_splits or (len(raw_splits) == 1 and test_size is not None)):
        is_default = test_size is None
        test_size = default_test_size(len(rows)) if is_default else test_size
        default = "100 pairs, or 10% of a source under 1000 pairs"
        try:
            split_lists = split_ids(sorted(rows), test_size, seed)
        except ValueError as error:
            if not is_default:
                raise
            raise ValueError(f"{error} That is the default test size ({default}): give one that leaves both.") from None
        description = f"seeded random split (seed {seed}, test size {test_size}{f'; the default: {default}' if is_default else ''})."
    elif split_file is None:
        split_lists = {split: [i for i, s in split_of.items() if s == split] for split in raw_splits}
        description = f"the source's own splits ({', '.join(own_splits)})."
        if "test" not in split_lists:
            split_it = (
                "a test size (--test-size) to split it" if len(own_splits) == 1 else "a split file (--split-file)"
            )
            logger.warning(
                f"{source} has no test split (only {', '.join(own_splits)}), and its splits are kept: give {split_it}."
            )
    # A missing split breaks whatever reads it later (`--split test`), so it is an error, not a smaller dataset.
    empty = [split for split, ids in split_lists.items() if not ids]
    if empty:
        of_split_file = f" of {split_file}" if split_file else ""
        raise ValueError(
            f"{source} has no valid image/mask pair for split(s) {', '.join(empty)}{of_split_file}; nothing was written."
        )
    dataset = DatasetDict(
        {split: Dataset.from_list([rows[i] for i in ids], features=FEATURES) for split, ids in split_lists.items()}
    )
    return BuiltDataset(dataset, problems, description)


def _warn_if_inverted(rows: dict[str, dict], source: str) -> None:
    """
    A warning when the polyp covers most of the frame in the middle mask of a source: masks drawn black on white
    (each pair's own warning catches only masks above `MAX_POLYP_FRACTION`).
    """
    if not rows:
        return
    fractions = [np.asarray(PIL.Image.open(io.BytesIO(row["mask"]["bytes"]))).mean() / 255 for row in rows.values()]
    median = float(np.median(fractions))
    if median > INVERTED_MEDIAN_FRACTION:
        logger.warning(
            f"the polyp covers {median:.0%} of the middle mask of {source} (Kvasir-SEG's: 11%): are its masks inverted? "
            "White (or 1) must be the polyp, black (0) the background."
        )


def write_dataset(
    dataset: DatasetDict,
    output: str | os.PathLike,
    card: str,
    problems: list[Problem] = (),
    overwrite: bool = False,
    extra_files: dict[str, str | bytes] | None = None,
    before_replacing: Callable[[], None] | None = None,
) -> Path:
    """
    Writes `save_to_disk` files, the dataset card, the validation report and `extra_files` (name: text or bytes) into a
    staging folder, and moves it into place once complete (`folders.py`): a crash never leaves a half dataset.
    With `overwrite`, an existing output is replaced; which outputs a command may replace is the caller's rule,
    which `before_replacing` checks again at the last moment (files put there while the dataset was written).
    """
    check_is_folder(output)
    if not is_empty(output) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; choose another --output or pass --overwrite.")
    staging = staging_folder(output)
    try:
        dataset.save_to_disk(str(staging))
        (staging / "README.md").write_text(card)
        report = {
            "problems": [asdict(problem) for problem in problems],
            "counts": {s: len(d) for s, d in dataset.items()},
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        for name, content in (extra_files or {}).items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                (staging / name).write_text(content)
        if before_replacing is not None and Path(output).exists():
            before_replacing()
        replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Path(output)


# What `Dataset.save_to_disk` writes into a split's folder, and what datasets caches beside it.
SPLIT_FILE_PATTERNS = ("data-*.arrow", "dataset_info.json", "state.json", "cache-*.arrow")


def check_only_written_by(output: str | os.PathLike, command: str, extra_names: tuple[str, ...] = ()) -> None:
    """
    Refuses to replace `output` while it holds files that `write_dataset` (and `command`, its `extra_names`) does
    not write there: replacing the folder would delete them. Hidden ones count too (a dataset repo's `.git` and
    `.gitattributes`, a `.env`), but for file browsers' clutter (`is_clutter`).
    """
    written = {"dataset_dict.json", "README.md", REPORT_FILE, *extra_names}

    def is_split_file(path: Path) -> bool:
        return any(path.match(pattern) for pattern in SPLIT_FILE_PATTERNS)

    def foreign_in(entry: Path) -> list[str]:
        """`entry`'s name, or the foreign files of a split's folder (`train/notes.md`): what to move out."""
        if is_clutter(entry.name) or entry.name in written:
            return []
        parts = list(entry.iterdir()) if entry.is_dir() else []
        if entry.is_dir() and not parts:  # an empty folder holds nothing to lose
            return []
        if any(is_split_file(part) for part in parts):
            return [
                f"{entry.name}/{part.name}" for part in parts if not is_split_file(part) and not is_clutter(part.name)
            ]
        return [entry.name]

    foreign = sorted(name for entry in Path(output).iterdir() for name in foreign_in(entry))
    if foreign:
        raise FileExistsError(
            f"{output} holds {', '.join(foreign[:5])}, which `polyp-ddpm {command}` does not write: the dataset replaces "
            "the whole folder, which would delete them, so it is left alone. Move them out, or choose another --output."
        )


def pairs_digest(dataset: Dataset) -> str:
    """
    The SHA-256 of a split's pairs as stored (ids, image and mask files): the same for the same data however it is
    loaded (a copy elsewhere, a Hub repo at another commit), unlike a `datasets` fingerprint.
    """
    digest = hashlib.sha256()
    columns = [name for name in ("id", "image", "mask") if name in dataset.column_names]
    stored = dataset.select_columns(columns)
    for name in ("image", "mask"):
        stored = stored.cast_column(name, ImageFeature(decode=False))
    for batch in stored.iter(batch_size=256):
        for name in columns:
            for value in batch[name]:
                digest.update(str(value).encode() if name == "id" else _encoded_bytes(value))
    return digest.hexdigest()


def _encoded_bytes(cell: dict) -> bytes:
    """An undecoded image cell's file bytes (read from its file when the cell holds only a path)."""
    return _file_bytes(_encoded(cell))


def local_path_or_id(path_or_id: str) -> str:
    """
    What names one dataset or model however it is written, from any folder: an existing path resolved, else the
    Hub id as it is.
    """
    path = Path(path_or_id)
    return str(path.resolve()) if path.exists() else path_or_id


def generation_settings(dataset: str | os.PathLike) -> dict | None:
    """
    The settings `polyp-ddpm generate` recorded beside a dataset it made (`generation.json`), None for any other
    dataset; a file that is not a JSON object is a ValueError naming it.
    """
    path = Path(dataset) / GENERATION_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is damaged ({type(error).__name__}: {error})") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(settings).__name__}, not an object)")
    return settings


def parse_dataset_spec(spec: str, default_split: str = "test") -> tuple[str, str]:
    """
    `DATASET[:SPLIT]` (a folder or Hub id, then an optional split name) as `(dataset, split)`. A folder whose own
    name holds a colon (`runs/12:30`) is a dataset without a split.
    """
    dataset, separator, split = spec.rpartition(":")
    return (dataset, split) if separator and dataset and not Path(spec).exists() else (spec, default_split)


def load_polyp_dataset(path_or_id: str, split: str | None = None) -> Dataset | DatasetDict:
    """
    Loads a prepared dataset (a `prepare-data` folder or a Hub id) and checks it has the polyp schema. With
    `split`, returns that split; a single dataset without splits is returned only when no split is asked for.
    """
    if Path(path_or_id).exists():
        try:
            loaded = load_from_disk(path_or_id)
        # Not a saved dataset, or a damaged one: truncated Arrow, bad JSON, JSON of another shape ([] or {}).
        except (ValueError, OSError, TypeError, KeyError) as error:
            raise ValueError(f"{path_or_id} cannot be read as a prepared dataset: {error}") from error
        except IndexError as error:  # what `datasets` raises for a split saved with no pairs
            raise ValueError(
                f"{path_or_id} cannot be read as a prepared dataset: a split of it holds no pairs."
            ) from error
    else:
        loaded = _load_hub_dataset(path_or_id)
    _check_pair_columns(loaded if isinstance(loaded, DatasetDict) else {"dataset": loaded}, path_or_id)
    if split is None:
        return loaded
    if not isinstance(loaded, DatasetDict):
        raise ValueError(
            f"{path_or_id} is a single dataset without splits, so it has no split {split!r}; make a train/test "
            "dataset of it with `polyp-ddpm prepare-data`."
        )
    if split not in loaded:
        raise ValueError(
            f"{path_or_id} has splits {sorted(loaded)}; split {split!r} is not one of them. Name one as "
            f"DATASET:SPLIT ({path_or_id}:{sorted(loaded)[0]}), or with the command's split flag."
        )
    return loaded[split]
