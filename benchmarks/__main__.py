"""Run every benchmark module (``python -m benchmarks [name ...]``).

Each module runs in its own interpreter so one benchmark's threads and loops
cannot disturb the next; inside a module, offloop and its peers share the
process and are interleaved.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys


def main(argv: list[str]) -> int:
    here = pathlib.Path(__file__).parent
    modules = sorted(p.stem for p in here.glob("bench_*.py"))
    if argv:
        modules = [m for m in modules if any(a in m for a in argv)]
    failed = 0
    for mod in modules:
        print(f"\n# {mod}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{mod}"], cwd=here.parent)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
