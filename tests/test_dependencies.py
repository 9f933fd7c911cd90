"""constraints.txt is kept current: it pins every dependency pyproject.toml names, inside pyproject's
ranges, and the suite runs on exactly those versions; CI and README install from it."""

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parent.parent


def requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and its test extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


def pins() -> dict[str, Version]:
    """constraints.txt: canonical name -> pinned version."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not name==version"
            out[canonicalize_name(name)] = Version(pinned)
    return out


def test_every_dependency_is_pinned_inside_its_range():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} is outside {req}"


def test_the_suite_runs_on_the_pinned_versions():
    """A passing suite is evidence for the pinned versions only if they are the installed ones."""
    differ = []
    for name, pinned in pins().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            differ.append(f"{name}: not installed (pinned {pinned})")
            continue
        if Version(installed.public) != pinned:  # a local build label (torch's +cpu) is the same release
            differ.append(f"{name}: installed {installed}, pinned {pinned}")
    assert not differ, "update constraints.txt once the suite passes on these: " + "; ".join(differ)


def test_ci_and_readme_install_from_the_constraints():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    installs = [line for text in (ci, readme) for line in text.splitlines() if "pip install" in line and "-e " in line]
    assert len(installs) >= 3  # CI, README's quickstart and test lines
    for line in installs:
        steps = [s for s in re.split(r"&&", line) if "pip install" in s and "--upgrade pip" not in s]
        assert steps and all("-c constraints.txt" in s for s in steps), line
