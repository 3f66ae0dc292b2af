"""Who owns a memory (`Scope`), what it is (`MemoryKind`), and validation of every caller-given name.

All identifiers that come from callers are checked here, once, against allow-lists: the store never
builds a filesystem path from them (blobs are named by content hash), but a strict alphabet also
keeps logs, SQL parameters and safetensors headers free of control characters and surprises.

Scope fields and tags may use letters and digits of any script (`\\w`), so user and tenant names
need not be ASCII, but must be NFC-normalised: otherwise "é" typed two ways, or the Kelvin sign
and "K", would name two different tenants that print the same. No whitespace, control, format
(zero-width, bidi) or other invisible characters are accepted anywhere.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass, fields

from d2l_store.errors import InvalidIdentifierError

MAX_SCOPE_FIELD = 128
MAX_TAG = 64
MAX_TAGS = 64
MAX_FINGERPRINT = 256
MAX_MODULE_PATH = 256

_SCOPE_RE = re.compile(r"[\w.:@+=-]*")  # \w: letters, digits and _ of any script
_TAG_RE = re.compile(r"[\w.:@+=/-]+")
_ID_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SOURCE_HASH_RE = re.compile(r"[A-Za-z0-9:_=+-]{1,128}")
_FINGERPRINT_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces or control characters
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


class MemoryKind(str, enum.Enum):
    """What a stored adapter was made from; stored as its string value."""

    DOCUMENT = "document"
    CONVERSATION = "conversation"
    TOOL_DOC = "tool_doc"
    COMPACTED_HISTORY = "compacted_history"


@dataclass(frozen=True, slots=True)
class Scope:
    """Owner of a memory. Any field may be empty; `tenant` is the isolation boundary.

    As a filter (list, get, delete, delete_scope) the tenant always matches exactly, even when
    empty, and each other field matches only when non-empty: `Scope(tenant="t", user="u")`
    selects all of u's memories in t, across agents and sessions, and never anything outside t.
    """

    tenant: str = ""
    user: str = ""
    agent: str = ""
    session: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            check_scope_field(f.name, getattr(self, f.name))

    def as_dict(self) -> dict[str, str]:
        return {"tenant": self.tenant, "user": self.user, "agent": self.agent, "session": self.session}


def _check(kind: str, value: object, pattern: re.Pattern[str], max_len: int) -> str:
    if not isinstance(value, str):
        raise InvalidIdentifierError(f"{kind} must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise InvalidIdentifierError(f"{kind} is {len(value)} characters long; the limit is {max_len}")
    if not pattern.fullmatch(value):
        raise InvalidIdentifierError(f"{kind} {value[:80]!r} has characters outside {pattern.pattern}")
    if not value.isascii() and not unicodedata.is_normalized("NFC", value):
        raise InvalidIdentifierError(
            f"{kind} {value[:80]!r} is not NFC-normalised; pass unicodedata.normalize('NFC', ...)"
        )
    return value


def check_scope_field(name: str, value: object) -> str:
    return _check(f"scope.{name}", value, _SCOPE_RE, MAX_SCOPE_FIELD)


def check_record_id(value: object) -> str:
    """Record ids are 32 lowercase hex digits, as made by `new_record_id`."""
    return _check("record id", value, _ID_RE, 32)


def check_blob_hash(value: object) -> str:
    """Blob names are sha256 hex digests; checked before any path is built from one."""
    return _check("blob hash", value, _SHA256_RE, 64)


def check_source_hash(value: object) -> str:
    return _check("source_hash", value, _SOURCE_HASH_RE, 128)


def check_fingerprint(name: str, value: object) -> str:
    """Base-model and hypernetwork fingerprints: non-empty printable ASCII."""
    return _check(name, value, _FINGERPRINT_RE, MAX_FINGERPRINT)


def check_module_path(value: object) -> str:
    """Dotted module paths such as `model.layers.3.mlp.down_proj`."""
    return _check("module path", value, _MODULE_RE, MAX_MODULE_PATH)


def check_tags(tags: object) -> tuple[str, ...]:
    """Tags are a sequence (not a bare string) of short names; returned sorted and deduplicated."""
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple, set, frozenset)):
        raise InvalidIdentifierError(f"tags must be a sequence of strings, got {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise InvalidIdentifierError(f"{len(tags)} tags given; the limit is {MAX_TAGS}")
    return tuple(sorted({_check("tag", t, _TAG_RE, MAX_TAG) for t in tags}))
