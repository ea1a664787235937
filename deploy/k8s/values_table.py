"""Print the values table of deploy/k8s/quiver/README.md from the `# --` comments of
values.yaml (the comment block right above a key documents that key and what it holds).

    python deploy/k8s/values_table.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

VALUES = Path(__file__).parent / "quiver" / "values.yaml"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\"-]+):(?: |$)")


def documented() -> list[tuple[str, str]]:
    """(dotted key, description) in file order."""
    rows: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    for line in VALUES.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment is not None:
            comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            comment = None if not stripped else comment
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"].strip('"')))
        if comment is not None:
            rows.append((".".join(k for _, k in stack), " ".join(comment)))
        comment = None
    return rows


def lookup(values: dict, dotted: str) -> object:
    node: object = values
    for part in dotted.split("."):
        node = node[part]  # type: ignore[index]
    return node


def leaves(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items()
                for leaf in leaves(value, f"{prefix}.{key}" if prefix else str(key))]
    return [prefix]


def undocumented_leaves() -> list[str]:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    keys = {key for key, _ in documented()}
    return [leaf for leaf in leaves(values)
            if not any(leaf == k or leaf.startswith(k + ".") for k in keys)]


def table() -> str:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    lines = ["| Key | Default | Description |", "|---|---|---|"]
    for key, description in documented():
        default = json.dumps(lookup(values, key), separators=(",", ":"))
        if len(default) > 60:
            default = "see values.yaml"
        lines.append(f"| `{key}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
