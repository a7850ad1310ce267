"""API keys, whichever protocol carries them: `Authorization: Bearer <key>` or `X-API-Key: <key>` (HTTP
headers, or gRPC metadata under the same names in lower case)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def key_given(headers: Mapping[str, str]) -> str:
    """The API key a request sends."""
    auth = headers.get("authorization", "")
    return str(auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", ""))


def key_matches(headers: Mapping[str, str], expected: str) -> bool:
    return hmac.compare_digest(key_given(headers).encode(), expected.encode())
