"""The errors a user sees: each names the problem and the fix; the CLI prints them without a traceback.

At the bottom of the house: every layer may raise these, and this module imports nothing of kdpipe's.
"""

from __future__ import annotations


class KdpipeError(RuntimeError):
    """A user-facing failure: the message names the problem and the fix (the CLI prints it, no traceback)."""


class SpecError(KdpipeError, ValueError):
    """A spec problem, with the YAML key and the fix."""


class StorageError(KdpipeError):
    """The storage root cannot serve this run (not reachable from every node, not writable, inside a job folder)."""


class CacheCorruptError(KdpipeError):
    """A cache file does not match its manifest checksum, is unreadable, or is missing."""
