"""Atomic output, checked input and content hashing.

Every artefact layercap writes goes through these helpers, so an interrupted job never leaves
a half-written file behind: data is written to a temporary file in the same directory and
renamed over the target (rename is atomic on POSIX within one filesystem).

Every file layercap reads goes through the readers below (``read_text_file``, ``read_json``,
``read_jsonl``, ``read_csv``, ``read_yaml``): UTF-8 checked (a UTF-8 BOM is accepted), binary
content refused with the byte offset, a folder passed as a file reported as a folder, and
``check_number`` for the numbers in them. Outputs are checked by ``check_output_file`` /
``check_output_dir`` before any work: layercap never overwrites its own input and never replaces
a folder it did not write.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _error(f"cannot write {str(path)!r}: {exc.strerror or exc} (folder {str(path.parent)!r}); "
                     "choose a writable output folder.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the mode an ordinary open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole.

    Use for checkpoints (save_pretrained writes several files): readers see either the old
    directory or the complete new one, never a partial one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _error(f"cannot write {str(path)!r}: {exc.strerror or exc} (folder {str(path.parent)!r}); "
                     "choose a writable output folder.") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# input: every file layercap reads goes through these readers


UTF8_BOM = b"\xef\xbb\xbf"


def _error(message: str):
    from layercap.errors import LayercapError

    return LayercapError(message)


def check_input_file(path: str | os.PathLike, what: str = "file", hint: str = "") -> Path:
    """``path`` as a Path if it is a readable regular file; else a LayercapError that says what it
    is instead (missing, a folder, unreadable)."""
    path = Path(path)
    tail = f" {hint}".rstrip() if hint else ""
    try:
        path.stat()
    except FileNotFoundError:
        pass
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long, a component that is a file
        raise _error(f"{what} {str(path)!r} cannot be opened ({getattr(exc, 'strerror', None) or exc}).{tail}") from None
    if path.is_dir():
        raise _error(f"{what} {str(path)!r} is a folder, not a file.{tail}")
    if not path.exists():
        raise _error(f"{what} {str(path)!r} does not exist.{tail}")
    if not path.is_file():
        raise _error(f"{what} {str(path)!r} is not a regular file.{tail}")
    if not os.access(path, os.R_OK):
        raise _error(f"{what} {str(path)!r} is not readable (permission denied); fix its permissions.")
    return path


def decode_text(data: bytes, source: str | os.PathLike, what: str = "file") -> str:
    """UTF-8 text of ``data`` (a leading UTF-8 BOM dropped, CRLF kept). Binary content -- a NUL
    byte or invalid UTF-8 -- raises LayercapError naming ``source`` and the byte offset (the bytes
    themselves are never echoed)."""
    offset = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    body = data[offset:]
    nul = body.find(b"\x00")
    if nul >= 0:
        raise _error(f"{what} {source}: binary content (a NUL byte at byte offset {nul + offset}); expected UTF-8 text.")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(
            f"{what} {source}: not UTF-8 text (invalid byte at byte offset {exc.start + offset}); "
            "convert it to UTF-8 (e.g. `iconv -t utf-8`)."
        ) from None


def read_text_file(path: str | os.PathLike, what: str = "file", hint: str = "", max_bytes: int | None = None) -> str:
    """The UTF-8 text of a file, checked (see :func:`check_input_file`, :func:`decode_text`)."""
    path = check_input_file(path, what, hint)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise _error(f"{what} {str(path)!r} is {path.stat().st_size:,} bytes, more than the {max_bytes:,} allowed.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _error(f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}).") from None
    return decode_text(data, path, what)


def _parse_constant(name: str) -> float:
    # NaN/Infinity literals parse (so the validators can name the field), never silently pass
    return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


def parse_json(text: str, source: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    """A JSON document; a syntax error raises LayercapError with the line and column."""
    try:
        return json.loads(text, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        extra = " (it looks like JSON lines: one object per line; use a .jsonl file)" if exc.msg == "Extra data" else ""
        raise _error(f"{what} {source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}){extra}. {hint}".rstrip()) from None
    except RecursionError:
        raise _error(f"{what} {source}: JSON nested too deeply.") from None


def read_json(path: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    """Parse a JSON file; a missing, binary or malformed file raises LayercapError naming ``what`` and ``hint``."""
    path = Path(path)
    return parse_json(read_text_file(path, what, hint), path, what, hint)


def parse_jsonl(text: str, source: str | os.PathLike) -> list[Any]:
    """Records of a JSON-lines text (blank lines skipped); a bad line raises LayercapError with its number."""
    records = []
    if text.startswith("\ufeff"):
        text = text[1:]
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line, parse_constant=_parse_constant))
            except json.JSONDecodeError as exc:
                hint = ("; it looks like one JSON document over several lines: use a .json file"
                        if line.strip() in ("{", "[") else "; expected one JSON object per line")
                raise _error(f"{source}: line {i} is not JSON ({exc.msg}){hint}.") from None
    return records


def read_jsonl(path: str | os.PathLike, what: str = "file", hint: str = "") -> list[Any]:
    path = Path(path)
    return parse_jsonl(read_text_file(path, what, hint), path)


def read_csv(path: str | os.PathLike, what: str = "file", required: Sequence[str] = (), hint: str = "",
             allowed: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Rows of a CSV file with a header, as dicts (header names stripped; a UTF-8 BOM accepted).
    A missing ``required`` column, a column named twice, a column outside ``allowed`` (when given),
    or a row with fewer fields than the header, raises LayercapError with the line number."""
    path = Path(path)
    text = read_text_file(path, what, hint)
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise _error(f"{what} {path}: not a valid CSV ({exc}).") from None
    rows_with_line = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not rows_with_line:
        raise _error(f"{what} {path}: empty CSV; expected a header line ({', '.join(required) or 'column names'}).")
    header = [c.strip() for c in rows_with_line[0][1]]
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise _error(f"{what} {path}: CSV header names column(s) {', '.join(repr(c) for c in twice)} twice; keep one.")
    if allowed is not None:
        unknown = [c for c in header if c not in allowed]
        if unknown:
            raise _error(f"{what} {path}: unknown CSV column(s) {', '.join(repr(c) for c in unknown)}; "
                         f"allowed: {', '.join(allowed)}.")
    missing = [c for c in required if c not in header]
    if missing:
        raise _error(f"{what} {path}: CSV header lacks {', '.join(repr(m) for m in missing)}; expected columns "
                     f"{', '.join(required)} (header found: {', '.join(header[:8])}).")
    out = []
    for line, row in rows_with_line[1:]:
        if len(row) < len(header):
            absent = header[len(row):]
            raise _error(f"{what} {path}: line {line} has {len(row)} field(s) for {len(header)} columns "
                         f"(no {', '.join(repr(a) for a in absent)}); fill in every column.")
        if len(row) > len(header):
            raise _error(f"{what} {path}: line {line} has {len(row)} fields, more than the {len(header)} columns of the header.")
        out.append({h: c.strip() for h, c in zip(header, row)})
    return out


def yaml_load(text: str, source: str | os.PathLike = "") -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (PyYAML keeps the last
    silently, so a duplicated setting would be ignored)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise _error(f"{source}: key {key!r} is given twice (line {key_node.start_mark.line + 1}); keep one.")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | os.PathLike, what: str = "file", hint: str = "") -> Any:
    """A YAML document (safe_load) from a checked UTF-8 file; a syntax error names the line; a key
    given twice is refused."""
    import yaml

    path = Path(path)
    text = read_text_file(path, what, hint)
    try:
        return yaml_load(text, f"{what} {path}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise _error(f"{what} {path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc}). {hint}".rstrip()) from None


def check_number(value: Any, field: str, source: str = "", *, integer: bool = False, minimum: float | None = None,
                 maximum: float | None = None, exclusive_minimum: bool = False) -> float | int:
    """``value`` as a finite number (an int when ``integer``) within the bounds, else LayercapError
    naming ``source`` and ``field``. Strings holding numbers (CSV cells) are parsed; booleans are not
    numbers."""
    where = f"{source}: " if source else ""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise _error(f"{where}{field} = {text[:40]!r} is not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise _error(f"{where}{field} = {value!r} is not a number.")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    if not math.isfinite(as_float):
        raise _error(f"{where}{field} = {value!r} is not finite; give a finite number.")
    if integer:
        if isinstance(value, int):
            value = int(value)
        elif as_float.is_integer():
            value = int(as_float)
        else:
            raise _error(f"{where}{field} = {value!r} must be a whole number (a count).")
    low_bad = minimum is not None and (as_float <= minimum if exclusive_minimum else as_float < minimum)
    if low_bad:
        raise _error(f"{where}{field} = {value!r} must be {'>' if exclusive_minimum else '>='} {minimum:g}.")
    if maximum is not None and as_float > maximum:
        raise _error(f"{where}{field} = {value!r} must be <= {maximum:g}.")
    return value


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# output: never destroy what layercap did not write

OUTPUT_MARKER = ".layercap-output.json"
# files that mark a folder as a layercap output of an earlier version (before the marker existed)
LEGACY_MARKERS = ("pruning.json",)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_parent(path: str | os.PathLike, flag: str = "-o") -> None:
    """Refuse an output path whose nearest existing parent is a file or not writable (before any work)."""
    _check_writable_parent(Path(path), flag)


def _check_name(path: Path, flag: str) -> None:
    too_long = [part for part in path.parts if len(os.fsencode(part)) > 255]
    if too_long:
        raise _error(f"{flag} {str(path)[:80]!r}...: a name of {len(os.fsencode(too_long[0])):,} bytes, more than the 255 a "
                     "file system allows; choose a shorter name.")


def _check_writable_parent(path: Path, flag: str) -> None:
    _check_name(path, flag)
    if path.is_symlink():
        raise _error(f"{flag} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); layercap replaces outputs "
                     "whole, so pass the real path or a new name.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _error(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder; choose another output path.")
    try:  # a real attempt (os.access says yes to root even where the filesystem refuses, e.g. /proc)
        os.rmdir(tempfile.mkdtemp(prefix=".layercap-probe-", dir=parent))
    except OSError as exc:
        raise _error(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable ({exc.strerror or exc}); "
                     "choose a writable output folder.") from None


# first CSV column of the tables layercap writes (records, comparisons, export tables)
_CSV_FIRST_COLUMNS = ("name", "task", "rule", "module", "block", "cell")


def _owned_by_marker(path: Path) -> bool:
    marker = path.parent / OUTPUT_MARKER
    try:
        return path.name in json.loads(marker.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return False


def written_by_layercap(path: str | os.PathLike) -> bool:
    """Whether an existing file may be replaced: empty, an artefact layercap writes (a JSON record
    with a ``layercap.*`` schema, a text whose first line is a ``#`` comment naming layercap, a CSV
    table with layercap's first column), or listed in its folder's output marker. Anything else is
    the user's."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return True
        with open(path, "rb") as fh:
            head = fh.read(1 << 16).lstrip(UTF8_BOM)
    except OSError:
        return False
    if _owned_by_marker(path) or re.search(rb'"schema"\s*:\s*"layercap\.', head):
        return True
    first = head.split(b"\n", 1)[0]
    if first.startswith(b"#") and b"layercap" in first.lower():
        return True
    if path.suffix.lower() == ".csv":
        return first.split(b",", 1)[0].strip().decode("utf-8", "replace") in _CSV_FIRST_COLUMNS
    return False


def check_output_file(path: str | os.PathLike, flag: str = "-o", inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` as a Path if layercap may write a file there: not a folder, not one of ``inputs``
    (a command never overwrites what it reads), not a file layercap did not write (see
    :func:`written_by_layercap`), in a writable folder."""
    path = Path(path)
    _check_name(path, flag)
    if str(path) in ("", ".", "..") or path.is_dir():
        raise _error(f"{flag} {str(path)!r} is a folder; pass a file name such as {path / 'out.json'}.")
    if path.exists() and not path.is_file():
        raise _error(f"{flag} {str(path)!r} exists and is not a regular file; choose another output path.")
    for item in inputs:
        if item is not None and _same_file(path, Path(item)):
            raise _error(f"{flag} {str(path)!r} is also an input of this command; write the output to another file.")
    if path.is_file() and not written_by_layercap(path):
        raise _error(f"{flag} {str(path)!r} exists and layercap did not write it; choose another file name "
                     "(or move that file away first).")
    _check_writable_parent(path, flag)
    return path


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as given
        return path.absolute()


def check_holds_no_input(path: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output folder that is, or lies above, one of ``inputs``."""
    resolved = _resolved(Path(path))
    for item in inputs:
        if item is None:
            continue
        other = _resolved(Path(item))
        if other == resolved or resolved in other.parents:
            raise _error(f"{flag} {str(path)!r} contains an input of this command ({item}); write to another folder.")


def check_output_dir(path: str | os.PathLike, flag: str = "-o", inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` as a Path if layercap may (re)place a folder there: absent, empty, or a folder
    layercap wrote (it holds :data:`OUTPUT_MARKER`, or a legacy marker) with nothing else added;
    never a file, an input, or a folder above an input."""
    path = Path(path)
    _check_name(path, flag)
    if path.exists() and not path.is_dir():
        raise _error(f"{flag} {str(path)!r} is a file; pass a folder path for the output.")
    check_holds_no_input(path, flag, inputs)
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            marker = path / OUTPUT_MARKER
            if marker.is_file():
                try:
                    owned = set(json.loads(marker.read_text(encoding="utf-8")).get("files", []))
                except (OSError, ValueError, AttributeError):
                    owned = set()
                foreign = [e for e in entries if e != OUTPUT_MARKER and e not in owned]
                if foreign:
                    raise _error(f"{flag} {str(path)!r} holds files layercap did not write ({', '.join(foreign[:3])}); "
                                 "move them away or choose another folder.")
            elif not any((path / m).is_file() for m in LEGACY_MARKERS):
                raise _error(f"{flag} {str(path)!r} is a folder that layercap did not write and it is not empty "
                             f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); choose a new or empty folder.")
    _check_writable_parent(path, flag)
    return path


def write_output_marker(folder: str | os.PathLike, command: str) -> Path:
    """Mark ``folder`` as written by layercap ``command``, listing its files (call last, inside
    the temporary folder of :func:`atomic_directory`)."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.name != OUTPUT_MARKER)
    return atomic_write_json(folder / OUTPUT_MARKER, {"writer": f"layercap {command}", "files": files})


def mark_written(path: str | os.PathLike, command: str) -> None:
    """Add ``path``'s name to its folder's output marker (for a file written into a folder that
    also holds the user's files, so that a rerun may replace it)."""
    path = Path(path)
    marker = path.parent / OUTPUT_MARKER
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        files = set(doc.get("files", [])) if isinstance(doc, dict) else set()
    except (OSError, ValueError, AttributeError):
        files = set()
    atomic_write_json(marker, {"writer": f"layercap {command}", "files": sorted(files | {path.name})})


@contextmanager
def all_or_nothing(*paths: str | os.PathLike) -> Iterator[None]:
    """Write several outputs as a unit: if the block fails, the ``paths`` that did not exist
    before it are removed again (so a failed CSV twin leaves no lone JSON behind)."""
    existed = {Path(p): Path(p).exists() for p in paths}
    try:
        yield
    except BaseException:
        for p, was in existed.items():
            if not was and p.is_file():
                p.unlink(missing_ok=True)
        raise
