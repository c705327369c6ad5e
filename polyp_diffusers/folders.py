"""Output folders written without losing anything: never over an input, never half, never a lost previous copy.

Every command writes its output into a staging folder beside it (`.<name>.partial-<pid>`) and moves it into
place once complete. A previous output is moved aside (`.<name>.previous`) first and deleted only once the new
one is in place; a run killed between the two moves is repaired by the next run on the same output. Commands
that write into their output as they go hold an `OutputClaim` on it, so that a second one is refused.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: outputs are written unclaimed (OutputClaim)
    fcntl = None

logger = logging.getLogger(__name__)


def check_output_apart(output: str | os.PathLike, inputs: dict[str, str | None]) -> None:
    """
    Refuses an output that is, lies above or lies inside one of the inputs (`{what: path}`): replacing it would
    delete them, and writing inside one mixes the output into it (where rewriting that input would delete it).
    """
    target = Path(output).resolve()
    for what, value in inputs.items():
        if value is not None and Path(value).exists():
            path = Path(value).resolve()
            if path == target or target in path.parents:
                raise ValueError(
                    f"the output {output} is or contains the {what} {value}; writing it would delete the input. "
                    "Choose another output folder."
                )
            if path in target.parents:
                raise ValueError(
                    f"the output {output} lies inside the {what} {value}; writing it would mix it into the input. "
                    "Choose a folder outside it."
                )


def check_result_file(path: str | os.PathLike, key: str) -> None:
    """
    Refuses, before any work, a result file that cannot be written, or that holds something other than an earlier
    result of the same command (a JSON object with `key`): writing would destroy it.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; name a file to write.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--output {path}: the folder {path.parent} does not exist.")
    if path.exists() and path.stat().st_size:  # an empty file (`mktemp`) holds nothing to lose
        try:
            earlier = json.loads(path.read_text())
        except ValueError:  # not JSON, or not text
            earlier = None
        if not isinstance(earlier, dict) or key not in earlier:
            raise ValueError(
                f"--output {path} exists and is not an earlier result of this command; choose another file name."
            )


def check_is_folder(output: str | os.PathLike) -> None:
    if Path(output).exists() and not Path(output).is_dir():
        raise FileExistsError(f"the output {output} is a file; expected a folder to write.")
    file_above = next((parent for parent in Path(output).parents if parent.is_file()), None)
    if file_above is not None:
        raise FileExistsError(f"the output {output} lies under {file_above}, which is a file; expected folders.")


def is_empty(folder: str | os.PathLike) -> bool:
    """True for a missing or empty folder."""
    return not Path(folder).exists() or not any(Path(folder).iterdir())


def visible_entries(folder: str | os.PathLike) -> list[str]:
    """
    The names in `folder` (none if it is missing), leaving out hidden ones: the clutter of file browsers and editors
    (`.DS_Store`, `.ipynb_checkpoints`) and our own staging, never what a run must not write over.
    """
    folder = Path(folder)
    return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith(".")) if folder.is_dir() else []


# What file browsers and notebooks leave in any folder they show (any case): nothing a user would miss.
CLUTTER_NAMES = {".ds_store", ".ipynb_checkpoints", ".directory", "thumbs.db", "desktop.ini"}


def is_clutter(name: str) -> bool:
    """A file browser's or notebook's file (`CLUTTER_NAMES`, macOS's `._` resource forks)."""
    return name.lower() in CLUTTER_NAMES or name.startswith("._")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time (weights files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):  # hashlib.file_digest is Python 3.11+
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes a small file so that a kill leaves the old content or the new one, never half of it."""
    path = Path(path)
    staging = path.with_name(f"{path.name}.partial")
    staging.write_text(text)
    os.replace(staging, path)


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.previous"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_interrupted_write(output: str | os.PathLike) -> None:
    """
    Repairs what a killed write left beside `output`: puts back a previous copy moved aside just before the kill,
    and removes staging folders of processes that no longer run. Staging folders of running writers stay.
    """
    target = Path(output).resolve()
    previous = _previous(target)
    if previous.exists():
        if target.exists():
            shutil.rmtree(previous)  # killed while deleting the replaced copy: the new one is in place
        else:
            os.replace(previous, target)
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_is_running(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def staging_folder(output: str | os.PathLike) -> Path:
    """A new, empty folder beside `output` for this process to write into before `replace_folder`."""
    target = Path(output).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_write(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def replace_folder(new: Path, output: str | os.PathLike) -> None:
    """Moves the complete folder `new` to `output`; a previous `output` is deleted only once `new` is in place."""
    target = Path(output).resolve()
    previous = _previous(target)
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    try:
        os.replace(new, target)
    except BaseException:  # also Ctrl-C between the two moves
        if previous.exists() and not target.exists():
            os.replace(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


class OutputInUseError(OSError):
    """Another running command is writing the same output."""


class OutputClaim:
    """
    This process's claim on an output it writes into as it goes (checkpoints, batches of pairs, a study's steps):
    a second command on the same output, such as a job submitted twice, is refused at once instead of the two
    writing over, pruning or deleting each other's files. Held until `release` (or the end of a `with` block, or
    of the process).

    An OS lock (`flock`) on a hidden file that names its holder's process id and host: `OUTPUT/.lock` inside the
    output (created if missing), or `.NAME.lock` beside it with `beside=True`, for a command that replaces the
    whole folder. The file stays; the OS releases the lock when its process ends, however it ends, so a killed run
    never blocks the next one. On a shared file system that supports locks it also holds between the machines of
    a cluster; where there are no locks (Windows, some network file systems) the output is written unclaimed, with
    a warning.
    """

    def __init__(self, output: str | os.PathLike, beside: bool = False):
        target = Path(output)
        folder = target.parent if beside else target
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / (f".{target.resolve().name}.lock" if beside else ".lock")
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            logger.warning(f"{output} is written without a claim: this system has no file locks.")
            return
        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._descriptor, 200).decode(errors="replace").strip()
            self.release()
            raise OutputInUseError(
                f"{output} is being written by another running command ({holder or 'its lock ' + str(self.path)}); "
                "two at once would write over each other's files. Wait for it to end, or choose another output."
            ) from None
        except OSError as error:  # a file system without locks
            logger.warning(f"{output} is written without a claim: its file system has no locks ({error}).")
        else:
            os.ftruncate(self._descriptor, 0)
            os.write(self._descriptor, f"process {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self) -> None:
        """Ends the claim (closing the file releases its lock); a second call does nothing."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def __del__(self):  # a claim dropped without `release` (an error in a caller) ends with the object
        if getattr(self, "_descriptor", None) is not None:
            self.release()

    def __enter__(self) -> "OutputClaim":
        return self

    def __exit__(self, *exception) -> None:
        self.release()
