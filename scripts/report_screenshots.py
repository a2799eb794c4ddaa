"""Screenshots of the two HTML reports as a browser shows them (headless Chromium), for README and for looking.

Builds a small copy-detection set from sample photos and a synthetic checkpoint (offline, about a minute on 2
cores), runs the commands as a user does (``search --report`` through a Milvus Lite collection, with
``--threshold`` and ``--ground-truth``; ``dedup --report``), then photographs each page:

    python scripts/report_screenshots.py [--out FOLDER] [--chromium PATH]

Writes FOLDER/search_report.png and FOLDER/groups_report.png (default: docs/), and leaves the pages and inputs
in FOLDER/report_demo/ only with --keep. Needs Debian's ``chromium`` (apt-get install chromium).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def towhee_isc(*args) -> None:
    done = subprocess.run([sys.executable, '-m', 'towhee_isc', *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f'towhee-isc {" ".join(map(str, args))} failed:\n{done.stderr}')
    print(done.stdout.strip().splitlines()[-1])


def screenshot(chromium: str, page: Path, png: Path, width: int, height: int) -> None:
    started = time.perf_counter()
    subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                    f'--screenshot={png}', f'--window-size={width},{height}', page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image
    with Image.open(png) as shot:  # 128 colours: a fifth of the size, for a repository; thumbnails stay legible
        small = shot.convert('RGB').quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(png, optimize=True)
    print(f'{png} ({png.stat().st_size / 1024:.0f} KB, {time.perf_counter() - started:.1f} s)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=ROOT / 'docs')
    parser.add_argument('--chromium', default=shutil.which('chromium') or shutil.which('chromium-browser'))
    parser.add_argument('--keep', action='store_true', help='keep the demo inputs and pages in OUT/report_demo')
    args = parser.parse_args()
    if not args.chromium:
        sys.exit('no chromium found: apt-get install chromium (or pass --chromium PATH)')
    from towhee_isc.testing import make_copy_detection_set, make_synthetic_checkpoint, sample_photos

    work = Path(tempfile.mkdtemp(prefix='isc_reports_'))
    try:
        photos = sample_photos()
        ckpt = work / 'isc.pth.tar'
        make_synthetic_checkpoint(ckpt, 'resnet18', 96, photos)
        model = ['--checkpoint', ckpt, '--device', 'cpu']
        data = make_copy_detection_set(work / 'set', photos)
        towhee_isc('embed', data / 'references', '-o', work / 'references.h5', '--quiet', *model)
        towhee_isc('index', work / 'references.h5', '--milvus-uri', work / 'isc.db', '--collection', 'refs', *model)
        towhee_isc('search', data / 'queries', '--milvus-uri', work / 'isc.db', '--collection', 'refs', '-k', 5,
                   '--threshold', 0.6, '--ground-truth', data / 'ground_truth.csv', '-o', work / 'matches.csv',
                   '--report', work / 'report.html', '--report-images', data, *model)
        # A photo collection with copies: the references, their copies among the queries, and two smaller
        # copies of one photo (a group of three, shown first).
        pictures = work / 'pictures'
        shutil.copytree(data / 'references', pictures)
        for query in (data / 'queries').rglob('Q*'):
            shutil.copy(query, pictures)
        for size in (256, 160):
            photos[0].resize((size, size)).save(pictures / f'R000000_{size}px.jpg', quality=60)
        towhee_isc('dedup', pictures, '--threshold', 0.6, '-o', work / 'groups.csv', '--report',
                   work / 'groups.html', *model)
        args.out.mkdir(parents=True, exist_ok=True)
        screenshot(args.chromium, work / 'report.html', args.out / 'search_report.png', 1200, 900)
        screenshot(args.chromium, work / 'groups.html', args.out / 'groups_report.png', 1200, 640)
        if args.keep:
            shutil.copytree(work, args.out / 'report_demo', dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
