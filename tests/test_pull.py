"""Unit tests of `clip pull`'s pure helpers; the pull itself is tested end to end in
integration/test_lazy_e2e.py against real containerd (which also checks that the chainIDs
computed here name the snapshots containerd's own overlayfs unpack creates)."""

from __future__ import annotations

import hashlib
import json

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.pull import MAX_LABEL_BYTES, chain_ids, diff_ids_of, image_layers_label
from snapshotter.registry import Descriptor, ResolvedImage, parse_reference


def _digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def test_chain_ids_follow_the_image_spec() -> None:
    a, b, c = _digest(1), _digest(2), _digest(3)
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == [a, ab, abc]
    assert chain_ids([]) == []


def test_image_layers_label_is_cut_to_containerds_limit() -> None:
    key = "containerd.io/snapshot/cri.image-layers"
    digests = [_digest(i) for i in range(200)]
    value = image_layers_label(key, digests)
    assert len(key) + len(value) <= MAX_LABEL_BYTES
    kept = value.split(",")
    assert kept == digests[: len(kept)] and 40 < len(kept) < 200
    assert image_layers_label(key, digests[:3]) == ",".join(digests[:3])


def _image(config: object, layers: int) -> ResolvedImage:
    layer_descs = [Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", _digest(i), 10)
                   for i in range(layers)]  # fmt: skip
    return ResolvedImage(
        ref=parse_reference("127.0.0.1:5000/app:1"),
        manifest_digest=_digest(99),
        manifest={},
        manifest_bytes=b"{}",
        media_type="application/vnd.oci.image.manifest.v1+json",
        config=Descriptor("application/vnd.oci.image.config.v1+json", _digest(98), 2),
        config_bytes=json.dumps(config).encode(),
        layers=layer_descs,
        platform="linux/amd64",
    )


def test_diff_ids_must_match_the_layers() -> None:
    good = {"rootfs": {"type": "layers", "diff_ids": [_digest(7), _digest(8)]}}
    assert diff_ids_of(_image(good, 2)) == [_digest(7), _digest(8)]
    with pytest.raises(InvalidArgument, match="2 diff_ids for 3 layers"):
        diff_ids_of(_image(good, 3))
    with pytest.raises(InvalidArgument, match=r"no rootfs\.diff_ids"):
        diff_ids_of(_image({"config": {}}, 1))


def test_terminal_progress_names_layers_bytes_and_time(capsys: pytest.CaptureFixture[str]) -> None:
    from snapshotter.cli.pull import _Reporter
    from snapshotter.pull import LayerProgress, PullResult

    result = PullResult(name="127.0.0.1:5000/app:1", manifest_digest=_digest(1))
    result.layers = [LayerProgress(i, _digest(i), 2_000_000, _digest(10 + i)) for i in range(3)]
    result.layers[0].state = "lazy"
    result.layers[1].state = "resolving"
    _Reporter(interactive=True)(result)
    line = capsys.readouterr().err
    assert "1/3 layers, 2.0 MB of 6.0 MB ready" in line and "s, now sha256:" in line
    _Reporter(interactive=False)(result)
    assert capsys.readouterr().err == ""
