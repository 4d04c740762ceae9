"""Text that came from a client (ids, client.json strings, rejection reasons), made safe to show.

Three uses, three helpers:

- `brief(value)`: a short `repr` of an untrusted value for an error reason (never the whole value: a 60 kB
  client id must not become a 60 kB reason).
- `one_line(text)`: control characters (newlines, ANSI escapes) replaced and the length capped, for logs and
  summaries (no forged log lines, no terminal escapes).
- `markdown_text(text)`: `one_line` plus Markdown and HTML escaping, for the model card (no links, images,
  `<img onerror=...>`, table breaks or emphasis from a client).

Example:
    ```py
    >>> print(markdown_text("<img src=x onerror=alert(1)> [x](http://evil)"))
    &lt;img src=x onerror=alert\\(1\\)&gt; \\[x\\]\\(http\\://evil\\)
    >>> len(one_line("a" * 100_000, limit=50))
    50
    ```
"""

from __future__ import annotations

import re

__all__ = ["ELLIPSIS", "brief", "markdown_text", "one_line"]

ELLIPSIS = "…"
DEFAULT_LIMIT = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
# Markdown punctuation that can start a link, image, emphasis, code span, heading, table cell or HTML.
# "." and ":" too, so a bare URL or www. name is not turned into a link by GitHub-flavoured autolinking. Text is
# never placed at the start of a line, so "-", "+" and "=" (lists, setext headings) need no escape.
_MARKDOWN_SPECIALS = frozenset("\\`*_{}[]()#!|~.:")


def one_line(text: object, *, limit: int = DEFAULT_LIMIT) -> str:
    """`str(text)` on one line: control characters become spaces, at most `limit` characters (… marks a cut).

    Example:
        ```py
        >>> one_line("bad\\nINFO forged line")
        'bad INFO forged line'
        ```
    """
    value = _CONTROL.sub(" ", str(text))
    if len(value) > limit:
        value = value[: max(0, limit - 1)] + ELLIPSIS
    return value


def brief(value: object, *, limit: int = 64) -> str:
    """A `repr` of an untrusted value, on one line and at most `limit` characters.

    Example:
        ```py
        >>> brief("x" * 1000, limit=10)
        "'xxxxxxxx…"
        ```
    """
    return one_line(repr(value), limit=limit)


def markdown_text(text: object, *, limit: int = DEFAULT_LIMIT) -> str:
    """Untrusted text as inert Markdown (HTML entities + backslash escapes), capped to `limit` source characters.

    The cap applies before escaping, so an escape sequence is never cut in half.

    Example:
        ```py
        >>> print(markdown_text("a|b *c*"))
        a\\|b \\*c\\*
        ```
    """
    out = []
    for ch in one_line(text, limit=limit):
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in _MARKDOWN_SPECIALS:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
