"""Reading plain attribute values from a data set (duck-typed: no pydicom import here)."""

from __future__ import annotations

from typing import Any


def text(ds: Any, keyword: str) -> str:
    """An attribute's value as stripped text; '' when absent or empty (Type 2/3 attributes)."""
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()
