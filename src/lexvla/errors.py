"""The one user-facing exception of lexvla.

Everything a user can get wrong (a missing file, an unknown preset or config key, a corrupt checkpoint,
an offline model that was never prepared) raises :class:`LexVLAError` with a message that names the
input and says how to fix it. The CLI prints these messages without a traceback.
"""

from __future__ import annotations


class LexVLAError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""
