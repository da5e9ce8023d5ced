"""The distribution ships every module: setup.cfg lists every package, and a built (non-editable)
wheel installs and imports on its own, without the source tree.

``package_dir`` maps two source trees into one import name (``plugin/`` -> ``qatkit``,
``profiler/`` -> ``qatkit.profiler``), so packages are listed by hand in setup.cfg and a
forgotten subpackage would only show up in a real install.  The editable install used for
development hides that, hence the wheel test.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source tree -> import name, as in setup.cfg's package_dir
SOURCE_TREES = {"plugin": "qatkit", "profiler": "qatkit.profiler"}
#: data files every wheel must carry, besides the .py files
REQUIRED_DATA = ["qatkit/py.typed", "qatkit/profiler/py.typed",
                 "qatkit/profiler/report/templates/profiler.html.j2"]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _listed(cfg: configparser.ConfigParser, option: str) -> list[str]:
    return [line.strip() for line in cfg["options"][option].splitlines() if line.strip()]


def _source_files() -> dict[str, Path]:
    """Every file that must be in the wheel: its path in the wheel -> its source path."""
    files: dict[str, Path] = {}
    for tree, name in SOURCE_TREES.items():
        prefix = name.replace(".", "/")
        for path in sorted((ROOT / tree).rglob("*")):
            rel = path.relative_to(ROOT / tree)
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            if path.suffix == ".py" or "templates" in rel.parts[:-1] or path.name == "py.typed":
                files[f"{prefix}/{rel.as_posix()}"] = path
    return files


def _source_packages() -> set[str]:
    packages = set()
    for tree, name in SOURCE_TREES.items():
        for init in (ROOT / tree).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / tree)
            packages.add(".".join([name, *rel.parts]))
    return packages


def test_setup_cfg_lists_every_package():
    cfg = _setup_cfg()
    listed = set(_listed(cfg, "packages"))
    found = _source_packages()
    assert not found - listed, (
        f"packages with an __init__.py missing from setup.cfg [options] packages: "
        f"{sorted(found - listed)}; add them there or they will not be installed")
    assert not listed - found, (
        f"setup.cfg lists packages that have no __init__.py: {sorted(listed - found)}")
    package_dir = dict(line.replace(" ", "").split("=") for line in _listed(cfg, "package_dir"))
    assert package_dir == {name: tree for tree, name in SOURCE_TREES.items()}


def test_version_matches_setup_cfg():
    import qatkit

    assert qatkit.__version__ == _setup_cfg()["metadata"]["version"]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n"
        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _ignore_local_artifacts(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree filter: the virtualenv, git data, build outputs and caches."""
    ignored = {n for n in names if n == "__pycache__"}
    if Path(directory) == ROOT:
        ignored |= {n for n in names if n in _LOCAL_ARTIFACTS or n.endswith(".egg-info")}
    if Path(directory) == ROOT / "examples":
        ignored |= {n for n in names if n == "out"}
    return ignored


_LOCAL_ARTIFACTS = {".git", ".venv", "build", "dist", ".pytest_cache", ".ruff_cache",
                    "qatkit_profiler"}


# Imports every given module from the install directory only: editable-install finders (meta
# path finders of the development install) are removed first, and each module's file is checked.
_IMPORT_CHECK = r"""
import importlib, json, sys
site, modules = sys.argv[1], json.loads(sys.argv[2])
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, site)
files = {}
for name in modules:
    module = importlib.import_module(name)
    files[name] = module.__file__
print(json.dumps(files))
"""


@pytest.mark.timeout(300)
def test_wheel_contains_every_module_and_imports_without_the_source_tree(tmp_path):
    # Build from a copy so that stale build/ or *.egg-info directories of the working tree
    # cannot leak into (or hide files from) the wheel.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_ignore_local_artifacts)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist), str(src)])
    wheels = list(dist.glob("qatkit-*.whl"))
    assert len(wheels) == 1, f"expected one qatkit wheel, got {wheels}"
    wheel = wheels[0]
    version = _setup_cfg()["metadata"]["version"]
    assert wheel.name.startswith(f"qatkit-{version}-py3-none-any"), wheel.name

    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set(_source_files()) | set(REQUIRED_DATA)
    missing = sorted(expected - names)
    assert not missing, f"files missing from the wheel: {missing}"
    stray = sorted(n for n in names if not n.startswith(("qatkit/", "qatkit-")))
    assert not stray, f"files outside qatkit/ in the wheel: {stray}"
    metadata = zipfile.ZipFile(wheel).read(f"qatkit-{version}.dist-info/METADATA").decode()
    assert "Requires-Dist: torch>=2.1" in metadata

    # Install the wheel into a bare directory and import every module from there, with the cwd
    # outside the source tree.  torch & co. come from the running interpreter's environment.
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
          str(site), str(wheel)])
    modules = sorted(
        n[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        for n in names if n.endswith(".py"))
    assert {"qatkit", "qatkit.profiler", "qatkit.nn", "qatkit.nn.qat", "qatkit.fx"} <= set(modules)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    proc = _run([sys.executable, "-c", _IMPORT_CHECK, str(site), json.dumps(modules)],
                cwd=tmp_path, env=env)
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(files) == modules
    site = site.resolve()
    outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(site)}
    assert not outside, f"modules imported from outside the installed wheel: {outside}"
    assert Path(files["qatkit"]).resolve() == site / "qatkit" / "__init__.py"
