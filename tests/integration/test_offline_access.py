"""The mirror when the registry cannot be reached at all (issue 13): a real peer, the real
Distribution registry with htpasswd auth behind a relay that the test stops (connection
refused) and starts again on the same port. Blobs and manifests by digest are served on the
registry's earlier yes to the same credentials, also after a restart of the peer; anyone
else, and a registry that answers, is refused; a tag is answered at once with an error, or
marked stale when the operator asked for stale tags."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx

from lab.image import MEDIA_TYPE_MANIFEST, push_image
from lab.procs import Service
from lab.registry import Origin
from peer.verdicts import VERDICTS_FILE
from tests.support.cluster import Cluster, restart
from tests.support.origin import ORIGIN_CREDS, ImageFactory

MiB = 1 << 20
OFFLINE = "x-p2pdist-offline-access"
ACCEPT = {"accept": f"{MEDIA_TYPE_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"}
GOOD = httpx.BasicAuth(*ORIGIN_CREDS)
WRONG = httpx.BasicAuth(ORIGIN_CREDS[0], "not-the-password")


def one_line(response: httpx.Response) -> str:
    message: str = response.json()["errors"][0]["message"]
    assert message and "\n" not in message and "lab-password" not in message
    return message


def test_with_the_registry_unreachable_a_peer_serves_on_the_registrys_earlier_yes_only(
    tmp_path: Path, private_origin: Origin, image_factory: ImageFactory
) -> None:
    image = image_factory((5 * MiB,), 41)
    push_image(image, private_origin.host, "offline/app", creds=ORIGIN_CREDS)
    (layer,) = image.layers
    cluster = Cluster(tmp_path, private_origin.host)
    try:
        (peer,) = cluster.add_peers(1, ("--insecure-registry", cluster.relay.host))
        ns = {"ns": cluster.relay.host}
        blob = f"/v2/offline/app/blobs/{layer.digest}"
        by_digest = f"/v2/offline/app/manifests/{image.manifest_digest}"
        by_tag = f"/v2/offline/app/manifests/{image.tag}"

        def get(path: str, **kwargs: object) -> httpx.Response:
            assert peer.proxy_url is not None
            return httpx.get(peer.proxy_url + path, params=ns, timeout=30, **kwargs)  # type: ignore[arg-type]

        # Online: the registry says yes to GOOD (blob and manifest go through and are kept).
        response = get(blob, auth=GOOD)
        assert response.status_code == 200 and OFFLINE not in response.headers
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == layer.digest
        assert get(by_tag, auth=GOOD, headers=ACCEPT).status_code == 200
        assert get(blob, auth=WRONG).status_code == 401  # the registry's no, relayed

        # The registry cannot be reached: connection refused from now on.
        cluster.relay.stop()
        started = time.monotonic()
        for auth in (WRONG, None):  # never had a yes: fail closed at once, one line saying why
            response = get(blob, auth=auth)
            assert response.status_code == 502, response.text
            assert "offline_grace_s" in one_line(response)
        response = get(by_tag, auth=GOOD, headers=ACCEPT)
        assert response.status_code == 502 and "serve_stale_tags is off" in one_line(response)
        response = get(by_digest, auth=GOOD, headers=ACCEPT)
        assert response.status_code == 200, response.text
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == image.manifest_digest
        assert response.headers["docker-content-digest"] == image.manifest_digest
        assert response.headers["content-type"] == MEDIA_TYPE_MANIFEST and OFFLINE in response.headers
        assert get(by_digest, auth=WRONG, headers=ACCEPT).status_code == 502
        assert time.monotonic() - started < 10.0, "answers while unreachable must not wait out timeouts"

        # A restarted peer keeps the yeses (a file of hashes, no credential), and serves a tag's
        # last resolution marked stale once the operator asks for it.
        peer.stop()
        kept = (Path(peer.argv[peer.argv.index("--data-dir") + 1]) / VERDICTS_FILE).read_bytes()
        assert ORIGIN_CREDS[1].encode() not in kept and b"bGFiLXVzZXI6" not in kept  # base64 of "lab-user:"
        peer.argv.extend(["--serve-stale-tags", "true"])
        peer = restart(cluster, peer)
        response = get(blob, auth=GOOD)
        assert response.status_code == 200, response.text
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == layer.digest
        assert "allowed these credentials" in response.headers[OFFLINE]
        assert get(blob, auth=WRONG).status_code == 502
        response = get(by_tag, auth=GOOD, headers=ACCEPT)
        assert response.status_code == 200, response.text
        assert response.headers["warning"] == '110 - "stale: registry unreachable"'
        assert "x-p2pdist-stale" in response.headers
        assert "sha256:" + hashlib.sha256(response.content).hexdigest() == image.manifest_digest

        # The registry is back: it decides again, no restart needed.
        relay = cluster.relay.service
        cluster.relay.service = Service(relay.name, relay.argv, relay.log_path, relay.url)
        cluster.relay.stats(fresh=True)
        # A registry that answers again decides again at once, with no restart.
        assert get(blob, auth=WRONG).status_code == 401
        response = get(blob, auth=GOOD)
        assert response.status_code == 200 and OFFLINE not in response.headers
        response = get(by_tag, auth=GOOD, headers=ACCEPT)
        assert response.status_code == 200 and "warning" not in response.headers
    finally:
        cluster.stop()
