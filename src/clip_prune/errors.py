"""What clip-prune raises for a user's mistake beyond Python's own errors, and how another library's error is quoted.

It sits below every other layer (it imports nothing of clip_prune), like `files.py`.
"""

from __future__ import annotations


class MissingExtra(ImportError):
    """An optional dependency that a verb needs is not installed (e.g. `pip install 'clip-prune[onnx]'`)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of `error`'s message (its type where it has none), cut at `limit` characters: enough to tell
    what a library refused without its multi-line advice."""
    text = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def add_note(error: BaseException, note: str) -> None:
    """Attach `note` to `error` (PEP 678; Python 3.10 keeps it too, for `notes`): what a failure left behind, said
    where the error is reported."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def notes(error: BaseException) -> list[str]:
    """The notes of `error` and of the errors it was raised from or while handling."""
    found: list[str] = []
    seen: BaseException | None = error
    while seen is not None:
        found += getattr(seen, "__notes__", [])
        seen = seen.__cause__ or seen.__context__
    return found
