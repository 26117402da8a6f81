"""The lab's generated images, on disk only: each layer a tar of one file of the requested
size, and the same seed giving the same image. (Pushing them is tests/integration/test_lab.py.)"""

from __future__ import annotations

import tarfile
from pathlib import Path

from lab.image import make_oci_layout
from tests.support.origin import ImageFactory

MiB = 1 << 20


def test_generated_layer_is_a_tar_of_one_file_with_the_requested_size(
    image_factory: ImageFactory,
) -> None:
    image = image_factory((3 * MiB, 1 * MiB), 1)
    for index, (layer, size) in enumerate(zip(image.layers, (3 * MiB, 1 * MiB), strict=True)):
        with tarfile.open(image.blob_path(layer.digest)) as tar:
            members = tar.getmembers()
            assert [(m.name, m.size) for m in members] == [(f"layer-{index}.bin", size)]


def test_same_seed_gives_the_same_image_and_another_seed_another(tmp_path: Path) -> None:
    first = make_oci_layout(tmp_path / "a", [100_000, 5_000], seed=3)
    again = make_oci_layout(tmp_path / "b", [100_000, 5_000], seed=3)
    other = make_oci_layout(tmp_path / "c", [100_000, 5_000], seed=4)
    assert first.manifest_digest == again.manifest_digest
    assert len({layer.digest for layer in first.layers + other.layers}) == 4
