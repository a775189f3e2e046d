import os
import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().strip().splitlines()[-1]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert ci in readme


def test_readme_documents_every_option():
    from onnxprune.cli import main
    readme = open(os.path.join(ROOT, "README.md")).read()
    for param in main.params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert re.search(re.escape(opt) + r"\b", readme), opt


def test_readme_stands_on_its_own():
    """No link or path outside the repository, no install from a package index that has no release."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "../" not in readme and "shared/docs" not in readme
    assert not re.search(r"pip install onnxprune\b", readme)


def test_runtime_markers_pick_one_onnxruntime_per_platform():
    import pytest
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    deps = [Requirement(r) for r in tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
            ["dependencies"]]
    ort = [r for r in deps if r.name in ("onnxruntime", "onnxruntime-gpu")]
    platforms = {"linux-x86_64": ("linux", "x86_64", "onnxruntime-gpu"), "win-x64": ("win32", "AMD64", "onnxruntime-gpu"),
                 "linux-arm": ("linux", "aarch64", "onnxruntime"), "mac": ("darwin", "arm64", "onnxruntime")}
    for plat, machine, want in platforms.values():
        env = {"sys_platform": plat, "platform_machine": machine}
        assert [r.name for r in ort if r.marker.evaluate(env)] == [want]


def test_packaging_ships_every_subpackage():
    """The tests import the source tree; a user gets what pyproject.toml packages: every package with an
    __init__.py must be matched by its find patterns (a plain `packages = ["onnxprune"]` drops the sub-packages)."""
    import fnmatch
    import pytest
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    packages = cfg["packages"]
    patterns = packages if isinstance(packages, list) else packages["find"]["include"]
    for dirpath, _, files in os.walk(os.path.join(ROOT, "onnxprune")):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            dotted = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
            assert any(fnmatch.fnmatchcase(dotted, p) for p in patterns), dotted
