"""Uploads to the Hugging Face Hub: a saved pipeline folder, or a dataset with its card."""

from huggingface_hub import DatasetCard, create_repo, upload_folder


def push_folder(
    folder,
    repo_id: str,
    private: bool = False,
    ignore_patterns: list[str] | None = None,
    commit_message: str = "Upload Polyp-DDPM pipeline",
) -> str:
    """
    Creates the Hub model repo if needed and uploads a saved pipeline folder with its card; returns the repo id. A
    failure is an `UploadError` that gives the `hf upload` command doing the same (the same files left out, as
    private).
    """
    try:
        repo_id = create_repo(repo_id, exist_ok=True, private=private).repo_id
        upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
        )
    except Exception as error:  # no network, not logged in, no rights: errors of httpx and of the Hub alike
        excluded = "".join(f" --exclude '{pattern}'" for pattern in ignore_patterns or ())
        retry = f"`hf upload {repo_id} {folder} .{excluded}{' --private' if private else ''}`"
        raise upload_error(f"uploading {folder} to the Hub repo {repo_id}", error, retry) from error
    return repo_id


def push_dataset(dataset, card: str, repo_id: str, private: bool = False) -> None:
    """Uploads a DatasetDict and its card to a Hub dataset repo; a failure is an `UploadError`, as in `push_folder`."""
    try:
        dataset.push_to_hub(repo_id, private=private)
        DatasetCard(card).push_to_hub(repo_id)
    except Exception as error:  # as in push_folder
        push = f"push_to_hub({repo_id!r}{', private=True' if private else ''})"
        retry = (
            f"`datasets.load_from_disk(FOLDER).{push}` and `huggingface_hub.DatasetCard.load(FOLDER/README.md).{push}`"
        )
        raise upload_error(f"uploading the dataset to the Hub repo {repo_id}", error, retry) from error


class UploadError(OSError):
    """An upload that failed after the files were written locally."""


def upload_error(what: str, cause: Exception, retry: str) -> UploadError:
    """What failed, why, and how to upload the files later."""
    return UploadError(
        f"{what} failed ({type(cause).__name__}: {cause}); the files are saved locally: upload them with {retry}."
    )
