"""The web configuration file of Prometheus exporters (exporter-toolkit's format, as used by
node_exporter and dcgm-exporter): TLS, client certificates, basic auth with bcrypt hashes.

    tls_server_config:
      cert_file: /etc/agentd/agentd.crt
      key_file: /etc/agentd/agentd.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: /etc/agentd/ca.crt             # optional
      min_version: TLS12                             # optional
    http_server_config:
      headers: {X-Frame-Options: deny}               # optional
    basic_auth_users:
      prometheus: $2y$10$...                         # htpasswd -nBC 10 "" | tr -d ':\\n'

Settings this server cannot honour (cipher_suites, client_allowed_sans, ...) are refused
rather than silently ignored: a security setting that does nothing is worse than an error.
As in exporter-toolkit, only the security headers below may be set (with their enumerated
values where they have some), and a password hash must parse as bcrypt: a hash that no
password can match would lock every client out without a word. Header values with control
characters (a CR/LF would inject headers into every response) are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import ssl
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import yaml

from agentd.tomlfile import read_text

GOOD_CACHE = 256  # verified (user, password) pairs remembered
BAD_CACHE = 1024  # failed pairs remembered


class WebConfigError(ValueError):
    pass


CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version"}
_TLS_REFUSED = {"cipher_suites", "curve_preferences", "prefer_server_cipher_suites",
                "client_allowed_sans", "cert", "key"}
# exporter-toolkit's extraHTTPHeaders: the headers a web config may add, and the values
# allowed where the header has a fixed set (None: any value without control characters).
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed inside a field value
# A bcrypt hash: $2a$, $2b$, $2x$ or $2y$, a two-digit cost, then 22 characters of salt and
# 31 of hash in bcrypt's base-64 alphabet.
_BCRYPT = re.compile(r"^\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}$")
MAX_BCRYPT_COST = 16  # each step doubles the check: cost 10 takes ~60 ms, 16 ~4 s, 31 days


@dataclass
class WebConfig:
    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _good: set = field(default_factory=set)
    _bad: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check_password(self, user: str, password: str) -> bool:
        """bcrypt is deliberately slow (~50-100 ms at cost 10): see cached() and verify()."""
        ok = self.cached(user, password)
        return self.verify(user, password) if ok is None else ok

    def _key(self, user: str, password: str) -> tuple | None:
        hashed = self.users.get(user)
        if hashed is None:
            return None
        return (user, hmac.new(hashed, password.encode(), hashlib.sha256).digest())

    def cached(self, user: str, password: str) -> bool | None:
        """The verdict on a pair checked before, without bcrypt; None if not known. Keys are
        salted digests (the hash as HMAC key), never the password. Good pairs are few (one
        per user and password), so an attacker cannot push them out; bad pairs are kept in a
        bounded LRU, so a client repeating one wrong password costs one bcrypt check."""
        key = self._key(user, password)
        if key is None:
            return None
        with self._lock:
            if key in self._good:
                return True
            if key in self._bad:
                self._bad.move_to_end(key)
                return False
        return None

    def verify(self, user: str, password: str) -> bool:
        """The bcrypt check, remembered for cached()."""
        import bcrypt

        hashed = self.users.get(user)
        if hashed is None:
            # Spend the same time as a real check so user names cannot be probed by timing.
            bcrypt.checkpw(password.encode(), _dummy_hash())
            return False
        key = self._key(user, password)
        try:
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            ok = False
        with self._lock:
            if ok:
                if len(self._good) >= GOOD_CACHE:
                    self._good.clear()  # a user whose password changes often; start over
                self._good.add(key)
            else:
                self._bad[key] = True
                while len(self._bad) > BAD_CACHE:
                    self._bad.popitem(last=False)
        return ok


_DUMMY: list[bytes] = []


def _dummy_hash() -> bytes:
    import bcrypt

    if not _DUMMY:
        _DUMMY.append(bcrypt.hashpw(b"agentd", bcrypt.gensalt(10)))
    return _DUMMY[0]


def check_bcrypt(hashed: object) -> bytes:
    """The hash as bytes if bcrypt can check passwords against it; else WebConfigError with
    what is wrong. bcrypt itself parses it, at the lowest cost so that loading stays cheap."""
    import bcrypt

    if not isinstance(hashed, str):
        raise WebConfigError("not a bcrypt hash (expected a string like $2y$10$...)")
    m = _BCRYPT.match(hashed)
    if not m:
        shape = "a bcrypt hash is $2y$, a cost, $, then 53 of [./A-Za-z0-9]" \
            if len(hashed) == 60 else \
            f"{len(hashed)} characters where a bcrypt hash has 60: was it copied whole?"
        raise WebConfigError(f"not a bcrypt hash ({shape})")
    cost = int(m.group(1))
    if not 4 <= cost <= MAX_BCRYPT_COST:
        raise WebConfigError(f"bcrypt cost {cost} is outside 4..{MAX_BCRYPT_COST} (each step "
                             "doubles every new login's CPU time; 10 to 12 is usual)")
    try:
        bcrypt.checkpw(b"", (hashed[:4] + "04" + hashed[6:]).encode())
    except ValueError as e:
        raise WebConfigError(f"not a bcrypt hash: bcrypt cannot parse it ({e})") from None
    return hashed.encode()


def _headers(headers: object, path: str) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise WebConfigError(f"{path}: http_server_config.headers must be a mapping")
    out = {}
    for name, value in headers.items():
        where = f"{path}: http_server_config.headers"
        if name not in HEADERS:
            raise WebConfigError(f"{where}: {str(name)[:80]!r} cannot be set (allowed: "
                                 f"{', '.join(HEADERS)})")
        if not isinstance(value, str) or _CONTROL.search(value):
            raise WebConfigError(f"{where}.{name}: expected one line of text, got "
                                 f"{str(value)[:80]!r}")
        allowed = HEADERS[name]
        if allowed is not None and value not in allowed:
            raise WebConfigError(f"{where}.{name}: expected one of {', '.join(allowed)}, got "
                                 f"{value[:80]!r}")
        out[name] = value
    return out


def load_web_config(path: str) -> WebConfig:
    text = read_text(path, "web config", WebConfigError)
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise WebConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise WebConfigError(f"{path}: nested too deeply") from None
    if not isinstance(doc, dict):
        raise WebConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(doc) - {"tls_server_config", "http_server_config", "basic_auth_users"}
    if unknown:
        raise WebConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    cfg = WebConfig()
    tls = doc.get("tls_server_config")
    if tls:
        cfg.tls = _tls_context(tls, path)
    http = doc.get("http_server_config") or {}
    if not isinstance(http, dict) or set(http) - {"headers", "http2"}:
        raise WebConfigError(f"{path}: http_server_config supports 'headers' only")
    cfg.headers = _headers(http.get("headers") or {}, path)
    users = doc.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise WebConfigError(f"{path}: basic_auth_users must map user names to bcrypt hashes")
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user or _CONTROL.search(user):
            raise WebConfigError(f"{path}: basic_auth_users: {str(user)[:80]!r} is not a user "
                                 "name (text without ':' or control characters)")
        try:
            cfg.users[user] = check_bcrypt(hashed)
        except WebConfigError as e:
            raise WebConfigError(f"{path}: basic_auth_users.{user}: {e}") from None
    return cfg


def _tls_context(tls: dict, path: str) -> ssl.SSLContext:
    if not isinstance(tls, dict):
        raise WebConfigError(f"{path}: tls_server_config must be a mapping")
    refused = set(tls) & _TLS_REFUSED
    if refused:
        raise WebConfigError(
            f"{path}: tls_server_config.{sorted(refused)[0]} is not supported by agentd")
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"{path}: unknown key tls_server_config.{sorted(unknown)[0]}")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError(f"{path}: tls_server_config needs cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls["cert_file"], tls["key_file"])
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"{path}: cannot load cert_file/key_file: {e}") from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"{path}: client_auth_type: expected one of {', '.join(CLIENT_AUTH)}")
    ca = tls.get("client_ca_file")
    if auth != "NoClientCert" and not ca:
        # Python's TLS verifies every client certificate it accepts, so each of these
        # modes needs the CA to verify against (Go's RequireAnyClientCert does not).
        raise WebConfigError(f"{path}: client_auth_type {auth} needs client_ca_file")
    if ca:
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"{path}: cannot load client_ca_file: {e}") from None
    ctx.verify_mode = CLIENT_AUTH[auth]
    for key, attr in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in tls:
            if tls[key] not in TLS_VERSIONS:
                raise WebConfigError(f"{path}: {key}: expected one of {', '.join(TLS_VERSIONS)}")
            setattr(ctx, attr, TLS_VERSIONS[tls[key]])
    return ctx
