"""Uploads to the Hugging Face Hub: a saved pipeline folder, or a dataset with its card."""

import shlex
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import DatasetCard, create_repo, upload_folder
from huggingface_hub.utils import HFValidationError, validate_repo_id


def hub_repo_id(repo_id: str | None, folder, flag: str) -> str:
    """
    The repo an upload goes to (`repo_id`, or the folder's name), checked before any work: the Hub refuses spaces,
    accents and more, which the default, a folder's name, may hold.
    """
    chosen = repo_id or Path(folder).resolve().name
    try:
        validate_repo_id(chosen)
    except HFValidationError as error:
        where = "" if repo_id else " (by default the output folder's name)"
        raise ValueError(
            f"{chosen!r}{where} cannot be a Hub repo id: {error} Name one with {flag} USER/NAME."
        ) from None
    return chosen


def push_folder(
    folder,
    repo_id: str,
    private: bool = False,
    ignore_patterns: list[str] | None = None,
    commit_message: str = "Upload Polyp-DDPM pipeline",
    name_repo: Callable[[str], None] | None = None,
) -> str:
    """
    Creates the Hub model repo if needed and uploads a saved pipeline folder with its card; returns the repo id. A
    failure is an `UploadError` that gives the `hf upload` command doing the same (the same files left out, as
    private). `name_repo` is given the full id (`USER/NAME`) before the upload where the Hub added a namespace to
    `repo_id`, so that the card's code names the repo it is in.
    """
    try:
        created = create_repo(repo_id, exist_ok=True, private=private).repo_id
        if created != repo_id and name_repo is not None:
            name_repo(created)
        repo_id = created
        upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
        )
    except Exception as error:  # no network, not logged in, no rights: errors of httpx and of the Hub alike
        excluded = "".join(f" --exclude {shlex.quote(pattern)}" for pattern in ignore_patterns or ())
        retry = f"`hf upload {repo_id} {shlex.quote(str(folder))} .{excluded}{' --private' if private else ''}`"
        raise upload_error(f"uploading {folder} to the Hub repo {repo_id}", error, retry) from error
    return repo_id


def push_dataset(dataset, card: str, repo_id: str, folder, private: bool = False) -> None:
    """
    Uploads a DatasetDict and its card (both saved in `folder`) to a Hub dataset repo; a failure is an
    `UploadError`, as in `push_folder`.
    """
    try:
        dataset.push_to_hub(repo_id, private=private)
        DatasetCard(card).push_to_hub(repo_id)
    except Exception as error:  # as in push_folder
        push = f"push_to_hub({repo_id!r}{', private=True' if private else ''})"
        folder = str(folder)
        retry = (
            f"`datasets.load_from_disk({folder!r}).{push}` and "
            f"`huggingface_hub.DatasetCard.load({str(Path(folder) / 'README.md')!r}).{push}`"
        )
        raise upload_error(f"uploading the dataset to the Hub repo {repo_id}", error, retry) from error


class UploadError(OSError):
    """An upload that failed after the files were written locally."""


def upload_error(what: str, cause: Exception, retry: str) -> UploadError:
    """What failed, why, and how to upload the files later."""
    return UploadError(
        f"{what} failed ({type(cause).__name__}: {cause}); the files are saved locally: upload them with {retry}."
    )
