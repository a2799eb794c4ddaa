"""The challenge's metrics, exactly as its reference scorer defines them, and its CSV files."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_write
from ..csvfiles import read_csv
from ..progress import Progress


# A cell starting with one of these is a formula to a spreadsheet (OWASP, "CSV Injection"): an id such as
# '=HYPERLINK(...)' would run when the CSV is opened. Such cells are written with a leading single quote,
# which spreadsheets show as text; a cell that itself starts with a quote gets one more, so that reading
# our CSVs back (``safe_cell`` undone by ``unsafe_cell``) gives every id exactly.
FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r', "'")


def safe_cell(text: str) -> str:
    """``text`` as a CSV cell a spreadsheet will not run as a formula (OWASP's advice)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def unsafe_cell(text: str) -> str:
    """The text ``safe_cell`` was given."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text


class CsvFormatError(ValueError):
    """A prediction or ground-truth CSV that does not have the challenge's columns and values."""


@dataclass(frozen=True)
class Match:
    query_id: str
    reference_id: str
    score: float


def _rows(path: str | os.PathLike, columns: tuple[str, ...]) -> list[dict[str, str]]:
    path = str(path)
    with Progress(_count_lines(path), f'reading {os.path.basename(path)}', unit='line') as progress:
        header, rows = read_csv(path, 'CSV file', CsvFormatError, lambda lines: _lines_counted(lines, progress))
    if tuple(header[:len(columns)]) != columns:
        raise CsvFormatError(f'{path!r} must start with the columns {",".join(columns)}; it has {",".join(header)}')
    for line, row in enumerate(rows, start=2):
        if any(row.get(c) is None for c in columns):
            raise CsvFormatError(f'{path!r} line {line}: expected {len(columns)} columns ({",".join(columns)})')
    return rows


def _count_lines(path: str) -> int:
    """Lines in a file (the progress line's total), counted in 1 MB blocks: ~0.1 s for 1,000,000 rows;
    0 for a path that is not a readable file (``read_csv`` names the problem)."""
    try:
        with open(path, 'rb') as f:
            return sum(block.count(b'\n') for block in iter(lambda: f.read(1 << 20), b''))
    except OSError:
        return 0


def _lines_counted(lines, progress: Progress, every: int = 10_000):
    """The lines, counted into ``progress`` ``every`` lines at a time (a call per row would cost more than the row)."""
    n = 0
    for n, line in enumerate(lines, start=1):
        if n % every == 0:
            progress.advance(every)
        yield line
    progress.advance(n % every)


def read_matches(path: str | os.PathLike) -> list[Match]:
    """Predictions ``query_id,reference_id,score``; a non-numeric score or a repeated pair is an error."""
    matches, seen = [], set()
    for line, row in enumerate(_rows(path, ('query_id', 'reference_id', 'score')), start=2):
        try:
            score = float(row['score'])
        except (TypeError, ValueError):
            raise CsvFormatError(f'{str(path)!r} line {line}: score {row["score"]!r} is not a number') from None
        if not math.isfinite(score):
            raise CsvFormatError(f'{str(path)!r} line {line}: score {row["score"]!r} is not finite')
        pair = (unsafe_cell(row['query_id']), unsafe_cell(row['reference_id']))
        if pair in seen:
            raise CsvFormatError(f'{str(path)!r} line {line}: the pair {pair} is predicted twice')
        seen.add(pair)
        matches.append(Match(*pair, score))
    return matches


def read_ground_truth(path: str | os.PathLike) -> dict[str, set[str]]:
    """Ground truth ``query_id,reference_id``: each labelled query -> its true references (maybe none)."""
    truth: dict[str, set[str]] = {}
    for row in _rows(path, ('query_id', 'reference_id')):
        refs = truth.setdefault(row['query_id'], set())
        if row['reference_id']:
            refs.add(row['reference_id'])
    return truth


def write_matches(path: str | os.PathLike, matches: list[Match]) -> None:
    """The prediction CSV, best first, written through a temporary file; ids that a spreadsheet would
    take for formulas are escaped (``safe_cell``), and ``read_matches`` reads them back as they were."""
    with atomic_write(path) as tmp, open(tmp, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['query_id', 'reference_id', 'score'])
        for m in sorted(matches, key=lambda m: -m.score):
            writer.writerow([safe_cell(m.query_id), safe_cell(m.reference_id), f'{m.score:.6f}'])


def precision_recall(matches: list[Match], truth: dict[str, set[str]]):
    """(precisions, recalls, thresholds, is_true) in decreasing score; at equal scores false matches
    come first (the reference scorer's worst case). Only labelled queries count."""
    labelled = [m for m in matches if m.query_id in truth]
    positives = sum(len(refs) for refs in truth.values())
    is_true = np.array([m.reference_id in truth[m.query_id] for m in labelled], dtype=bool)
    scores = np.array([m.score for m in labelled], dtype=np.float64)
    order = np.lexsort((is_true, -scores))  # by decreasing score, then False before True
    is_true, scores = is_true[order], scores[order]
    ntp = np.cumsum(is_true)
    precisions = ntp / np.arange(1, len(is_true) + 1)
    recalls = ntp / positives if positives else np.zeros(len(is_true))
    return precisions, recalls, scores, is_true


def evaluate(matches: list[Match], truth: dict[str, set[str]]) -> dict:
    """μAP, recall at precision 0.9 and its threshold, recall at rank 1 and 10.

    Recall at rank k: the share of true pairs whose reference is among its query's k best predictions.
    Where precision never reaches 0.9, the recall there is 0.0 (as the reference scorer has it) and
    the threshold is None.
    """
    with Progress(3, f'scoring {len(matches)} matches', unit='step') as progress:  # ~1 s a step per 1,000,000
        precisions, recalls, scores, _ = precision_recall(matches, truth)
        progress.advance()
        ap = float(((recalls - np.concatenate([[0.0], recalls[:-1]])) * precisions).sum()) if len(recalls) else 0.0
        valid = precisions >= 0.9
        if valid.any():
            best = int(np.argmax(np.where(valid, recalls, -1.0)))
            recall_p90, threshold_p90 = float(recalls[best]), float(scores[best])
        else:
            recall_p90, threshold_p90 = 0.0, None
        at_rank = {}
        for k in (1, 10):
            at_rank[k] = _recall_at_rank(matches, truth, k)
            progress.advance()
    return {'average_precision': ap, 'recall_at_p90': recall_p90, 'threshold_at_p90': threshold_p90,
            'recall_at_rank1': at_rank[1], 'recall_at_rank10': at_rank[10]}


def _recall_at_rank(matches: list[Match], truth: dict[str, set[str]], k: int) -> float:
    positives = sum(len(refs) for refs in truth.values())
    if not positives:
        return 0.0
    by_query: dict[str, list[Match]] = {}
    for m in matches:
        if m.query_id in truth:
            by_query.setdefault(m.query_id, []).append(m)
    found = 0
    for query, ranked in by_query.items():
        refs = truth[query]
        ranked.sort(key=lambda m: (-m.score, m.reference_id in refs))  # ties: false first
        found += sum(m.reference_id in refs for m in ranked[:k])
    return found / positives


def plot_precision_recall(matches: list[Match], truth: dict[str, set[str]], path: str | os.PathLike) -> None:
    """The precision-recall curve as a PNG, with the precision-0.9 operating point marked."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    precisions, recalls, _, _ = precision_recall(matches, truth)
    result = evaluate(matches, truth)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(recalls, precisions, color='tab:blue', label=f"μAP {result['average_precision']:.4f}")
    if result['threshold_at_p90'] is not None:
        point = int(np.argmax(np.where(precisions >= 0.9, recalls, -1.0)))  # the operating point itself
        ax.plot([recalls[point]], [precisions[point]], 'o', color='tab:red',
                label=f"P90: recall {result['recall_at_p90']:.3f} at score {result['threshold_at_p90']:.3f}")
    ax.axhline(0.9, color='tab:red', linewidth=0.5, linestyle='--')
    ax.set(xlabel='recall', ylabel='precision', xlim=(0, 1), ylim=(0, 1.02), title='Copy detection: precision-recall')
    ax.legend(loc='lower left')
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format='png')
    plt.close(fig)
