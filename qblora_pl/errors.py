"""How the command lines report a failure: one message, the right exit status, no second traceback.

``main.py`` (fit / validate / test / predict) and ``main.py export`` both end through
:func:`exit_on_error`:

* a **user error** - a bad option value, a missing or malformed file, a checkpoint that does not
  fit the model (:data:`USER_ERRORS`) - prints ``main.py: error: <message>`` and exits 2;
* a **failed run** - training diverged, the adapters went non-finite (``FloatingPointError``) -
  prints its message (which says what to do) and exits 1;
* anything else is a defect of this project or a library: its traceback is printed as usual.

``QBLORA_TRACEBACK=1`` prints the traceback of the first two kinds too.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Iterator

from qblora_pl.checkpoints import AdapterCheckpointMismatch

#: Exceptions that mean the user's input is wrong (every project error class derives from one of these).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # option values, record / checkpoint / source errors (ResumeConfigError, RecordError, ...)
    FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
    AdapterCheckpointMismatch,
    ImportError,  # an optional package a requested feature needs (the message names the extra to install)
)
#: Exceptions that mean the run itself failed (diverged, non-finite): the message says what to do.
RUN_FAILURES: tuple[type[BaseException], ...] = (FloatingPointError,)

_UNION_ERROR = "Does not validate against any of the Union subtypes"


class ConfigValueError(ValueError):
    """A class named in the configuration refused its arguments (the message names where and why)."""


def configuration_error(err: ValueError, config: Any) -> ValueError:
    """jsonargparse's "Does not validate against any of the Union subtypes" as the one reason that matters.

    When a class in the config (``model.quantization``, a callback, an evaluation task) raises in
    its constructor, jsonargparse wraps the error in one Union error per level, each with a dump of
    the values. The constructor's own message is the innermost cause; it is returned, prefixed with
    where that class sits in the configuration (``model.quantization (GroupwiseInt): bits=9 ...``).
    Other errors are returned unchanged.
    """
    if _UNION_ERROR not in str(err):
        return err
    cause: BaseException = err
    class_path = None
    while cause.__cause__ is not None and isinstance(cause, ValueError) and _UNION_ERROR in str(cause):
        match = re.search(r"class_path='([\w.]+)'", str(cause))
        class_path = match.group(1) if match else class_path
        cause = cause.__cause__
    if _UNION_ERROR in str(cause):
        return err
    where = ""
    if class_path is not None:
        places = [key for key, value in _walk(config) if value == class_path]
        short = class_path.rsplit(".", 1)[-1]
        where = f"{places[0]} ({short}): " if len(places) == 1 else f"{short}: "
    return ConfigValueError(f"{where}{cause}")


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every ``class_path`` in a (nested) configuration."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path":
                yield prefix, value
            elif key == "init_args":
                yield from _walk(value, f"{prefix}.init_args" if prefix else "init_args")
            else:
                yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{i}]")


def exit_on_error(prog: str, err: BaseException) -> None:
    """Report ``err`` as :mod:`this module <qblora_pl.errors>` describes; returns only for defects."""
    if isinstance(err, USER_ERRORS):
        status = 2
    elif isinstance(err, RUN_FAILURES):
        status = 1
    else:
        return
    if os.environ.get("QBLORA_TRACEBACK"):
        traceback.print_exception(err)
    message = str(err).strip() or type(err).__name__
    if message.startswith("[Errno"):  # a raw OS error reads better with its kind
        message = f"{type(err).__name__}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None
