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
