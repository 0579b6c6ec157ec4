"""The one base class of every error this library raises on purpose.

Bad input (a broken checkpoint, a hostile config, an out-of-range argument) raises a subclass of
`NekomataError` whose message names the problem and the fix. The CLI prints exactly these as one line
and exits; anything else that escapes is a bug and keeps its traceback. Subclasses also derive from
`ValueError` (or `FileNotFoundError`), so callers that caught those before still do.
"""

from __future__ import annotations


class NekomataError(ValueError):
    """An expected failure caused by the caller's input or environment; the message says what to do."""
