"""Reading the CSV files users hand us (ground truth, predictions, matches, known copies): the checks
every reader needs, in one place, with errors that name the file."""
from __future__ import annotations

import csv
import os
from typing import Callable, Iterable

# The most columns a file read here may name: ours have 2 to 7, a spreadsheet's export a few more. Without a
# bound a header of 500,000 commas made every row a dict of 500,000 entries (a 522 KB file: 48 CPU-s).
MAX_COLUMNS = 256


def read_csv(path: str | os.PathLike, what: str = 'CSV file', error: type[ValueError] = ValueError,
             lines: Callable[[Iterable[str]], Iterable[str]] | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The header (names stripped of spaces) and the rows of a UTF-8 CSV file whose first line names its
    columns, each row a dict of the columns it has values for: a short row lacks the others (``row.get``),
    values past the header are dropped, blank lines skipped. A byte-order mark, as Excel writes it, is not
    part of the first name. ``lines`` may wrap the file's lines (to count them for a progress line).
    Raises ``error`` naming ``what`` and the path when the file does not exist, is not UTF-8 text, is not
    CSV or names over ``MAX_COLUMNS`` columns; checking the columns is the caller's."""
    label = f'{what} {str(path)!r}'
    if not os.path.isfile(path):
        raise error(f'{label} not found')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.reader(lines(f) if lines else f)
            header = [name.strip() for name in next(reader, [])]
            if len(header) > MAX_COLUMNS:
                raise error(f'{label} has {len(header):,} columns, over the bound of {MAX_COLUMNS}: '
                            f'the files read here have 2 to 7')
            # No padding of short rows (csv.DictReader's restval): a row costs what its own bytes hold.
            rows = [dict(zip(header, row)) for row in reader if row]
    except UnicodeDecodeError as e:
        raise error(f'{label} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8 CSV') from None
    except csv.Error as e:
        raise error(f'{label} is not a readable CSV file: {e}') from None
    return header, rows
