"""GitHub Actions workflow commands (``::error file=F,line=L::message``): the one place that writes
them, for ``kvconf validate --format github`` and ``kvconf lint --format github``.

>>> annotation("error", "conf/x.yaml", 3, "bad\\n100%", column=5)
'::error file=conf/x.yaml,line=3,col=5::bad%0A100%25'
"""

from __future__ import annotations

from typing import Optional

__all__ = ["annotation"]


def annotation(kind: str, file: str, line: int, message: str, column: Optional[int] = None) -> str:
    """One workflow command of ``kind`` (``error``, ``warning``, ``notice``), its message escaped
    as GitHub asks (``%``, CR and LF), so a multi-line message stays one annotation."""
    msg = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    where = f"file={file},line={line}" + (f",col={column}" if column is not None else "")
    return f"::{kind} {where}::{msg}"
