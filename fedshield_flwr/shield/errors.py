"""Errors raised by the shield crypto library; each names the party, the round and a remedy."""

from __future__ import annotations


class ShieldError(Exception):
    """Base class of every error raised by :mod:`fedshield_flwr.shield`."""


class KeysetError(ShieldError, ValueError):
    """A keyset file or object is missing, malformed, of the wrong kind or inconsistent."""


class BackendError(ShieldError, RuntimeError):
    """TenSEAL/SEAL does not behave as this library expects (e.g. a different TenSEAL build)."""


class UpdateError(ShieldError, ValueError):
    """A silo refuses to encrypt its update (non-finite values, headroom exceeded, bad shape)."""


class PayloadError(ShieldError, ValueError):
    """A payload received over the network is invalid.

    Attributes
    ----------
    silo : str or None
        The party that sent it (``None`` when the server sent it).
    round : int or None
        The server round it belongs to, when known.
    """

    def __init__(self, message: str, *, silo: str | None = None, round: int | None = None):
        super().__init__(message)
        self.silo = silo
        self.round = round


class KeyMismatchError(PayloadError):
    """A payload was encrypted under a different keyset than the receiver holds."""
