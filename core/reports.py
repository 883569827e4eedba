"""Reading a method report an earlier cell wrote, to reuse what it learned."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple


class MethodReport(NamedTuple):
    """``report``: the ``method.report`` of a ``result.json``, or the whole file when it is
    a bare report (``None`` when neither is a mapping); ``method``: the record's method
    name (``None`` for a bare report); ``sha256``: of the file's bytes."""

    report: dict[str, Any] | None
    method: str | None
    sha256: str


def read_method_report(path: str | Path, option: str) -> MethodReport:
    """The report at ``path``; errors name ``option`` (e.g. ``method.coefficients_path``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{option} {str(path)!r} is not a file: cannot read a JSON record from it")
    try:
        raw = p.read_bytes()
        data = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{option} {str(path)!r}: cannot read a JSON record ({err})") from err
    method = None
    if isinstance(data, dict) and isinstance(data.get("method"), dict):
        method = data["method"].get("name")
        data = data["method"].get("report")
    report = data if isinstance(data, dict) else None
    return MethodReport(report, method, hashlib.sha256(raw).hexdigest())
