"""`python -m grain_shm COMMAND`: bench, ls, gc, doctor.

Each command lives in its own module; this file only dispatches.
"""

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "bench": ("grain_shm.bench", "run the benchmark against pickle and the stdlib"),
    "ls": ("grain_shm.admin", "list grain_shm segments in /dev/shm"),
    "gc": ("grain_shm.admin", "remove segments whose process tree is gone"),
    "doctor": ("grain_shm.admin", "check /dev/shm and limits, with advice"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m grain_shm {%s} [options]\n" % ",".join(COMMANDS))
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:8} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    rc: int = module.main(argv)
    return rc


if __name__ == "__main__":
    sys.exit(main())
