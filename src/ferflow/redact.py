"""The one redaction policy: what of a URI, a message or a record may leave the process.

Masked with `***`: a URI's userinfo (`user:pass@`), the values of query parameters whose
names look like credentials (tokens, signatures, keys: presigned S3/GCS/Azure URLs carry
them), and the values of credential-looking environment variables. Everything else is kept,
so a redacted URI still says where the bytes came from.

Every writer of run records, reports, compiled pipelines, MLflow tags and log lines goes
through this module; nothing else decides what counts as a secret.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
# A query parameter is secret when a part of its name (split at - _ .) is, or ends with, one
# of these words: X-Amz-Signature/Credential/Security-Token, X-Goog-Signature, Azure SAS
# `sig`, `access_token`, `api_key`/`apikey`, CloudFront `Signature`/`Policy`/`Key-Pair-Id`,
# OAuth `code`. X-Amz-SignedHeaders or versionId are not.
_SECRET_WORDS = ("token", "sig", "signature", "secret", "password", "passwd", "pwd", "credential", "credentials", "key",
                 "auth", "authorization", "session", "policy", "code")
_QUERY_PAIR = re.compile(r"(?P<key>[?&;](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#;\s\"'<>]+)")


def _secret_name(name: str) -> bool:
    return any(part.endswith(_SECRET_WORDS) for part in re.split(r"[-_.]", name.lower()) if part)


_SECRET_ENV_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CONNECTION_STRING|ACCESS_KEY(?!_ID)|API_KEY",
                              re.IGNORECASE)


def _secret_env_values() -> list[str]:
    """Values of credential-looking variables (longest first, so overlaps redact fully)."""
    # A snapshot: other threads (MLflow's own) may change os.environ while we read it.
    snapshot = dict(os.environ.copy())
    values = {v for k, v in snapshot.items() if _SECRET_ENV_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact_text(text: object) -> str:
    """Text with URI userinfo, secret-looking query values and credential env values masked."""
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))
    out = _QUERY_PAIR.sub(lambda m: f"{m.group('key')}{MASK}" if _secret_name(m.group("name")) else m.group(0), out)
    for value in _secret_env_values():
        out = out.replace(value, MASK)
    return out


def redact_uri(uri: str) -> str:
    """A URI fit for a message, a record or a tag."""
    try:
        parts = urlsplit(uri)
        if parts.username or parts.password:
            host = parts.hostname or ""
            netloc = f"{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
            uri = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # a malformed port or bracket: the regexes still apply
        pass
    return redact_text(uri)


def redact_tree(obj: Any) -> Any:
    """The same JSON-like tree with every string redacted (dict keys kept)."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return redact_text(obj) if isinstance(obj, str) else obj


_MASKED = re.compile(r"://\*\*\*@|=\*\*\*(?:[&#;]|$)")


def is_redacted(uri: str) -> bool:
    """True for a URI this module has masked: it can no longer be fetched."""
    return bool(_MASKED.search(uri))


class RedactingFilter(logging.Filter):
    """Redacts each record's final message: third-party debug lines (urllib3 logs request
    lines with their query strings) pass through the same policy as ferflow's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = RedactingFilter()


def install_log_filter() -> None:
    """Attach the filter to every handler there is now: the root's, Python's last resort and
    those libraries attach to their own loggers (MLflow's does not propagate). Called again
    once MLflow is imported (tracking.service)."""
    handlers = list(logging.getLogger().handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        handlers.extend(getattr(logger, "handlers", ()))
    for handler in handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
