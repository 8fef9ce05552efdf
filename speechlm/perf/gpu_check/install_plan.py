"""Which of the carried wheels a GPU machine needs: the distributions missing there or outside the project's range.
Standard library only: ``tools/gpu_check.sh`` asks it before anything is installed."""

from __future__ import annotations

from pathlib import Path

#: (distribution, version range the project supports, the wheels that go in when it is missing or outside it)
INSTALL_PLAN = [
    ("deepspeed", ">=0.16", ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types",
                             "typing_inspection", "typing_extensions"]),
    ("transformers", ">=4.46,<5", ["transformers", "tokenizers", "huggingface_hub"]),
    ("soundfile", ">=0.12", ["soundfile", "cffi", "pycparser"]),
    ("espeakng-loader", "==0.2.*", ["espeakng_loader"]),
    ("safetensors", ">=0.4", ["safetensors"]),
    ("sentencepiece", ">=0.2", ["sentencepiece"]),
]


def plan_install(wheel_dir: str | Path, plan: list[tuple[str, str, list[str]]] | None = None) -> tuple[list[str], list[str]]:
    """(wheel files to install, notes): the wheels of every distribution that is missing or out of range."""
    from importlib import metadata

    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a bare interpreter: pip's own copy
        from pip._vendor.packaging.specifiers import SpecifierSet

    wheel_dir = Path(wheel_dir)
    files: list[str] = []
    notes: list[str] = []
    for dist, spec, wheels in plan or INSTALL_PLAN:
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and SpecifierSet(spec).contains(have, prereleases=True):
            continue
        notes.append(f"{dist} {have or 'missing'} (needs {spec}): installing {', '.join(wheels)}")
        for w in wheels:
            found = sorted(wheel_dir.glob(f"{w}-*.whl"))
            if not found:
                notes.append(f"  no {w} wheel in {wheel_dir} (run tools/gpu_wheels.sh here first)")
            files += [str(f) for f in found[-1:]]
    return list(dict.fromkeys(files)), notes
