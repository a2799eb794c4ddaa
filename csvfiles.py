"""Reading the CSV files users hand us (ground truth, predictions, matches, known copies): the checks
every reader needs, in one place, with errors that name the file."""
from __future__ import annotations

import csv
import os
from typing import Callable, Iterable


def read_csv(path: str | os.PathLike, what: str = 'CSV file', error: type[ValueError] = ValueError,
             lines: Callable[[Iterable[str]], Iterable[str]] | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The header (names stripped of spaces) and the rows of a UTF-8 CSV file whose first line names its
    columns. A byte-order mark, as Excel writes it, is not part of the first name. ``lines`` may wrap the
    file's lines (to count them for a progress line). Raises ``error`` naming ``what`` and the path when
    the file does not exist, is not UTF-8 text or is not CSV; checking the columns is the caller's."""
    label = f'{what} {str(path)!r}'
    if not os.path.isfile(path):
        raise error(f'{label} not found')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(lines(f) if lines else f)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise error(f'{label} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8 CSV') from None
    except csv.Error as e:
        raise error(f'{label} is not a readable CSV file: {e}') from None
    return header, rows
