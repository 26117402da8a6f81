"""The token-auth origin: the real Distribution registry with `auth: token` and the lab's token
issuer, on its own and behind a peer's mirror (Bearer clients, and `p2pdist get --user` whose
Basic credentials the mirror exchanges for a token)."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lab.image import ImageInfo, push_image
from lab.registry import Origin
from lab.tokenauth import RegistryAuth
from tests.support.cluster import Cluster, p2pdist_bin, sha256_file
from tests.support.origin import OUTSIDER, PUSHER, TEAM_READER, ImageFactory

MiB = 1 << 20


@pytest.fixture(scope="module")
def team_image(token_origin: Origin, image_factory: ImageFactory) -> ImageInfo:
    image = image_factory((6 * MiB, 1 * MiB), 51)
    push_image(image, token_origin.host, "team/app", creds=PUSHER)
    return image


def test_registry_challenges_with_bearer_and_honours_only_the_users_grants(
    token_origin: Origin, team_image: ImageInfo
) -> None:
    layer = team_image.layers[1]
    url = f"{token_origin.url}/v2/team/app/blobs/{layer.digest}"
    anonymous = httpx.get(url, timeout=30)
    assert anonymous.status_code == 401
    challenge = anonymous.headers["www-authenticate"]
    assert challenge.startswith("Bearer realm=")
    assert 'scope="repository:team/app:pull"' in challenge

    allowed = httpx.get(url, auth=RegistryAuth(*TEAM_READER), timeout=30)
    assert allowed.status_code == 200
    assert "sha256:" + hashlib.sha256(allowed.content).hexdigest() == layer.digest

    # A valid user whose token carries no pull on team/app: the registry's insufficient_scope.
    outsider = httpx.get(url, auth=RegistryAuth(*OUTSIDER), timeout=30)
    assert outsider.status_code == 401
    assert 'error="insufficient_scope"' in outsider.headers["www-authenticate"]
    wrong = httpx.get(url, auth=RegistryAuth(TEAM_READER[0], "not-the-password"), timeout=30)
    assert wrong.status_code == 401


@pytest.fixture(scope="module")
def token_mirror(token_origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("token-mirror"), token_origin.host)
    try:
        cluster.add_peers(1, ("--insecure-registry", cluster.relay.host, "--registry-mirror", cluster.relay.url))
        yield cluster
    finally:
        cluster.stop()


def test_bearer_clients_get_a_private_blob_through_the_mirror_only_with_pull_on_the_repository(
    token_mirror: Cluster, team_image: ImageInfo
) -> None:
    peer = token_mirror.peers[0]
    layer = team_image.layers[0]
    url = f"{peer.proxy_url}/v2/team/app/blobs/{layer.digest}"
    ns = {"ns": token_mirror.relay.host}
    # The mirror relays the registry's challenge; the client gets its token from the realm.
    anonymous = httpx.get(url, params=ns, timeout=60)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer realm=")
    allowed = httpx.get(url, params=ns, auth=RegistryAuth(*TEAM_READER), timeout=60)
    assert allowed.status_code == 200
    assert "sha256:" + hashlib.sha256(allowed.content).hexdigest() == layer.digest
    # The peer now holds the blob; a token without pull on team/app still gets the registry's no.
    for method in ("GET", "HEAD"):
        refused = httpx.request(method, url, params=ns, auth=RegistryAuth(*OUTSIDER), timeout=60)
        assert refused.status_code == 401, method
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


def test_get_with_user_pays_for_a_token_with_basic_credentials(
    token_mirror: Cluster, team_image: ImageInfo, tmp_path: Path
) -> None:
    peer = token_mirror.peers[0]
    assert peer.proxy_url is not None
    layer = team_image.layers[1]
    url = token_mirror.blob_url("team/app", layer.digest)

    def get(user: str, out: Path) -> subprocess.CompletedProcess[str]:
        argv = [p2pdist_bin(), "get", url, "-o", str(out), "--peer", peer.proxy_url or "", "-q", "--user", user]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    ok = get(":".join(TEAM_READER), tmp_path / "ok")
    assert ok.returncode == 0, ok.stderr
    assert sha256_file(tmp_path / "ok") == layer.digest
    refused = get(":".join(OUTSIDER), tmp_path / "refused")
    assert refused.returncode != 0
    assert refused.stderr.startswith("p2pdist get: error: 401 from"), refused.stderr
    assert not (tmp_path / "refused").exists()
    wrong = get(f"{TEAM_READER[0]}:not-the-password", tmp_path / "wrong")
    assert wrong.returncode != 0 and "401" in wrong.stderr
