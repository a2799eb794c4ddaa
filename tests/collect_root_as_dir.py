"""pytest plugin: collect the repository root as a plain directory, not a Python package.

The root holds the operator's ``__init__.py`` (Towhee's hub layout). pytest would otherwise import
it as a package named after the checkout folder, which differs between checkouts and would
register a second copy of the operator with Towhee.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path.resolve() == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
