"""Uploads to the Hugging Face Hub: a saved pipeline folder, or a dataset with its card."""

from huggingface_hub import DatasetCard, create_repo, upload_folder


def push_folder(
    folder,
    repo_id: str,
    private: bool = False,
    ignore_patterns: list[str] | None = None,
    commit_message: str = "Upload Polyp-DDPM pipeline",
) -> str:
    """Creates the Hub model repo if needed and uploads a saved pipeline folder with its card; returns the repo id."""
    try:
        repo_id = create_repo(repo_id, exist_ok=True, private=private).repo_id
        upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
        )
    except Exception as error:  # no network, not logged in, no rights: errors of httpx and of the Hub alike
        raise UploadError(
            f"uploading {folder} to the Hub repo {repo_id} failed", error, f"`hf upload {repo_id} {folder}`"
        ) from error
    return repo_id


def push_dataset(dataset, card: str, repo_id: str, private: bool = False) -> None:
    """Uploads a DatasetDict and its card to a Hub dataset repo."""
    try:
        dataset.push_to_hub(repo_id, private=private)
        DatasetCard(card).push_to_hub(repo_id)
    except Exception as error:  # as in push_folder
        retry = f"`datasets.load_from_disk(FOLDER).push_to_hub({repo_id!r})` and its card, FOLDER/README.md"
        raise UploadError(f"uploading the dataset to the Hub repo {repo_id} failed", error, retry) from error


class UploadError(OSError):
    """An upload that failed after the files were written locally: what failed, why, and how to upload them later."""

    def __init__(self, what: str, cause: Exception, retry: str):
        super().__init__(
            f"{what} ({type(cause).__name__}: {cause}); the files are saved locally: upload them with {retry}."
        )
