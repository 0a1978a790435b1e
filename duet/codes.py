"""Join codes: the secret the owner hands the researcher, which the signaling server never sees.

A code is 120 random bits written as six groups of four Crockford base32 characters
(``K7QF-2M9X-...``), easy to read aloud and to paste. From the secret both peers derive

* the *room id*, a one-way digest the signaling server uses to pair them, and
* the *MAC key*, with which each peer authenticates its SDP (and thereby its DTLS
  fingerprint), so a tampering server cannot put itself in the middle.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from .errors import PairingError

__all__ = ["JoinCode"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford: no I, L, O, U
_SECRET_BYTES = 15
_CODE_CHARS = _SECRET_BYTES * 8 // 5  # 24
_GROUP = 4
# Crockford decoding is forgiving about characters people confuse.
_CONFUSABLE = str.maketrans({"I": "1", "L": "1", "O": "0"})


@dataclass(frozen=True)
class JoinCode:
    secret: bytes

    @classmethod
    def generate(cls) -> JoinCode:
        return cls(secrets.token_bytes(_SECRET_BYTES))

    @classmethod
    def parse(cls, text: str) -> JoinCode:
        """Parse a code as typed by a person: case, dashes and spaces do not matter."""
        if not isinstance(text, str):
            raise PairingError(f"a join code is a string, not {type(text).__name__}")
        chars = text.upper().replace("-", "").replace(" ", "").translate(_CONFUSABLE)
        if len(chars) != _CODE_CHARS or any(c not in _ALPHABET for c in chars):
            raise PairingError(
                f"malformed join code {text!r}: expected {_CODE_CHARS} characters of "
                f"0-9 and A-Z in groups of {_GROUP}, like the one duet.launch() printed"
            )
        value = 0
        for c in chars:
            value = value * 32 + _ALPHABET.index(c)
        return cls(value.to_bytes(_SECRET_BYTES, "big"))

    def __str__(self) -> str:
        value = int.from_bytes(self.secret, "big")
        chars = []
        for _ in range(_CODE_CHARS):
            value, digit = divmod(value, 32)
            chars.append(_ALPHABET[digit])
        text = "".join(reversed(chars))
        return "-".join(text[i : i + _GROUP] for i in range(0, _CODE_CHARS, _GROUP))

    def __repr__(self) -> str:
        return "JoinCode(<secret>)"

    def _derive(self, label: bytes) -> bytes:
        return hmac.new(self.secret, b"duet/v1/" + label, hashlib.sha256).digest()

    @property
    def room_id(self) -> str:
        """What the signaling server sees: 128 bits, from which the secret cannot be recovered."""
        return self._derive(b"room")[:16].hex()

    @property
    def mac_key(self) -> bytes:
        return self._derive(b"sdp-mac")
