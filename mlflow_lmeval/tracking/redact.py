"""Secrets out of everything sent to MLflow: secret-keyed values, ``user:pass@`` in URIs,
``token=...`` pairs, and the values of secret-looking environment variables (pure)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[REDACTED]"

# Words that mark a secret anywhere in a key, and short words that must stand alone ("key" in
# "api_key", not in "monkey"; "token" in "hf_token", not in "tokenizer_path").
_STRONG_SECRET = re.compile(r"password|passwd|passphrase|secret|credential|apikey|private_key", re.IGNORECASE)
_WEAK_SECRET = re.compile(r"(?:^|[^a-z])(?:key|token|pass|authorization|cookie)(?:$|[^a-z])", re.IGNORECASE)
_URI_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@\"']+@")
# "token=abc" inside a string (lm-eval's model_args, query strings); "=" only, so prose survives.
_INLINE_SECRET = re.compile(r"(\b[\w.\-]*(?:password|passwd|secret|token|api_?key|access_key)=)([^\s,;&\"'}]+)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """Does a config key or environment variable name look like it holds a credential?"""
    return bool(_STRONG_SECRET.search(key) or _WEAK_SECRET.search(key))


def env_secrets() -> list[str]:
    """Values of secret-looking environment variables (long enough not to be a common word)."""
    values = {
        value for name, value in os.environ.items()
        if is_secret_key(name) and len(value) >= 6 and value.lower() not in ("true", "false", "none", "null")
    }
    return sorted(values, key=len, reverse=True)  # longest first, so no secret is half-replaced


def redact_uri(uri: str) -> str:
    """A tracking URI safe to print: no ``user:pass@``."""
    return _URI_USERINFO.sub(r"\1" + REDACTED + "@", uri)


def scrub_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """Remove ``user:pass@`` from URIs, ``token=...`` pairs, and secret env values from text."""
    text = redact_uri(text)
    text = _INLINE_SECRET.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(value: Any, key: str = "", secrets: Iterable[str] | None = None) -> Any:
    """A copy of a JSON-like value with secret-keyed entries replaced and strings scrubbed."""
    secrets = env_secrets() if secrets is None else list(secrets)
    if key and is_secret_key(key) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, "", secrets) for v in value]
    if isinstance(value, str):
        return scrub_text(value, secrets)
    return value
