"""Reading `torch.save` files (the authors' checkpoint, FID's Inception weights) without running what a pickle carries."""

import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

import torch

# Pickle opcodes that import or call an object: what `weights_only=True` refuses beyond its short allow-list.
CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "EXT1", "EXT2", "EXT4"}


def _imports_or_calls(path: Path) -> bool:
    """True when the file's pickle (alone, or `data.pkl` of a torch.save archive) parses and imports or calls."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                opcodes = [op.name for op, _, _ in pickletools.genops(archive.open(name))]
        else:
            with open(path, "rb") as file:
                opcodes = [op.name for op, _, _ in pickletools.genops(file)]
    except (ValueError, StopIteration, zipfile.BadZipFile):  # not a whole pickle: plain garbage
        return False
    return not CODE_OPCODES.isdisjoint(opcodes)


def torch_load_safely(path: str | os.PathLike, expected: str, error_type: type[ValueError] = ValueError):
    """
    `torch.load(path, weights_only=True)` on the CPU, with errors of `error_type` that name the file and say
    whether it would run code or is damaged (`expected`: what the file should hold, for the message). A missing
    file or a folder is the usual `OSError`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected {expected}.")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {expected}.")
    if not path.is_file():  # a device, a pipe
        raise ValueError(f"{path} is not a regular file; expected {expected}.")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on its way to refusing a file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's safe unpickler fails on garbage with any exception (KeyError, ...)
        if isinstance(error, pickle.UnpicklingError) and _imports_or_calls(path):
            raise error_type(
                f"{path} is refused: loading it would run code (it imports or calls objects beyond tensors and "
                f"plain containers); expected {expected}."
            ) from error
        raise error_type(
            f"{path} is not a PyTorch file that can be read safely (truncated, corrupt or not written by "
            f"torch.save; read with weights_only=True); expected {expected}."
        ) from error
