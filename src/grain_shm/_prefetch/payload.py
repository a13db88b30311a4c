"""What spawned (or forkserver) workers are sent: the source and transform,
pickled once, and refused up front with a TypeError that says what to do
where a worker could not rebuild them, rather than failing in every worker.

Pickling a function or class sends only its module and name. A worker under
spawn re-imports the consumer's `__main__` from its file (or, under
`python -m`, its module name) to find those defined there; an interpreter
started with `python -c`, from stdin, interactively or in a notebook has no
such file, and the worker would fail with "Can't get attribute".
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import types
from typing import TYPE_CHECKING, Any, List, Optional

if TYPE_CHECKING:
    from grain_shm._prefetch.maker import Transform
    from grain_shm.prefetch import RandomAccessSource


class _MainFinder(pickle.Pickler):
    """A pickler that notes every function and class of `__main__` it sends
    (called for objects outside the builtin types only)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.from_main: List[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and obj.__module__ == "__main__":
            self.from_main.append(obj.__qualname__)
        return NotImplemented


def _main_is_importable() -> bool:
    """Whether a spawned child can import this `__main__`, as
    multiprocessing.spawn finds it: by module name, or from its file."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)


def pickled(source: RandomAccessSource, transform: Optional[Transform], method: str) -> bytes:
    """(source, transform) pickled once for every worker; TypeError if a
    worker could not rebuild it."""
    for what, value in (("source", source), ("transform", transform)):
        finder = _MainFinder(io.BytesIO())
        try:
            finder.dump(value)
        except Exception as error:
            raise TypeError(
                f"the {what} cannot be pickled, which the {method!r} start method needs to "
                f"send it to the workers ({type(error).__name__}: {error}); define it at "
                f"module level, or use mp_context='fork'"
            ) from error
        if finder.from_main and not _main_is_importable():
            raise TypeError(
                f"the {what} uses {finder.from_main[0]!r}, defined in __main__, which "
                f"{method!r} workers cannot import here: this interpreter runs no file "
                f"(python -c, stdin, an interactive session or a notebook); define it in a "
                f"module and import it, or use mp_context='fork'"
            )
    return pickle.dumps((source, transform))
