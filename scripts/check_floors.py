"""Run the test suite against the oldest versions pyproject.toml allows.

Every ``name>=X`` of ``[project].dependencies`` and of the ``test`` extra is installed as
``name==X`` into a fresh virtual environment (what ``uv --resolution lowest-direct`` does), then
diffalign itself without dependencies, then pytest. A floor that the suite does not pass on is a
promise the package does not keep: raise it, or make the code work there.

    python scripts/check_floors.py                      # venv in runs/floors-venv, the whole suite
    python scripts/check_floors.py -- -x tests/test_losses_formulas.py

It downloads several GB (an older torch from PyPI is a CUDA build with its NVIDIA libraries), so it
is a check to run when a floor moves, not part of CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def floor_pins(pyproject: Path = ROOT / "pyproject.toml", extras: tuple[str, ...] = ("test",)) -> list[str]:
    """``name==X`` for every ``name>=X`` among the dependencies and the given extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in extras for r in project["optional-dependencies"][extra])]
    pins = []
    for line in requirements:
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(floors) != 1:
            raise SystemExit(f"{line!r} in {pyproject.name} has no single '>=' floor to pin")
        pins.append(f"{requirement.name}=={floors[0]}")
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / "runs" / "floors-venv")
    parser.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest")
    args = parser.parse_args()
    pins = floor_pins()
    print("pins:", " ".join(pins), flush=True)
    if not (args.venv / "bin" / "python").exists():
        venv.create(args.venv, with_pip=True)
    python = str(args.venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True)
    sys.exit(subprocess.run([python, "-m", "pytest", "-q", *args.pytest_args], cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
