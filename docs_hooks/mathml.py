"""The docs site's equations as MathML, rendered by the browser itself: the site loads no script
from outside to typeset them."""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

# pymdownx.arithmatex (generic) wraps inline math as \( \) and display math as \[ \] in these.
_MATH = re.compile(r'<(span|div) class="arithmatex">\s*\\([\(\[])(.*?)\\[\)\]]\s*</\1>', re.S)


def _mathml(match: re.Match) -> str:
    display = "block" if match.group(2) == "[" else "inline"
    tex = html.unescape(match.group(3))
    try:
        return convert(tex, display=display)
    except Exception:  # noqa: BLE001 - TeX the converter cannot read stays TeX, readable as it is
        return match.group(0)


def on_page_content(content: str, **_) -> str:
    """mkdocs hook: every arithmatex span or block of the page becomes MathML."""
    return _MATH.sub(_mathml, content)
