"""What a user who installs the wheel gets, outside this repository: every module, the configs the README's commands
name, and every package `vit/` imports declared as a dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vit.cli import main

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"onnx", "onnxruntime"}  # `vit export --format onnx` names the pip command when they are missing


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml asks for, installed here
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copy(ROOT / "LICENSE", src)
    for folder in ("vit", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("vit-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_every_module_and_every_config_of_the_repository(wheel):
    files = set(wheel.namelist())
    modules = {f"vit/{p.name}" for p in (ROOT / "vit").glob("*.py")}
    configs = {f"vit/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert "vit/configs/digits.yaml" in configs
    assert modules <= files and configs <= files


@pytest.mark.parametrize("spelling", ["digits", "digits.yaml", "configs/digits.yaml", "--config=digits"])
def test_a_shipped_config_is_found_by_name_from_a_folder_without_it(spelling, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a user's own project folder: no configs/ here
    assert main(["fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--print_config"]) == 0
    expected = capsys.readouterr().out
    given = [spelling] if spelling.startswith("--") else ["--config", spelling]
    assert main(["fit", *given, "--print_config"]) == 0
    assert capsys.readouterr().out == expected


def test_a_file_of_the_users_own_wins_over_the_shipped_config_of_that_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    text = (ROOT / "configs" / "digits.yaml").read_text().replace("max_epochs: 40", "max_epochs: 7")
    (tmp_path / "configs" / "digits.yaml").write_text(text)
    assert main(["fit", "--config", "configs/digits.yaml", "--print_config"]) == 0
    assert "max_epochs: 7" in capsys.readouterr().out


def test_a_config_that_is_nowhere_is_one_line_naming_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "digts"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("error: --config ") and "digts" in error and "no such file" in error
    assert error.endswith(", ".join(sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))))


def _imported_packages() -> set[str]:
    names = set()
    for path in (ROOT / "vit").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"vit"}


def test_every_package_vit_imports_is_a_declared_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = {
        re.split(r"[\[<>=!~ ;]", requirement)[0].lower().replace("_", "-")
        for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        name: distributions.get(name)
        for name in _imported_packages() - OPTIONAL
        if not {d.lower().replace("_", "-") for d in distributions.get(name, [name])} & declared
    }
    assert not undeclared


def test_the_wheel_carries_vit_version_and_an_spdx_license(wheel):
    import vit

    (metadata,) = (name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    headers = dict(line.split(": ", 1) for line in wheel.read(metadata).decode().split("\n\n")[0].splitlines())
    assert headers["Version"] == vit.__version__  # one version: `vit --version` and pip's agree
    assert headers["License-Expression"] == "Apache-2.0"  # setuptools deprecates the `{text = ...}` table
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in wheel.namelist())  # and its text
