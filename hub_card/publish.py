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
    repo_id = create_repo(repo_id, exist_ok=True, private=private).repo_id
    upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore_patterns
    )
    return repo_id


def push_dataset(dataset, card: str, repo_id: str, private: bool = False) -> None:
    """Uploads a DatasetDict and its card to a Hub dataset repo."""
    dataset.push_to_hub(repo_id, private=private)
    DatasetCard(card).push_to_hub(repo_id)
