"""Print the OpenAPI document of the whole HTTP surface (`make openapi` writes the
committed openapi/openapi.json with it).

The output depends on the code only, never on ATM_* variables or the date, so the
committed openapi/openapi.json can be compared with it byte for byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.settings import Settings


def document() -> dict[str, Any]:
    # model_construct: the defaults, without reading the environment or a .env file.
    return create_app(Settings.model_construct()).openapi()


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> None:
    """No argument: print the document. A path: write it there (whole, or not at all)."""
    text = render(document())
    if not argv:
        sys.stdout.write(text)
        return
    target = Path(argv[0])
    partial = target.with_suffix(".tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)


if __name__ == "__main__":
    main(sys.argv[1:])
