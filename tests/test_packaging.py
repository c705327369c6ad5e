"""The package as users install it: a wheel (not editable) must work from any directory, with its console script."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

# What a wheel needs to be built: the package, the folders linked into it, and the project metadata.
SOURCES = ("polyp_diffusers", "pipelines", "hub_card", "pyproject.toml", "README.md", "LICENSE")
CHECK = (
    "import polyp_diffusers.pipelines as p; from polyp_diffusers import PolypDDPMPipeline; "
    "from polyp_diffusers.hub_card.cards import TEMPLATES; print(p.__file__, (TEMPLATES / 'model_card.md').is_file())"
)


def copy_project(destination):
    """What a build needs, links kept as links (as in a git checkout)."""
    destination.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, destination / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, destination / name)
    return destination


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project built as a wheel and installed (without dependencies: they are this venv's) into a folder."""
    root = tmp_path_factory.mktemp("packaging")
    source = copy_project(root / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
        check=True,
        timeout=300,
    )
    wheel = next((root / "dist").glob("polyp_diffusers-*.whl"))
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    return site


def run_python(site, cwd, *argv):
    env = {"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_holds_the_pipeline_file_and_the_card_templates(installed_wheel):
    package = installed_wheel / "polyp_diffusers"
    assert (package / "pipelines" / "pipeline_polyp_ddpm.py").is_file()
    assert not (package / "pipelines").is_symlink()
    assert (package / "hub_card" / "model_card.md").is_file() and (package / "hub_card" / "dataset_card.md").is_file()
    assert (package / "pipelines" / "pipeline_polyp_ddpm.py").read_bytes() == (
        REPO_ROOT / "pipelines" / "pipeline_polyp_ddpm.py"
    ).read_bytes()


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_the_installed_package_imports_from_any_directory(installed_wheel, tmp_path, where):
    """From the root the source folder shadows the installed package (Python puts the current directory first)."""
    cwd = REPO_ROOT if where == "repository root" else tmp_path
    result = run_python(installed_wheel, cwd, sys.executable, "-c", CHECK)
    assert result.returncode == 0, result.stderr
    pipelines_file, has_templates = result.stdout.split()
    assert Path(pipelines_file).is_relative_to(REPO_ROOT if cwd == REPO_ROOT else installed_wheel)
    assert has_templates == "True"


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_the_console_script_runs_from_any_directory(installed_wheel, tmp_path, where):
    cwd = REPO_ROOT if where == "repository root" else tmp_path
    result = run_python(installed_wheel, cwd, str(installed_wheel / "bin" / "polyp-ddpm"), "generate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--mask-dataset" in result.stdout


def test_the_source_distribution_holds_the_files_behind_the_links(tmp_path):
    """An sdist is what pip builds from when there is no wheel: the linked folders must travel as files."""
    build = "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"
    source = copy_project(tmp_path / "source")
    result = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with tarfile.open(source / "dist" / result.stdout.split()[-1]) as archive:
        members = {member.name.partition("/")[2]: member for member in archive.getmembers()}
    for name in ("polyp_diffusers/pipelines/pipeline_polyp_ddpm.py", "polyp_diffusers/hub_card/model_card.md"):
        assert members[name].isfile(), name


def test_the_editable_install_runs_from_elsewhere(tmp_path):
    """The README's install (`pip install -e`): its console script, started outside the repository."""
    script = Path(sys.executable).parent / "polyp-ddpm"
    result = subprocess.run([str(script), "card", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "model_dir" in result.stdout


def test_the_package_imports_its_public_names_on_first_use():
    import polyp_diffusers

    assert {"PolypDDPMPipeline", "make_polyp_unet", "prepare_masks"} <= set(dir(polyp_diffusers))
    assert all(getattr(polyp_diffusers, name) is not None for name in polyp_diffusers.__all__)
    from polyp_diffusers.pipelines import PolypDDPMPipeline

    assert polyp_diffusers.PolypDDPMPipeline is PolypDDPMPipeline
    assert polyp_diffusers.modeling.make_sampler is polyp_diffusers.make_sampler  # submodules as before
    assert not {"importlib", "TYPE_CHECKING"} & set(dir(polyp_diffusers))
    with pytest.raises(AttributeError, match="has no attribute 'PolypPipeline'"):
        polyp_diffusers.PolypPipeline  # noqa: B018
