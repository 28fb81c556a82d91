"""Which of the carried wheels (.whl/*.whl) this Python can import: their paths on stdout, one a line.

    python bench/pick_wheels.py .whl/*.whl

A wheel is kept when one of the tags in its file name (python-abi-platform: cp312-cp312-manylinux…,
cp39-abi3-…, py3-none-any, …) is one this interpreter supports, as pip decides it; for two versions of
one package the newer is kept (two would stop the whole install). Every wheel left out gets a line on
stderr saying why. Standard library and pip's own `packaging` only: it runs before anything is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # a bare interpreter: pip always carries its own copy
    from pip._vendor.packaging.tags import sys_tags  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]


def pick(paths: list[str]) -> list[str]:
    supported = set(sys_tags())
    here = f"Python {sys.version_info.major}.{sys.version_info.minor} on this machine"
    chosen: dict[str, tuple[object, str]] = {}
    for path in paths:
        name = Path(path).name
        try:
            dist, version, _build, tags = parse_wheel_filename(name)
        except Exception as err:  # not a wheel's name
            print(f"skipping {name}: not a wheel file name ({err})", file=sys.stderr)
            continue
        if not tags & supported:
            shown = ", ".join(sorted(str(t) for t in tags)[:4])
            print(f"skipping {name}: its tags ({shown}) do not import on {here}", file=sys.stderr)
            continue
        key = canonicalize_name(dist)
        if key in chosen:
            old_version, old_path = chosen[key]
            if old_version >= version:  # type: ignore[operator]
                print(f"skipping {name}: {Path(old_path).name} is a newer or equal {dist}", file=sys.stderr)
                continue
            print(f"skipping {Path(old_path).name}: {name} is a newer {dist}", file=sys.stderr)
        chosen[key] = (version, path)
    return [path for _, path in chosen.values()]


if __name__ == "__main__":
    for picked in pick(sys.argv[1:]):
        print(picked)
