"""Files that appear whole or not at all: written beside their target, then renamed over it.

Every report, manifest, summary and plot goes through here, so a crash or a concurrent reader never
sees a torn file.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A new file ("wb" or "w") that replaces `path` when the block exits cleanly, and vanishes if not."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600), and prepared data and reports are often shared.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x" + mode[1:]) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj, *, indent: int = 1) -> None:
    """obj as JSON (no NaN or infinity: they are not JSON), atomically."""
    with atomic_open(path, "w") as file:
        json.dump(obj, file, indent=indent, allow_nan=False)
        file.write("\n")
