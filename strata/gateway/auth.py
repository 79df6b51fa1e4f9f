"""Optional API keys: loaded once, kept only as SHA-256 digests, compared in constant time.

Key file format, one key per line (``#`` starts a comment)::

    sk-live-abc123                     name=alice rpm=60 tpm=100000
    sha256:9f86d081884c7d65...         name=batch tpm=2000000

A line is the key itself, or ``sha256:<hex>`` of it so the file need not hold secrets,
followed by optional ``name=`` (the label used in logs and rate limits; default
``key-<first 8 hex digits of the digest>``), ``rpm=`` and ``tpm=`` (per-key limits that
override the gateway's defaults). The environment variable form (``STRATA_API_KEYS``) is a
comma-separated list of plain keys. A raw key is never stored, logged or put in a metric.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the gateway knows about a key: a printable name and its optional limits."""

    name: str
    rpm: int | None = None  # requests per minute; None: the gateway default
    tpm: int | None = None  # tokens per minute; None: the gateway default


def digest(key: str) -> bytes:
    """SHA-256 of a key: what is stored and compared, never the key itself."""
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """A fixed set of hashed keys."""

    def __init__(self, entries: list[tuple[bytes, KeyInfo]]) -> None:
        """Build from (digest, info) pairs; names must be unique so limits are per key."""
        names = [info.name for _, info in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"API key names must be unique; repeated: {', '.join(dupes)}")
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, text: str, source: str = "key file") -> ApiKeys:
        """Parse the key-file format described in the module docstring."""
        entries: list[tuple[bytes, KeyInfo]] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            secret, *opts = line.split()
            if secret.startswith("sha256:"):
                try:
                    d = bytes.fromhex(secret[7:])
                except ValueError:
                    d = b""
                if len(d) != 32:
                    raise ValueError(f"{source} line {lineno}: sha256: needs 64 hex digits")
            else:
                d = digest(secret)
            fields: dict[str, str] = {}
            for i, opt in enumerate(opts, 1):
                k, sep, v = opt.partition("=")
                if not sep or k not in ("name", "rpm", "tpm"):
                    # The text itself is not echoed: it may be a second key on the line.
                    raise ValueError(f"{source} line {lineno}: unknown option (word {i + 1} "
                                     "of the line); use name=, rpm= or tpm=, one key a line")
                fields[k] = v
            limits: dict[str, int | None] = {}
            for k in ("rpm", "tpm"):
                if k in fields:
                    if not fields[k].isdigit():
                        raise ValueError(f"{source} line {lineno}: {k} must be an integer")
                    limits[k] = int(fields[k])
            name = fields.get("name") or f"key-{d.hex()[:8]}"
            entries.append((d, KeyInfo(name=name, **limits)))
        return cls(entries)

    @classmethod
    def load(cls, path: Path | None = None, env_value: str | None = None) -> ApiKeys:
        """Keys from a file and/or the comma-separated env value (read by the caller).

        A source that is given but holds no key (an empty file, ``STRATA_API_KEYS=","``)
        is an error, not "no authentication": it is a mistake that would open the gateway.
        An unset or empty ``env_value`` is no source.
        """
        entries: list[tuple[bytes, KeyInfo]] = []
        if path is not None:
            found = cls.parse(path.read_text(), source=str(path))._entries
            if not found:
                raise ValueError(f"API key file {path} holds no keys; add one key per line, "
                                 "or leave the file out to run without authentication")
            entries += found
        if env_value:
            text = "\n".join(k.strip() for k in env_value.split(",") if k.strip())
            found = cls.parse(text, source="STRATA_API_KEYS")._entries
            if not found:
                raise ValueError("STRATA_API_KEYS is set but holds no keys; give comma-"
                                 "separated keys, or unset it to run without authentication")
            entries += found
        return cls(entries)

    def verify(self, authorization: str | None) -> KeyInfo | None:
        """The key's info for a valid ``Authorization: Bearer <key>`` header, else None.

        Every stored digest is compared, match or not, so timing does not tell which
        keys exist or how much of one matched.
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = digest(token.strip())
        found: KeyInfo | None = None
        for stored, info in self._entries:
            if hmac.compare_digest(stored, presented):
                found = info
        return found
