"""A token service for the lab's origin: the Distribution registry with `auth: token` trusts the
JWTs this issuer signs, so tests meet the Bearer flow real registries (Harbor, Docker Hub, GHCR)
use, with per-user repository grants. Only the token endpoint is ours; the registry stays real.

The issuer runs http.server in a thread on 127.0.0.1 (port 0). It checks Basic credentials
against its users, grants each requested scope only the actions the user holds for that
repository, and signs ES256 tokens carrying its self-signed certificate in `x5c`, which is
how Distribution 2.8 finds the signing key (verified against the `rootcertbundle`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import json
import secrets
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from lab import Stoppable
from p2pdist.registry.client import parse_bearer_challenge
from p2pdist.registry.oci import basic_auth

TOKEN_TTL_S = 300
SERVICE = "p2pdist-lab-registry"
ISSUER = "p2pdist-lab-token-issuer"


@dataclass(frozen=True)
class User:
    """A user of the token service: its password, and per repository pattern (fnmatch) the
    actions it may be granted (`pull`, `push`)."""

    password: str
    grants: dict[str, frozenset[str]] = field(default_factory=dict)

    def allowed(self, repository: str) -> frozenset[str]:
        actions: set[str] = set()
        for pattern, granted in self.grants.items():
            if fnmatch.fnmatchcase(repository, pattern):
                actions |= granted
        return frozenset(actions)


def pull(*patterns: str) -> dict[str, frozenset[str]]:
    return {p: frozenset({"pull"}) for p in patterns}


def push_pull(*patterns: str) -> dict[str, frozenset[str]]:
    return {p: frozenset({"pull", "push"}) for p in patterns}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer(Stoppable):
    """The token endpoint (`realm`) and the certificate the registry trusts (`cert_path`)."""

    def __init__(self, users: dict[str, User], workdir: Path, *, anonymous: User | None = None) -> None:
        self.users = users
        # What a request without credentials may get (nothing by default, as Harbor's private projects).
        self.anonymous = anonymous or User(password="")
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-issuer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued: list[tuple[str, list[dict[str, object]]]] = []  # (user, access) per token, for tests
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, object]:
        """The `auth:` section of the registry's config that trusts this issuer."""
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def sign(self, subject: str, access: list[dict[str, object]], *, ttl_s: int = TOKEN_TTL_S) -> str:
        """A JWT the registry accepts, granting `access` ([{type, name, actions}])."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + ttl_s,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def token_for(self, user: str, scopes: list[str]) -> str:
        """A token for `user` and the requested scopes, granted as the endpoint would."""
        return self.sign(user, self._grant(self.users[user], scopes))

    def _grant(self, user: User, scopes: list[str]) -> list[dict[str, object]]:
        access: list[dict[str, object]] = []
        for scope in scopes:
            # repository:NAME:ACTIONS; NAME may hold ':' only in a port, which repositories lack.
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            granted = sorted(set(actions.split(",")) & user.allowed(name))
            if granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def _authenticate(self, header: str | None) -> tuple[str, User] | None:
        """(name, user) for valid Basic credentials, ("", anonymous) for none, None when wrong."""
        if not header:
            return "", self.anonymous
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user = self.users.get(name)
        if user is None or not secrets.compare_digest(user.password, password):
            return None
        return name, user

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
                pass  # quiet: the tests read outcomes, and a log line might carry a user name

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/token":
                    self._send(404, {"errors": [{"code": "NOT_FOUND", "message": "no such endpoint"}]})
                    return
                query = parse_qs(parts.query)
                if query.get("service", [SERVICE]) != [SERVICE]:
                    self._send(400, {"errors": [{"code": "UNSUPPORTED", "message": "unknown service"}]})
                    return
                who = issuer._authenticate(self.headers.get("authorization"))
                if who is None:
                    self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    return
                name, user = who
                scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
                access = issuer._grant(user, scopes)
                token = issuer.sign(name, access)
                with issuer._lock:
                    issuer.issued.append((name, access))
                self._send(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": TOKEN_TTL_S,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    },
                )

            def _send(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if status == 401:
                    self.send_header("www-authenticate", 'Basic realm="p2pdist-lab-token"')
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class RegistryAuth(httpx.Auth):
    """httpx auth for a registry: Basic credentials, or the Bearer token they buy when the
    registry answers with a Bearer challenge (what docker and skopeo do)."""

    def __init__(self, user: str, password: str) -> None:
        self.basic = basic_auth(user, password)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["authorization"] = self.basic
        response = yield request
        challenge = parse_bearer_challenge(response.headers.get("www-authenticate", ""))
        if response.status_code != 401 or challenge is None:
            return
        params = {k: v for k, v in challenge.items() if k in ("service", "scope")}
        token_request = httpx.Request("GET", challenge["realm"], params=params)
        token_request.headers["authorization"] = self.basic
        token_response = yield token_request
        token_response.read()
        if token_response.status_code != 200:
            return
        request.headers["authorization"] = f"Bearer {token_response.json()['token']}"
        yield request
