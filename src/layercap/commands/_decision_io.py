"""Output helpers the decision commands share (allocate, prune-ratios, transfer): the -o / --csv
checks, writing a record with its CSV twin (both or neither), and the plain table on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

from layercap.errors import LayercapError


def check_output(path: str, csv: bool, inputs=()) -> Path:
    """The JSON output path (and its CSV twin with ``csv``), checked before any work: not a
    folder, not one of ``inputs``, writable (see :func:`layercap.io.check_output_file`)."""
    from layercap.io import check_output_file

    out = Path(path)
    if csv and out.suffix.lower() == ".csv":
        raise LayercapError(f"-o {path!r} ends in .csv; give the JSON name (the CSV is written beside it with --csv).")
    inputs = [i for i in inputs if i and i not in ("count", "params")]
    check_output_file(out, "-o", inputs)
    if csv:
        check_output_file(out.with_suffix(".csv"), "--csv (the CSV beside -o)", inputs)
    return out


def save_with_csv(record, out: Path, csv: bool) -> None:
    """Write ``record`` to ``out`` and, with ``csv``, its CSV twin: both or neither."""
    from layercap.io import all_or_nothing

    with all_or_nothing(out, out.with_suffix(".csv")):
        record.save(out)
        if csv:
            record.save(out.with_suffix(".csv"))


def format_table(header: list[str], rows: list[list], out=None) -> None:
    """Plain aligned table on stdout."""
    out = out or sys.stdout
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))), file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=out)
