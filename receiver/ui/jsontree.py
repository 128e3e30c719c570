"""A prediction as a collapsible tree of HTML `<details>`, rendered on the server (the page
runs no inline script, and needs none for this).

Objects and arrays near the top, and small ones, start open; deeper or larger ones start
closed, and an array longer than CHUNK is split into closed runs of CHUNK items, so a
many-page result opens on its outline and each part is one click away. Built with an explicit
stack, not recursion: a prediction may nest 1,024 levels (what orjson reads).
"""

from __future__ import annotations

from typing import Any

import orjson
from markupsafe import Markup, escape

OPEN_DEPTH = 3  # containers up to this depth start open, if small
OPEN_SIZE = 50  # ... and have at most this many children (an invoice's fields, say)
CHUNK = 100  # an array's items per closed run


def _scalar(value: Any) -> str:
    kind = (
        "null"
        if value is None
        else "bool"
        if isinstance(value, bool)
        else "str"
        if isinstance(value, str)
        else "num"
    )
    return f'<span class="j-{kind}">{escape(orjson.dumps(value).decode())}</span>'


def _label(key: str | int) -> str:
    if isinstance(key, int):
        return f'<span class="j-i">{key}</span> '
    return f'<span class="j-k">{escape(orjson.dumps(key).decode())}</span>: '


def _summary(value: dict[str, Any] | list[Any]) -> str:
    n = len(value)
    if isinstance(value, dict):
        return f"{{…}} {n} key{'' if n == 1 else 's'}"
    return f"[…] {n} item{'' if n == 1 else 's'}"


def tree(value: Any) -> Markup:
    """`value` (parsed JSON) as nested lists and `<details>`."""
    out: list[str] = ['<ul class="json">']
    # Work items: ("node", label, value, depth), ("run", start, items, depth), ("html", text).
    stack: list[tuple[Any, ...]] = [("node", "", value, 0)]
    while stack:
        item = stack.pop()
        if item[0] == "html":
            out.append(item[1])
            continue
        if item[0] == "run":
            _, start, items, depth = item
            out.append(
                f"<li><details><summary>items {start} to {start + len(items) - 1}</summary><ul>"
            )
            stack.append(("html", "</ul></details></li>"))
            for i in range(len(items) - 1, -1, -1):
                stack.append(("node", _label(start + i), items[i], depth))
            continue
        _, label, node, depth = item
        out.append(f"<li>{label}")
        if not isinstance(node, dict | list) or not node:
            out.append(_scalar(node) if not isinstance(node, dict | list) else escape(str(node)))
            out.append("</li>")
            continue
        opened = depth < OPEN_DEPTH and len(node) <= OPEN_SIZE
        out.append(f"<details{' open' if opened else ''}><summary>{_summary(node)}</summary><ul>")
        stack.append(("html", "</ul></details></li>"))
        if isinstance(node, dict):
            for key in reversed(list(node)):
                stack.append(("node", _label(key), node[key], depth + 1))
        elif len(node) > CHUNK:
            for start in range((len(node) - 1) // CHUNK * CHUNK, -1, -CHUNK):
                stack.append(("run", start, node[start : start + CHUNK], depth + 1))
        else:
            for i in range(len(node) - 1, -1, -1):
                stack.append(("node", _label(i), node[i], depth + 1))
    out.append("</ul>")
    return Markup("".join(out))  # noqa: S704 - every piece above is escaped


def from_body(body: bytes) -> Markup | None:
    """The tree of a JSON body; None when it is not JSON."""
    try:
        return tree(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None
