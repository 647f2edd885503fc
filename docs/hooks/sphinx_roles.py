"""MkDocs hook: show the Sphinx cross-reference roles of geobp's docstrings as plain code.

geobp's docstrings are read by Sphinx-aware tools and by mkdocstrings alike; mkdocstrings leaves
``:class:`~geobp.x.Y``` as the text ``:class:`` before the code span. This drops the role and
the ``~`` (which, in Sphinx, shows only the last name) so that the reference pages read cleanly.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:mod|class|meth|func|attr|data|obj|exc):(<code>)~?")


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(r"\1", html)
