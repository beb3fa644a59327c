"""A setting given as a JSON object, parsed with an error that says which setting and what shape."""

from __future__ import annotations

import json
from typing import Any


def json_object(text: str, what: str, shape: str) -> dict[str, Any]:
    """A setting's JSON object (empty text: an empty one); raises ValueError naming ``what`` and ``shape``."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object {shape}")
    return value
