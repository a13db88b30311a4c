"""A worker's exception, sent to the consumer and raised there at its item's
position, with the worker's traceback as its cause.

An exception travels pickled. One that does not pickle in the worker (an
attribute that cannot: a lock, a handle) or does not unpickle here (an
`__init__` that pickle's rebuild does not satisfy) is rebuilt as its own
type all the same, where the consumer can import that type: made without
its `__init__` (`cls.__new__`), with the args and attributes of it that
pickle, so `except ThatError` catches it. Only a type the consumer cannot
import (defined in a function, or in a module only the workers have) comes
as a RuntimeError naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import traceback
from typing import Any, Dict, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Failure:
    """An exception in a worker, for the consumer to raise at its position."""

    worker: int
    where: str  # "at element 12 of the stream (source index 40)", or ""
    error: Optional[bytes]  # the pickled exception, if it pickles
    kind: Tuple[str, str]  # its type's module and qualified name
    parts: bytes  # (args, attributes) of it that pickle, to rebuild it without pickle
    summary: str  # "module.Type: message"
    text: str  # the worker's traceback


class _RemoteTraceback(Exception):
    """The worker's traceback, as the cause of the exception it raised."""

    def __str__(self) -> str:
        return str(self.args[0])


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def capture(worker: int, error: BaseException, where: str = "") -> Failure:
    """The failure to send for `error`, raised in `worker` (call it in the except block)."""
    try:
        pickled: Optional[bytes] = pickle.dumps(error)
    except Exception:
        pickled = None
    args = tuple(arg if _picklable(arg) else repr(arg) for arg in error.args)
    attributes: Dict[str, Any] = {
        key: value for key, value in getattr(error, "__dict__", {}).items() if _picklable(value)
    }
    kind = (type(error).__module__, type(error).__qualname__)
    return Failure(
        worker,
        where,
        pickled,
        kind,
        pickle.dumps((args, attributes)),
        f"{kind[0]}.{kind[1]}: {error}" if kind[0] != "builtins" else f"{kind[1]}: {error}",
        traceback.format_exc(),
    )


def _rebuilt(failure: Failure) -> Optional[BaseException]:
    """The exception as its own type, from what of it pickled, or None."""
    module, qualname = failure.kind
    try:
        cls: Any = importlib.import_module(module)
        for name in qualname.split("."):
            cls = getattr(cls, name)  # "<locals>" is no attribute: not importable
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None
        args, attributes = pickle.loads(failure.parts)
        error: BaseException = cls.__new__(cls, *args)
        error.args = args
        error.__dict__.update(attributes)
        str(error)  # a __str__ that needs what did not travel: not this way
    except Exception:
        return None
    return error


def raise_failure(failure: Failure) -> None:
    """Raise the worker's exception here, noting where it was raised."""
    where = f"in prefetch worker {failure.worker}" + (f", {failure.where}" if failure.where else "")
    error: Optional[BaseException] = None
    note = f"(raised {where})"
    if failure.error is not None:
        try:
            error = pickle.loads(failure.error)
        except Exception:
            error = None
    if not isinstance(error, BaseException):
        error = _rebuilt(failure)
        how = "did not unpickle here" if failure.error is not None else "did not pickle"
        note = f"(raised {where}; it {how}, so it was rebuilt from its args and attributes)"
    if isinstance(error, BaseException):
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(note)
    else:
        error = RuntimeError(f"{failure.summary} (raised {where}; its type cannot be imported "
                             f"here, and it did not pickle)")
    raise error from _RemoteTraceback(failure.text)
