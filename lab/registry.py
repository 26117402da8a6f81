"""The origin registry: a real Distribution registry (`docker-registry serve`) on loopback.

Storage, config and log live in a temporary directory that `stop()` removes. Optional
htpasswd basic auth makes a private registry; `token_users` puts it behind the lab's token
issuer (lab/tokenauth.py) instead, with Bearer auth and per-user repository grants.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from lab import LabError, Stoppable
from lab.ports import free_port
from lab.procs import Service
from lab.tokenauth import TokenIssuer, User

REGISTRY_BINARY = "/usr/bin/docker-registry"
READY_TIMEOUT_S = 30.0
# A port picked by free_port() can be taken by someone else before the registry binds it.
START_ATTEMPTS = 3


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry, made by `htpasswd -Bbn` (the format the registry reads)."""
    try:
        result = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LabError("htpasswd not found: install apache2-utils (make setup)") from exc
    if result.returncode != 0:
        raise LabError(f"htpasswd failed: {result.stderr.strip()}")
    return result.stdout.strip() + "\n"


class Origin(Stoppable):
    """A running Distribution registry on 127.0.0.1 with filesystem storage.

    `creds=(user, password)` turns on htpasswd basic auth; `GET /v2/` then answers 401
    without credentials. `token_users` turns on token auth instead: the registry answers 401
    with a Bearer challenge naming `self.token_issuer`, which grants each user its repositories.
    """

    def __init__(
        self,
        *,
        creds: tuple[str, str] | None = None,
        token_users: dict[str, User] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.creds = creds
        self.token_issuer: TokenIssuer | None = None
        self._owns_workdir = workdir is None
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="p2pdist-origin-"))
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.port = 0
        self._service: Service | None = None
        try:
            if token_users is not None:
                self.token_issuer = TokenIssuer(token_users, self.workdir)
            self._start()
        except BaseException:
            self._cleanup_dir()
            raise

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the registry host as image references spell it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int:
        assert self._service is not None
        return self._service.pid

    def _write_config(self, port: int) -> None:
        config: dict[str, object] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "accesslog": {"disabled": True},
                "fields": {"service": "origin"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "redirect": {"disable": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{port}",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.creds is not None:
            htpasswd_path = self.workdir / "htpasswd"
            htpasswd_path.write_text(htpasswd_line(*self.creds))
            config["auth"] = {"htpasswd": {"realm": "p2pdist-lab", "path": str(htpasswd_path)}}
        elif self.token_issuer is not None:
            config["auth"] = self.token_issuer.registry_auth()
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _start(self) -> None:
        if not Path(REGISTRY_BINARY).exists():
            raise LabError(f"{REGISTRY_BINARY} not found: install docker-registry (make setup)")
        ready_statuses = (401,) if self.creds is not None or self.token_issuer is not None else (200,)
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            self._write_config(port)
            service = Service(
                "origin",
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                self.log_path,
                f"http://127.0.0.1:{port}",
            )
            try:
                service.wait_http(f"http://127.0.0.1:{port}/v2/", READY_TIMEOUT_S, ready_statuses)
            except LabError:
                service.stop()
                if attempt == START_ATTEMPTS or "address already in use" not in service.log_tail():
                    raise
                continue
            self.port = port
            self._service = service
            return

    def stop(self) -> None:
        """Stop the registry (SIGTERM, SIGKILL after 5 s) and remove its temporary directory."""
        if self._service is not None:
            self._service.stop()
            self._service = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.token_issuer is not None:
            self.token_issuer.stop()
            self.token_issuer = None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Origin({self.url!r}, auth={'token' if self.token_issuer else 'on' if self.creds else 'off'})"
