"""Print pip constraints that pin each runtime dependency of pyproject.toml (and the text and lora extras) to
the lowest version it allows: ``.ci/min-versions`` installs them to check that the floors hold."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# torch: the CPU wheel on the CI disk is the only one within reach (the floor's own wheel is a CUDA build of
# several GB), so its floor is not what this check installs.
SKIP = {"torch"}


def lowest_pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["text"],
             *project["optional-dependencies"]["lora"]]
    pins = []
    for spec in specs:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)(\s*;.*)?", spec.strip())
        if match is None:
            raise SystemExit(f"{spec!r}: not NAME>=VERSION; pin it by hand here")
        name, version, marker = match.group(1), match.group(2), match.group(3) or ""
        if name not in SKIP:
            pins.append(f"{name}=={version}{marker}")
    return pins


if __name__ == "__main__":
    print("\n".join(lowest_pins(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml"))))
