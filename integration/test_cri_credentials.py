"""Kubernetes pull secrets reach lazy layers: a real CRI client, containerd 1.6's CRI plugin
with ``snapshotter = "clip"``, and a registry that wants basic auth.

The credentials exist only in the CRI PullImageRequest sent to clip's image-service socket
(no docker config, no ``[registry]`` auth): containerd uses them for the manifest and config,
clip's keychain for the layer blobs it fetches itself. The pod (host network, sandbox image
built here) runs a container that prints a file of the private image; its log is checked.
The secret must appear nowhere in clip's log or in ``clip status``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from integration.harness.clipd import CLIP, ClipDaemon
from integration.harness.cri import (
    NAMESPACE,
    CriClient,
    CriContainerd,
    build_pause_image,
    read_cri_log,
)
from integration.harness.images import (
    BuiltImage,
    build_image,
    host_rootfs_tree,
    make_layer_tar,
    push_image,
)
from integration.harness.registry import RegistryServer
from snapshotter.api.cri.runtime.v1 import api_pb2 as cri
from snapshotter.config import Config, load, with_overrides
from snapshotter.cri.fsinfo import storage_dirs, storage_usage

pytestmark = pytest.mark.slow

USER = "kubelet-user"
SECRET = "s3cr3t-Pa55word-for-clip"  # unique enough to grep for
MESSAGE = "bytes of a private image, read lazily through clip"


@dataclass
class Node:
    """One Kubernetes-like node: clip (with [cri]) and containerd (CRI on, clip snapshotter)."""

    clip: ClipDaemon
    containerd: CriContainerd
    cri_socket: Path
    config: Path
    private: RegistryServer
    image: BuiltImage
    logs: Path


def _private_image(work: Path, host_tools: Path, registry: RegistryServer) -> BuiltImage:
    data = work / "data-tree"
    (data / "data").mkdir(parents=True)
    (data / "data" / "message.txt").write_text(MESSAGE + "\n")
    layers = [
        make_layer_tar(host_tools, work / "layer0.tar.gz"),
        make_layer_tar(data, work / "layer1.tar.gz"),
    ]
    oci = build_image(layers, work / "oci")
    return push_image(oci, registry.host, "private/app", "1", auth=(USER, SECRET))


def _clip_config(path: Path, cri_socket: Path, containerd_socket: Path, hosts: list[str]) -> Path:
    registries = "".join(f'[registry."{h}"]\nplain_http = true\n\n' for h in hosts)
    path.write_text(
        registries
        + "[cri]\n"
        + f'image_service_address = "{cri_socket}"\n'
        + f'containerd_cri_address = "{containerd_socket}"\n'
    )
    return path


@pytest.fixture
def node(
    registry: RegistryServer, host_tools_tree: Path, tmp_path: Path
) -> Iterator[Node]:
    private = RegistryServer(tmp_path / "private-registry", htpasswd=(USER, SECRET))
    private.start()
    work = Path(tempfile.mkdtemp(prefix="clip-cri-", dir="/tmp"))  # short: socket paths
    containerd: CriContainerd | None = None
    clip: ClipDaemon | None = None
    try:
        pause = build_pause_image(tmp_path / "pause", registry.host, "cri-test/pause")
        image = _private_image(tmp_path / "app", host_tools_tree, private)
        cri_socket = work / "run" / "cri-image.sock"
        containerd_dir = work / "ctrd"
        config = _clip_config(
            work / "clip.toml", cri_socket, containerd_dir / "containerd.sock",
            [registry.host, private.host],
        )  # fmt: skip
        clip = ClipDaemon(work / "clip", config=config, log_level="debug")
        clip.start()
        containerd = CriContainerd(
            containerd_dir, clip.socket, clip.root,
            sandbox_image=pause.ref, http_registries=[registry.host, private.host],
        )  # fmt: skip
        containerd.start()
        yield Node(clip, containerd, cri_socket, config, private, image, work / "pods")
    finally:
        if containerd is not None:
            containerd.stop()
        if clip is not None:
            clip.stop()
        private.stop()
        shutil.rmtree(work, ignore_errors=True)


def _basic_auth() -> cri.AuthConfig:
    return cri.AuthConfig(username=USER, password=SECRET)


def _run_and_read(
    client: CriClient, node: Node, name: str, command: list[str], ref: str | None = None
) -> str:
    """Run a host-network pod with one container (of ``ref``, by default the node's private
    image); its stdout once it has exited."""
    sandbox = client.host_network_sandbox(name, node.logs / name)
    pod = client.run_pod(sandbox)
    try:
        container = client.create_container(pod, sandbox, "app", ref or node.image.ref, command)
        client.start_container(container)
        status = client.wait_exited(container)
        assert status.exit_code == 0, f"{status.reason}: {status.message}"
        lines = read_cri_log(node.logs / name / "app.log")
        return "\n".join(line.text for line in lines if line.stream == "stdout")
    finally:
        client.remove_pod(pod)


def _content_digests(containerd: CriContainerd) -> set[str]:
    out = containerd.ctr("content", "ls", "-q", namespace=NAMESPACE).stdout
    return set(out.split())


def test_pull_secret_in_the_request_reaches_lazy_layers(node: Node) -> None:
    with CriClient(node.cri_socket) as through_clip, CriClient(node.containerd.socket) as direct:
        # Without credentials, the registry refuses containerd: clip passes the error through
        # with containerd's own code and message.
        with pytest.raises(grpc.RpcError) as refused_by_clip:
            through_clip.pull(node.image.ref)
        with pytest.raises(grpc.RpcError) as refused_directly:
            direct.pull(node.image.ref)
        assert refused_by_clip.value.code() == refused_directly.value.code()
        assert "401" in (refused_by_clip.value.details() or "")

        image_id = through_clip.pull(node.image.ref, _basic_auth())
        assert image_id.startswith("sha256:")
        status = through_clip.image_status(node.image.ref)
        assert status is not None and status.id == image_id

        # The layers were served by clip (lazily, with the keychain's credentials):
        # containerd never downloaded them into its content store.
        assert not _content_digests(node.containerd) & set(node.image.layer_digests)

        output = _run_and_read(direct, node, "private-pod", ["/bin/cat", "/data/message.txt"])
        assert output == MESSAGE


def test_credentials_never_reach_logs_or_status(node: Node) -> None:
    with CriClient(node.cri_socket) as through_clip:
        encoded = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        through_clip.pull(node.image.ref, cri.AuthConfig(auth=encoded))
    status = subprocess.run(
        [*CLIP, "status", "--address", str(node.clip.socket), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    clip_log = node.clip.log_path.read_text()
    assert "PullImage credentials" in clip_log  # the pull was logged (without secrets)
    for text in (clip_log, status.stdout, status.stderr):
        assert SECRET not in text
        assert encoded not in text


def test_image_service_calls_are_forwarded(node: Node) -> None:
    """ListImages, RemoveImage and ImageFsInfo through clip agree with containerd."""
    with CriClient(node.cri_socket) as through_clip, CriClient(node.containerd.socket) as direct:
        image_id = through_clip.pull(node.image.ref, _basic_auth())
        assert {i.id for i in through_clip.list_images()} == {i.id for i in direct.list_images()}
        assert image_id in {i.id for i in direct.list_images()}

        clip_usage = storage_usage(storage_dirs(_config_with_root(node)))
        theirs = direct.image_fs_info()
        ours = through_clip.image_fs_info()
        assert clip_usage.bytes > 0  # the indexes and cached bytes of the pulled layers
        first = ours.image_filesystems[0]
        base = theirs.image_filesystems[0]
        # containerd 1.6 names a directory that does not exist for a proxy snapshotter;
        # kubelet could not measure it, so clip names its root (where the images are).
        assert not Path(base.fs_id.mountpoint).exists()
        assert first.fs_id.mountpoint == str(node.clip.root)
        assert first.used_bytes.value >= base.used_bytes.value + clip_usage.bytes
        assert first.inodes_used.value >= base.inodes_used.value + clip_usage.inodes

        through_clip.remove_image(node.image.ref)
        assert direct.image_status(node.image.ref) is None


def _config_with_root(node: Node) -> Config:
    """The daemon's config as `clip serve` sees it (its --root flag applied)."""
    return with_overrides(load(node.config), root=str(node.clip.root))


def test_published_indexes_of_a_private_image_are_read_with_the_pull_secret(
    node: Node, tmp_path: Path
) -> None:
    """`clip index push` artifacts live in the private repository too: with the pull's
    credentials clip finds them (a lazy first pull) instead of streaming the blobs."""
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    encoded = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    auths = {"auths": {node.private.host: {"auth": encoded}}}
    (docker_config / "config.json").write_text(json.dumps(auths))
    subprocess.run(
        [*CLIP, "index", "push", "--plain-http", node.image.ref],
        env={**os.environ, "DOCKER_CONFIG": str(docker_config)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip

    with CriClient(node.cri_socket) as through_clip:
        through_clip.pull(node.image.ref, _basic_auth())

    sources = {
        entry["layer"]: entry["source"]
        for entry in map(json.loads, node.clip.log_path.read_text().splitlines())
        if entry.get("msg") == "index resolved"
    }
    assert sources == {digest: "registry" for digest in node.image.layer_digests}


def _exec(client: CriClient, container: str, *command: str) -> str:
    """ExecSync in a running container (CRI's `kubectl exec`): its stdout; fails on non-zero."""
    req = cri.ExecSyncRequest(container_id=container, cmd=list(command), timeout=60)
    resp = client.runtime.ExecSync(req, timeout=120)
    assert resp.exit_code == 0, resp.stderr.decode(errors="replace")
    return resp.stdout.decode()


@pytest.mark.parametrize("how", ["TERM", "KILL"])
def test_a_running_pod_reads_through_a_clip_restart(
    node: Node, registry: RegistryServer, tmp_path: Path, how: str
) -> None:
    """A pod started through CRI keeps running and reading its image's files while `clip serve`
    is stopped (SIGTERM) or killed (SIGKILL) and started again, and new pods start after it.
    (Partly fetched layers through a restart: integration/test_lazy_e2e.py.)"""
    tree = host_rootfs_tree(tmp_path / "sleeper", ("/bin/sh", "/bin/cat", "/bin/sleep"))
    (tree / "data").mkdir()
    (tree / "data" / "message.txt").write_text(MESSAGE + "\n")
    oci = build_image([make_layer_tar(tree, tmp_path / "sleeper.tar.gz")], tmp_path / "oci")
    image = push_image(oci, registry.host, "cri-test/sleeper", "1")
    with CriClient(node.cri_socket) as through_clip, CriClient(node.containerd.socket) as direct:
        through_clip.pull(image.ref)
        sandbox = direct.host_network_sandbox("survivor", node.logs / "survivor")
        pod = direct.run_pod(sandbox)
        try:
            container = direct.create_container(
                pod, sandbox, "app", image.ref, ["/bin/sleep", "100000"]
            )
            direct.start_container(container)
            assert _exec(direct, container, "/bin/cat", "/data/message.txt") == MESSAGE + "\n"
            if how == "TERM":
                node.clip.stop(keep_mounts=True)
            else:
                node.clip.kill()
            # no clip: the running pod still reads its files
            assert _exec(direct, container, "/bin/cat", "/data/message.txt") == MESSAGE + "\n"
            node.clip.start()
            node.containerd.wait_for_snapshotter(NAMESPACE)
            assert direct.container_status(container).state == cri.CONTAINER_RUNNING
            assert _exec(direct, container, "/bin/cat", "/data/message.txt") == MESSAGE + "\n"
        finally:
            direct.remove_pod(pod)
        # and a new pod of the same image starts on the restarted daemon
        output = _run_and_read(direct, node, "after", ["/bin/cat", "/data/message.txt"], image.ref)
        assert output == MESSAGE



def test_a_host_known_only_to_containerds_mirror_config(
    registry: RegistryServer, host_tools_tree: Path, tmp_path: Path
) -> None:
    """The image's registry host exists only in containerd's CRI mirror configuration (it does
    not resolve): clip reads containerd's config file and fetches the lazy layers from the
    mirror, with no `[registry]` entry of its own for that host. (Without `containerd_config`
    the same pull fails in clip: "only-in-containerd.invalid:5000 ... Name or service not
    known".)"""
    alias = "only-in-containerd.invalid:5000"
    work = Path(tempfile.mkdtemp(prefix="clip-cri-", dir="/tmp"))
    containerd: CriContainerd | None = None
    clip: ClipDaemon | None = None
    try:
        pause = build_pause_image(tmp_path / "pause", registry.host, "cri-test/pause")
        tree = tmp_path / "tree"
        shutil.copytree(host_tools_tree, tree, symlinks=True)
        (tree / "data").mkdir()
        (tree / "data" / "message.txt").write_text(MESSAGE + "\n")
        oci = build_image([make_layer_tar(tree, tmp_path / "l.tar.gz")], tmp_path / "oci")
        pushed = push_image(oci, registry.host, "cri-test/mirrored", "1")
        ctrd = work / "ctrd"
        cri_socket = work / "run" / "cri-image.sock"
        config = work / "clip.toml"
        config.write_text(
            f'[registry]\ncontainerd_config = "{ctrd / "config.toml"}"\n\n'
            f'[registry."{registry.host}"]\nplain_http = true\n\n'
            f'[cri]\nimage_service_address = "{cri_socket}"\n'
            f'containerd_cri_address = "{ctrd / "containerd.sock"}"\n'
        )
        clip = ClipDaemon(work / "clip", config=config, log_level="debug")
        containerd = CriContainerd(
            ctrd, clip.socket, clip.root, sandbox_image=pause.ref,
            http_registries=[registry.host], aliases={alias: registry.host},
        )  # fmt: skip
        ctrd.mkdir(parents=True)
        (ctrd / "config.toml").write_text(containerd.config_text())  # clip reads it at start
        clip.start()
        containerd.start()
        ref = f"{alias}/cri-test/mirrored:1"
        with CriClient(cri_socket) as through_clip, CriClient(containerd.socket) as direct:
            through_clip.pull(ref)
            node = Node(clip, containerd, cri_socket, config, registry, pushed, work / "pods")
            command = ["/bin/cat", "/data/message.txt"]
            output = _run_and_read(direct, node, "mirrored", command, ref)
        assert output == MESSAGE
        # clip, not containerd, fetched the layer: from the mirror containerd's config names
        assert not _content_digests(containerd) & set(pushed.layer_digests)
    finally:
        if containerd is not None:
            containerd.stop()
        if clip is not None:
            clip.stop()
        shutil.rmtree(work, ignore_errors=True)
