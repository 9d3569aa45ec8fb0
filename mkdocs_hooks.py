"""mkdocs hook (mkdocs.yml, ``hooks:``): show the docstrings' Sphinx roles as plain code.

The docstrings cross-reference with Sphinx roles (``:class:`~geodiff.Grid```), which Markdown
renders as ``:class:<code>~geodiff.Grid</code>``. This drops the role and, as Sphinx does, a
leading ``~`` keeps only the last dotted name.
"""

import re

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _plain(match: re.Match) -> str:
    name = match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
    return f"<code>{name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_plain, html)
