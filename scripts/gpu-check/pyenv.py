#!/usr/bin/env python3
"""Makes the bundle's wheels importable on the node without installing anything (check.sh).

    pyenv.py --wheels OUT/wheels --into WORK/py

diffusers' wheel is always unpacked (the node has none). Its requirements (Requires-Dist, extras
left out) are then resolved against the node's own packages: a requirement the node lacks, or
meets only with a version outside the specifier (huggingface_hub older than diffusers' minimum,
for one: transformers 5.0 runs with hub 1.3, diffusers 0.42 needs 1.32), is filled from the
carried wheel of that name, if the bundle has one, and that wheel's requirements are resolved the
same way. Everything else stays the node's, so nothing it has is shadowed needlessly. A wheel is
a zip of the installed layout: unpacking it into a folder on PYTHONPATH installs it. Finally the
folder is tried: `import diffusers` (and the classes check.sh uses) in a fresh interpreter.

Prints the folder (for PYTHONPATH) on stdout, and on stderr what came from where, the import
check's outcome; exit status 1 when diffusers does not import.
"""

import argparse
import email.parser
import importlib.metadata
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path


def canonical(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_requirements(wheel: Path):
    """The Requires-Dist lines of a wheel that apply without extras."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        message = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8"))
    requirements = []
    for line in message.get_all("Requires-Dist") or []:
        if "extra ==" in line:
            continue
        requirements.append(line)
    return requirements


def satisfied(requirement: str):
    """(name, whether the node's installed version satisfies the requirement, its version)."""
    try:
        from packaging.requirements import Requirement

        parsed = Requirement(requirement)
        name = parsed.name
        if parsed.marker is not None and not parsed.marker.evaluate():
            return canonical(name), True, "not needed here"
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return canonical(name), False, None
        return canonical(name), parsed.specifier.contains(version, prereleases=True), version
    except ImportError:  # no `packaging`: presence only
        name = re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]
        try:
            return canonical(name), True, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return canonical(name), False, None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--into", type=Path, required=True)
    args = parser.parse_args()
    args.into.mkdir(parents=True, exist_ok=True)
    carried = {canonical(wheel.name.split("-")[0]): wheel for wheel in sorted(args.wheels.glob("*.whl"))}
    used = []
    queue = ["diffusers"]
    while queue:
        name = queue.pop(0)
        if name in used:
            continue
        used.append(name)
        wheel = carried[name]
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(args.into)
        print(f"[pyenv] {name}: from the bundle ({wheel.name})", file=sys.stderr)
        for requirement in wheel_requirements(wheel):
            dependency, ok, version = satisfied(requirement)
            if ok or dependency in used:
                continue
            if dependency in carried:
                print(f"[pyenv]   {requirement!r}: the node has {version or 'none'}, the bundle's wheel fills it", file=sys.stderr)
                queue.append(dependency)
            else:
                print(f"[pyenv]   {requirement!r}: the node has {version or 'none'} and the bundle none: left as is", file=sys.stderr)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(args.into)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import diffusers, huggingface_hub, safetensors; "
            "from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel; "
            "print('diffusers', diffusers.__version__, 'huggingface_hub', huggingface_hub.__version__, "
            "'safetensors', safetensors.__version__)",
        ],
        env=dict(environment, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        print(f"[pyenv] import check: {probe.stdout.strip()}", file=sys.stderr)
    else:
        print(f"[pyenv] import check FAILED: {probe.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    print(args.into)
    return 0 if probe.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
