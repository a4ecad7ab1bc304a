"""Output folders that never lose a user's files, streamed metrics, and the text tables.

A run's folder is staged beside ``--out`` (a hidden ``.NAME.tmp-*`` folder, created before
training, which is the writability check), filled while training (``metrics.jsonl`` one
flushed line per step), and placed at ``--out`` when done.  curvopt marks the folders it
makes with a :data:`MARKER` file listing what it wrote, and replaces an existing ``--out``
only when it is such a folder holding nothing else; anything else is never written into,
replaced or deleted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from curvopt.recipes.schema import RecipeError

__all__ = ["MARKER", "RunFolder", "check_out", "foreign_files", "write_marker", "JsonlWriter",
           "read_jsonl", "to_toml", "format_table", "fmt"]

#: The file that marks a folder as made by curvopt (JSON: ``complete`` and ``files``).
MARKER = ".curvopt-run"


def _files(folder: Path) -> list[str]:
    """Relative paths of the files (and links) under ``folder``, the marker excluded."""
    found = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [(rel / n).as_posix() for n in names]
    return sorted(f for f in found if Path(f).name != MARKER)


def write_marker(folder: Path, complete: bool) -> None:
    """Mark ``folder`` as made by curvopt, listing the files it holds now."""
    mark = {"made_by": "curvopt", "complete": complete, "files": _files(folder)}
    (folder / MARKER).write_text(json.dumps(mark, indent=1) + "\n")


def foreign_files(folder: Path) -> list[str]:
    """The files under the existing folder ``folder`` that curvopt did not write (all of them
    when it is not a curvopt folder); empty when curvopt may replace it."""
    try:
        written = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        written = set()
    return [f for f in _files(folder) if f not in written]


def check_out(out: Path, name: str = "run") -> None:
    """Raise :class:`RecipeError` (before any training) if curvopt may not write ``out``.

    ``out`` may be absent, an empty folder, or a folder curvopt made that holds only what
    curvopt wrote.  A file, a link, or a folder with anything else is refused.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a link" if out.is_symlink() else "a file"
        raise RecipeError(f"--out {out} is {kind}, not a folder; curvopt writes a folder of "
                          f"results and never replaces a file: give a new path, e.g. "
                          f"--out {out.parent / name}")
    if out.is_dir():
        foreign = foreign_files(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise RecipeError(f"--out {out} holds files curvopt did not write ({shown}); "
                              f"curvopt never writes into or replaces such a folder: give a "
                              f"new path, e.g. --out {out / name}")


def _free(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... whichever does not exist yet."""
    n, free = 1, path
    while free.exists() or free.is_symlink():
        n += 1
        free = path.with_name(f"{path.name}-{n}")
    return free


class RunFolder:
    """Stage a run's folder beside ``out`` now; place it when the ``with`` block ends.

    Creating the staging folder (parents included) is the check that ``out`` is writable, so
    construct this before training.  On leaving the block:

    - completed: the folder is marked and moved to ``out``; a previous curvopt folder there
      is replaced atomically (never half-written).  If ``out`` has meanwhile received files
      curvopt did not write, the run goes to ``out-2`` (``-3``, ...) instead.
    - on any exception (Ctrl-C included): what was written so far (the streamed
      ``metrics.jsonl``) is kept, marked incomplete, at ``out`` if that is free, else at
      ``out-partial`` (``-partial-2``, ...), and a line on stderr says where.

    Attributes:
        out: the folder asked for.
        tmp: the staging folder (write into it).
        path: where the folder ended up (after the block).
    """

    def __init__(self, out: str | Path, name: str = "run"):
        self.out = Path(out)
        check_out(self.out, name)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        except OSError as err:
            raise RecipeError(f"--out {self.out}: cannot write there ({err.strerror or err}: "
                              f"{err.filename or self.out.parent})") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp's 0o700 would outlive the rename
        self.path: Path | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        complete = kind is None
        write_marker(self.tmp, complete)
        if complete:
            self.path = self._place_complete()
            return
        self.path = self.out if not (self.out.exists() or self.out.is_symlink()) else _free(
            self.out.with_name(self.out.name + "-partial"))
        os.replace(self.tmp, self.path)
        what = "interrupted" if issubclass(kind, KeyboardInterrupt) else "stopped by an error"
        print(f"curvopt: run {what}; what it wrote (metrics.jsonl so far) is kept in "
              f"{self.path}/", file=sys.stderr)

    def _place_complete(self) -> Path:
        out = self.out
        if not (out.exists() or out.is_symlink()):
            os.replace(self.tmp, out)
            return out
        if out.is_symlink() or not out.is_dir() or foreign_files(out):
            free = _free(out)
            os.replace(self.tmp, free)
            print(f"curvopt: {out} now holds files curvopt did not write; the run went to "
                  f"{free}/ instead", file=sys.stderr)
            return free
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(self.tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return out


def _json_default(value: Any) -> Any:  # pragma: no cover - only for odd types
    return str(value)


class JsonlWriter:
    """Append JSON records to a file, one line each, flushed at once (non-finite floats as
    ``NaN``/``Infinity``, as Python reads them), so that a stopped run keeps every line."""

    def __init__(self, path: Path):
        self._fh: TextIO = open(path, "w")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")  # pragma: no cover


def to_toml(data: dict[str, Any]) -> str:
    """A recipe's plain form (scalars at the top, then one table per dict) as TOML text."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """An aligned plain-text table of ``rows`` (dicts) over ``columns``."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])
