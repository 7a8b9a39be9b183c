"""The install respects the user's torch: pyproject declares ranges, the project's machines pin.

`make check-install` is the full check (a venv with torch 2.13.0 CPU: `pip install --dry-run -e .`
plans no torch); these tests are its offline, seconds-long part that runs on every `make test`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(line).name.lower(): Requirement(line) for line in project["dependencies"]}


def test_torch_and_torchvision_are_ranges_that_admit_the_users_torch():
    deps = dependencies()
    for name, users_version, pinned in (("torch", "2.13.0", "2.14.1"), ("torchvision", "0.28.0", "0.29.1")):
        spec = deps[name].specifier
        operators = {s.operator for s in spec}
        assert operators and operators <= {">="}, f"{name} must be a lower bound only, got '{spec}'"
        assert spec.contains(Version(users_version)) and spec.contains(Version(pinned))
        assert spec.contains(Version("9.0")), f"{name}: no upper bound, a newer torch must be accepted"
    for name in ("timm", "lightning"):
        assert {s.operator for s in deps[name].specifier} == {">="}, name


def test_makefile_and_readme_install_the_same_two_commands():
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"^TORCH_PINS := (.+)$", makefile, re.M).group(1).strip()
    assert pins == "torch==2.14.1 torchvision==0.29.1"
    assert "$(BIN)/pip install --quiet $(TORCH_PINS)" in makefile
    assert "$(BIN)/pip install --quiet -e '.[test]'" in makefile
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in setup.strip().splitlines()]
    assert commands == [f"pip install {pins}", "pip install -e ."]
    assert "download.pytorch.org" not in readme  # one route: no second, different install recipe


def test_pip_install_editable_plans_no_torch(tmp_path):
    """A dry run in this venv, offline: with torch installed, `pip install -e .` plans only leanmim."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
         "--quiet", "--report", str(report), "-e", str(ROOT)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    planned = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    assert planned == ["leanmim"], planned


def test_timm_and_lightning_bounds_exclude_the_releases_leanmim_cannot_run_on():
    """The lowest timm and Lightning declared are the lowest that run the suite (docs/install.md): timm 1.0.23 is
    the first whose ``Block`` takes ``attn_layer`` and whose ``Attention`` has ``attn_dim`` (parts/relpos.py; 1.0.15
    has no ``timm.layers.Attention`` at all), Lightning 2.6.0 the first whose ``Trainer.fit`` / ``validate`` take
    ``weights_only`` (every leanmim resume passes it). The installed ones have what the bounds stand for."""
    import inspect

    from lightning import Trainer
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    deps = dependencies()
    timm_spec, lightning_spec = deps["timm"].specifier, deps["lightning"].specifier
    assert not timm_spec.contains(Version("1.0.22")) and timm_spec.contains(Version("1.0.23")), timm_spec
    assert not lightning_spec.contains(Version("2.5.6")) and lightning_spec.contains(Version("2.6.0")), lightning_spec
    assert "attn_layer" in inspect.signature(Block.__init__).parameters
    assert hasattr(Attention(32, 2), "attn_dim")
    for method in (Trainer.fit, Trainer.validate):
        assert "weights_only" in inspect.signature(method).parameters
    install = (ROOT / "docs" / "install.md").read_text()
    assert f"timm{timm_spec}" in install.replace(" ", "") and f"lightning{lightning_spec}" in install.replace(" ", "")
