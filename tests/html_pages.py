"""Reading the reports' HTML as a browser would (the standard library's parser, no regular expressions
over markup): the summary, the table's headers and cells, the groups, each with its text and thumbnails."""
from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {'img', 'meta', 'br', 'hr', 'input', 'link'}


@dataclass
class Element:
    tag: str
    attrs: dict
    children: list = field(default_factory=list)  # Elements and strings

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get('class') or '').split())

    @property
    def text(self) -> str:
        """The text a reader sees, spaces collapsed."""
        parts = [c if isinstance(c, str) else c.text for c in self.children]
        return ' '.join(' '.join(parts).split())

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        """Every element below this one (depth first) with this tag and/or class."""
        found = []
        for child in self.children:
            if isinstance(child, Element):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes):
                    found.append(child)
                found += child.all(tag, cls)
        return found

    @property
    def thumbnails(self) -> list[Element]:
        """Embedded JPEG thumbnails (a page that needs no other file)."""
        return [i for i in self.all('img') if i.attrs.get('src', '').startswith('data:image/jpeg;base64,')]


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element('document', {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):  # close up to the matching open element
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> Element:
    builder = _Builder()
    builder.feed(page)
    builder.close()
    return builder.root


def summary(page: Element) -> dict[str, str]:
    """The summary boxes at the top: label -> value."""
    boxes = page.all(cls='summary')[0].all('div')
    return {' '.join(c for c in box.children if isinstance(c, str)).strip(): box.all('b')[0].text for box in boxes}


def table(page: Element) -> tuple[list[str], list[list[Element]]]:
    """The search report's column headers and its rows of cells (the query's first)."""
    headers = [th.text for th in page.all('th')]
    rows = [row.all('td') for row in page.all('tbody')[0].all('tr')]
    return headers, rows
