"""Keep credentials out of everything shardwise writes: manifests, metrics, fingerprints, logs, errors.

    redact(obj)                  a deep copy of plain data with secrets replaced by "<redacted>"
    options_digest(options)      sha256 of the non-secret storage options (endpoint, region, ...)
    fingerprint_view(obj)        a deep copy for hashing: storage_options → their digest, secrets dropped
    secret_values(obj)           the secret strings inside plain data (what `scrub` must remove)
    scrub(text, secrets)         a message with those values cut out

What counts as a secret: the whole value of a key named `storage_options` (it is the credentials' usual
home and its other fields belong in a digest, not in plain text), and the value of any key whose *name*
says credential. Names are split on `_ - .`, spaces and camelCase, lower-cased, and judged by whole parts:

- a part that only credentials use anywhere in the name: secret, password, passwd, credential(s),
  private, authorization, cookie (`aws_secret_access_key`, `client_secret`, `db_password`);
- a name that *ends* in key / token / auth, alone or after a qualifier that makes it a credential
  (`key`, `token`, `api_key`, `access_key`, `session_token`, `hf_token`, `basic_auth`), and
  `access_key_id` (half of a key pair, never worth printing).

So task parameters stay readable: `max_new_tokens`/`max_batch_tokens` (plural, a count), `tokenizer`,
`return_token_type_ids`, `pad_token`/`eos_token` (a vocabulary entry, not a credential), `keep_columns`,
`id_column`, `sort_key`. A URL's password (`https://user:pass@host`) is cut from any string value too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "REDACTED",
    "fingerprint_view",
    "is_secret_key",
    "options_digest",
    "redact",
    "scrub",
    "secret_values",
]

REDACTED = "<redacted>"

# Parts that only credentials use, wherever they appear in a name.
_ALWAYS = frozenset(
    {"secret", "secrets", "password", "passwd", "pwd", "credential", "credentials", "private",
     "authorization", "cookie", "passphrase"}
)  # fmt: skip
# Last parts that are credentials alone ("key", "token") or after one of the qualifiers below.
_NOUNS = frozenset({"key", "token", "auth", "apikey"})
# What may come before a final key/token/auth and still mean a credential (`pad_token`, `sort_key` do not).
_QUALIFIERS = frozenset(
    {"api", "access", "session", "refresh", "id", "auth", "bearer", "sas", "security", "hf", "github", "gh",
     "oauth", "client", "account", "master", "encryption", "signing", "storage", "shared", "personal",
     "basic", "http", "proxy", "service", "sse", "customer", "app", "user", "write", "read", "upload"}
)  # fmt: skip
_STORAGE_OPTIONS = "storage_options"
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT = re.compile(r"[_\-.\s]+")
# scheme://user:password@host — the password is cut, the rest stays (it says where data came from).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)(?P<pw>[^/\s@]+)(?=@)")
# Shorter secret values are not scrubbed from text: cutting every "ab" out of a message helps nobody.
_MIN_SCRUB_LEN = 4


def _parts(name: str) -> list[str]:
    return [p for p in _SPLIT.split(_CAMEL.sub("_", name).lower()) if p]


def is_secret_key(name: str) -> bool:
    """True when a key's name says its value is a credential (see the module docstring for the rule)."""
    parts = _parts(str(name))
    if not parts:
        return False
    if any(p in _ALWAYS for p in parts):
        return True
    if parts[-2:] == ["key", "id"] and "access" in parts:  # aws_access_key_id, access_key_id
        return True
    if parts[-1] not in _NOUNS:
        return False
    return len(parts) == 1 or parts[-2] in _QUALIFIERS or parts[-1] == "apikey"


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, value)
    return redact(value)


def redact(obj: Any) -> Any:
    """A deep copy of plain data (dicts, lists, tuples, scalars) safe to write or print."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if k == _STORAGE_OPTIONS and v:
                out[k] = REDACTED
            elif is_secret_key(k) and v is not None and v != "":
                out[k] = REDACTED
            else:
                out[k] = _redact_value(v)
        return out
    if isinstance(obj, list | tuple):
        return [_redact_value(v) for v in obj]
    if isinstance(obj, str):
        return _redact_value(obj)
    return obj


def _public(obj: Any) -> Any:
    """`obj` without secret keys (dropped, not masked: a digest must not change when only they do)."""
    if isinstance(obj, Mapping):
        return {str(k): _public(v) for k, v in obj.items() if not is_secret_key(k)}
    if isinstance(obj, list | tuple):
        return [_public(v) for v in obj]
    if isinstance(obj, str):
        return _URL_PASSWORD.sub(lambda m: m.group("head"), obj)
    return obj


def options_digest(storage_options: Mapping[str, Any] | None) -> str:
    """sha256 (hex) of the non-secret storage options: a different endpoint or region is a different
    source, a rotated key is not."""
    text = json.dumps(_public(dict(storage_options or {})), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_view(obj: Any) -> Any:
    """A deep copy for a fingerprint's text: every `storage_options` becomes its `options_digest`, other
    secret keys are dropped."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if k == _STORAGE_OPTIONS:
                out[k] = options_digest(v if isinstance(v, Mapping) else {})
            elif not is_secret_key(k):
                out[k] = fingerprint_view(v)
        return out
    if isinstance(obj, list | tuple):
        return [fingerprint_view(v) for v in obj]
    if isinstance(obj, str):
        return _URL_PASSWORD.sub(lambda m: m.group("head"), obj)
    return obj


def secret_values(obj: Any) -> set[str]:
    """Every string held under a secret key (and every URL password) in plain data: what `scrub` cuts."""
    found: set[str] = set()
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str):
                found.add(v)
            else:
                found |= secret_values(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found |= secret_values(v)
    elif isinstance(obj, str):
        found |= {m.group("pw") for m in _URL_PASSWORD.finditer(obj)}
    return found


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every given secret value (and any URL password) replaced by "<redacted>"."""
    for value in sorted({s for s in secrets if isinstance(s, str)}, key=len, reverse=True):
        if len(value) >= _MIN_SCRUB_LEN:
            text = text.replace(value, REDACTED)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
