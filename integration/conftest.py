"""Shared fixtures for integration tests: a real docker-registry and small test images.

The registry is session-scoped (one process for the whole run, own storage under pytest's
temporary root, stopped by PID at the end); tests push to distinct repositories so they do not
interfere. ``build_test_image`` turns directory trees into a pushed image in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.harness.images import (
    BuiltImage,
    build_image,
    host_rootfs_tree,
    make_layer_tar,
    push_image,
)
from integration.harness.registry import RegistryServer

BuildTestImage = Callable[..., BuiltImage]


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous docker-registry on 127.0.0.1:<free port> for the whole session."""
    server = RegistryServer(tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def host_tools_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with /bin/sh, cat, ls, echo, sha256sum and their libraries (built once)."""
    return host_rootfs_tree(tmp_path_factory.mktemp("hosttools") / "tree")


@pytest.fixture
def build_test_image(tmp_path: Path, registry: RegistryServer) -> BuildTestImage:
    """``build_test_image(trees, repo, tag="latest", compression="gzip", tool="gnu", ...)``.

    Each tree becomes one layer (in order); the image is pushed to the session registry.
    Extra keyword arguments (platform, cmd, env) go to :func:`build_image`.
    """
    counter = iter(range(1_000_000))

    def build(
        trees: list[Path],
        repo: str,
        tag: str = "latest",
        *,
        compression: str = "gzip",
        tool: str = "gnu",
        **image_kwargs: object,
    ) -> BuiltImage:
        work = tmp_path / f"image-{next(counter)}"
        suffix = {"gzip": ".tar.gz", "zstd": ".tar.zst", "none": ".tar"}[compression]
        layers = [
            make_layer_tar(tree, work / f"layer{i}{suffix}", compression=compression, tool=tool)
            for i, tree in enumerate(trees)
        ]
        oci = build_image(layers, work / "oci", **image_kwargs)  # type: ignore[arg-type]
        return push_image(oci, registry.host, repo, tag)

    return build
