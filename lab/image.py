"""Generated OCI images: an OCI image layout on disk with real, uncompressed tar layers.

Layer bytes are deterministic in (seed, layer index) and are streamed to disk while hashed,
so images of any size take constant memory. `push` copies a layout to a registry with skopeo.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3
import httpx

from lab import LabError
from lab.tokenauth import RegistryAuth

OCI_LAYOUT_VERSION = "1.0.0"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

CHUNK_BYTES = 8 << 20
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
# A fixed mtime keeps layer digests a function of (seed, index, size) alone.
_MTIME = 1_700_000_000

ProgressFn = Callable[[int, "Blob"], None]


@dataclass(frozen=True)
class Blob:
    """A content-addressed blob: `digest` is `sha256:<hex>`, `size` in bytes."""

    digest: str
    size: int

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class ImageInfo:
    """What `make_oci_layout` wrote: where, under which tag, and every blob's digest."""

    layout_dir: Path
    tag: str
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def manifest_digest(self) -> str:
        return self.manifest.digest

    @property
    def config_digest(self) -> str:
        return self.config.digest

    @property
    def total_layer_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    def blob_path(self, digest: str) -> Path:
        return self.layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


def layer_bytes(seed: int, index: int, offset: int, length: int) -> bytes:
    """Pseudo-random content of file `index` of image `seed`, bytes [offset, offset+length)."""
    stream = blake3.blake3(f"p2pdist-lab {seed} {index}".encode())
    data: bytes = stream.digest(length=length, seek=offset)
    return data


def _write_blob(blobs_dir: Path, data: bytes) -> Blob:
    digest = hashlib.sha256(data).hexdigest()
    (blobs_dir / digest).write_bytes(data)
    return Blob(f"sha256:{digest}", len(data))


def _write_tar_layer(blobs_dir: Path, seed: int, index: int, file_size: int) -> Blob:
    """Write one tar holding `layer-<index>.bin` of `file_size` bytes; return its blob."""
    info = tarfile.TarInfo(f"layer-{index}.bin")
    info.size = file_size
    info.mode = 0o755
    info.mtime = _MTIME
    info.uname = info.gname = "root"
    sha = hashlib.sha256()
    written = 0
    fd, tmp_name = tempfile.mkstemp(dir=blobs_dir, prefix=".layer-")
    try:
        with os.fdopen(fd, "wb") as out:

            def emit(data: bytes) -> None:
                nonlocal written
                out.write(data)
                sha.update(data)
                written += len(data)

            emit(info.tobuf(format=tarfile.USTAR_FORMAT))
            for offset in range(0, file_size, CHUNK_BYTES):
                emit(layer_bytes(seed, index, offset, min(CHUNK_BYTES, file_size - offset)))
            emit(bytes(-file_size % _BLOCK))
            emit(bytes(2 * _BLOCK))  # end-of-archive marker
            emit(bytes(-written % _RECORD))  # tarfile pads archives to whole records
        blob = Blob(f"sha256:{sha.hexdigest()}", written)
        os.replace(tmp_name, blobs_dir / blob.hex)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return blob


def _canonical_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def make_oci_layout(
    layout_dir: Path,
    layer_sizes: list[int],
    seed: int,
    *,
    tag: str = "latest",
    progress: ProgressFn | None = None,
) -> ImageInfo:
    """Write an OCI image layout with one uncompressed tar layer per entry of `layer_sizes`.

    Layer `i` holds the single file `layer-<i>.bin` of `layer_sizes[i]` bytes (the tar adds
    about 1.5 KiB to 10 KiB). `progress(i, blob)` is called after each layer is written.
    """
    if not layer_sizes:
        raise LabError("an image needs at least one layer")
    blobs_dir = layout_dir / "blobs" / "sha256"
    blobs_dir.mkdir(parents=True, exist_ok=True)

    layers: list[Blob] = []
    for index, size in enumerate(layer_sizes):
        if size < 0:
            raise LabError(f"layer {index}: negative size {size}")
        layer = _write_tar_layer(blobs_dir, seed, index, size)
        layers.append(layer)
        if progress is not None:
            progress(index, layer)

    config = _write_blob(
        blobs_dir,
        _canonical_json(
            {
                "architecture": "amd64",
                "os": "linux",
                "created": "2023-11-14T22:13:20Z",
                "config": {"Cmd": ["/layer-0.bin"]},
                # Uncompressed layers: each diff_id is the layer digest itself.
                "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            }
        ),
    )
    manifest = _write_blob(
        blobs_dir,
        _canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_MANIFEST,
                "config": {
                    "mediaType": MEDIA_TYPE_CONFIG,
                    "digest": config.digest,
                    "size": config.size,
                },
                "layers": [
                    {"mediaType": MEDIA_TYPE_LAYER_TAR, "digest": layer.digest, "size": layer.size} for layer in layers
                ],
            }
        ),
    )
    image_index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_TYPE_MANIFEST,
                "digest": manifest.digest,
                "size": manifest.size,
                "annotations": {REF_NAME_ANNOTATION: tag},
            }
        ],
    }
    (layout_dir / "index.json").write_bytes(_canonical_json(image_index))
    layout_marker = {"imageLayoutVersion": OCI_LAYOUT_VERSION}
    (layout_dir / "oci-layout").write_bytes(_canonical_json(layout_marker))
    return ImageInfo(layout_dir, tag, manifest, config, tuple(layers))


def push(
    layout_dir: Path,
    tag: str,
    registry_host: str,
    repo: str,
    *,
    creds: tuple[str, str] | None = None,
    verify: tuple[str, ...] = (),
) -> None:
    """Copy `oci:layout_dir:tag` to `docker://registry_host/repo:tag` with skopeo.

    `--preserve-digests` keeps every blob byte for byte (skopeo would otherwise gzip the
    uncompressed layers for a registry). Each digest in `verify` is then checked with a
    HEAD on the registry.
    """
    argv = [
        "skopeo", "--insecure-policy", "copy", "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        f"oci:{layout_dir}:{tag}",
        f"docker://{registry_host}/{repo}:{tag}",
    ]  # fmt: skip
    if creds is not None:
        argv[3:3] = ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LabError("skopeo not found: install it (make setup)") from exc
    if result.returncode != 0:
        target = f"{registry_host}/{repo}:{tag}"
        raise LabError(f"skopeo copy to {target} failed: {result.stderr.strip()}")

    auth = RegistryAuth(*creds) if creds is not None else None
    with httpx.Client(base_url=f"http://{registry_host}", auth=auth, timeout=10.0) as client:
        for digest in verify:
            status = client.head(f"/v2/{repo}/blobs/{digest}").status_code
            if status != 200:
                raise LabError(f"after push, {registry_host}/{repo} answers {status} for {digest}")


def push_image(image: ImageInfo, registry_host: str, repo: str, *, creds: tuple[str, str] | None = None) -> None:
    """Push a generated image and check that the registry holds its exact blobs."""
    digests = (image.config.digest, *(layer.digest for layer in image.layers))
    push(image.layout_dir, image.tag, registry_host, repo, creds=creds, verify=digests)
