"""containerd 1.6 with its CRI plugin on, and a small synchronous CRI client.

``CriContainerd`` is the test containerd (own root, state, sockets) with the CRI plugin
enabled the way a Kubernetes node would run it with clip: ``snapshotter = "clip"`` and
``disable_snapshot_annotations = false``. This machine has no CAP_SYS_RESOURCE for the
runtime's OOM score and no CNI, hence ``restrict_oom_score_adj = true`` and host-network pods
only (the CNI directories point at empty temp dirs so the host's config is never read).
There is no internet either: the sandbox ("pause") image is one the test built and pushed.
Registries are plain HTTP on loopback, declared as CRI mirrors with an ``http://`` endpoint.
The stream server listens on a kernel-chosen loopback port so parallel runs never collide.

``CriClient`` speaks clip's own ``runtime.v1`` proto (snapshotter/api/cri) to any CRI socket:
containerd's, or clip's image-service proxy for the ImageService calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from integration.harness.containerd import Containerd
from integration.harness.images import (
    BuiltImage,
    build_image,
    host_rootfs_tree,
    make_layer_tar,
    push_image,
)
from snapshotter.api.cri.runtime.v1 import api_pb2 as cri
from snapshotter.api.cri.runtime.v1 import api_pb2_grpc as cri_grpc

CRI_TABLES = """
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "clip"
    disable_snapshot_annotations = false
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/net.d"
"""
MIRROR = """
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{endpoint}"]
"""
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its images in


class CriContainerd(Containerd):
    """The test containerd with the CRI plugin on (see the module docstring)."""

    def __init__(
        self,
        workdir: Path,
        clip_socket: Path,
        clip_root: Path,
        *,
        sandbox_image: str,
        http_registries: Sequence[str],
        aliases: dict[str, str] | None = None,
    ) -> None:
        """``aliases``: registry hosts that exist only in this containerd's CRI mirror
        configuration, each served by the http registry at the given host:port."""
        super().__init__(workdir, clip_socket, clip_root)
        self.sandbox_image = sandbox_image
        self.http_registries = list(http_registries)
        self.aliases = dict(aliases or {})

    def config_text(self) -> str:
        base = super().config_text().replace(
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n', ""
        )
        cni = self.workdir / "cni"
        for sub in ("bin", "net.d"):
            (cni / sub).mkdir(parents=True, exist_ok=True)
        tables = CRI_TABLES.format(
            sandbox_image=self.sandbox_image, runc_root=self.workdir / "runc", cni=cni
        )
        mirrors = "".join(MIRROR.format(host=h, endpoint=h) for h in self.http_registries)
        mirrors += "".join(MIRROR.format(host=a, endpoint=e) for a, e in self.aliases.items())
        return base + tables + mirrors


def build_pause_image(workdir: Path, registry_host: str, repo: str = "pause") -> BuiltImage:
    """A sandbox image whose entrypoint sleeps forever (host ``sleep`` and its libraries)."""
    tree = host_rootfs_tree(workdir / "tree", ["/bin/sleep"])
    layer = make_layer_tar(tree, workdir / "layer.tar.gz")
    oci = build_image([layer], workdir / "oci", cmd=["/bin/sleep", "infinity"])
    return push_image(oci, registry_host, repo, "1")


@dataclass(frozen=True)
class LogLine:
    stream: str
    text: str


def read_cri_log(path: Path) -> list[LogLine]:
    """Parse a CRI container log: ``<time> <stream> <P|F> <text>`` per line; partial lines
    (``P``) are joined with the line that completes them."""
    out: list[LogLine] = []
    pending = ""
    for line in path.read_text().splitlines():
        _time, stream, tag, text = [*line.split(" ", 3), ""][:4]
        pending += text
        if tag == "F":
            out.append(LogLine(stream, pending))
            pending = ""
    return out


class CriClient:
    """Synchronous CRI client over a unix socket (RuntimeService and ImageService stubs)."""

    def __init__(self, socket: Path, *, timeout: float = 300.0) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # images ---------------------------------------------------------------------------

    def pull(self, image: str, auth: cri.AuthConfig | None = None) -> str:
        """PullImage; the image id containerd answers."""
        req = cri.PullImageRequest(image=cri.ImageSpec(image=image), auth=auth)
        return self.images.PullImage(req, timeout=self.timeout).image_ref

    def image_status(self, image: str) -> cri.Image | None:
        req = cri.ImageStatusRequest(image=cri.ImageSpec(image=image))
        resp = self.images.ImageStatus(req, timeout=self.timeout)
        return resp.image if resp.HasField("image") else None

    def list_images(self) -> list[cri.Image]:
        return list(self.images.ListImages(cri.ListImagesRequest(), timeout=self.timeout).images)

    def remove_image(self, image: str) -> None:
        req = cri.RemoveImageRequest(image=cri.ImageSpec(image=image))
        self.images.RemoveImage(req, timeout=self.timeout)

    def image_fs_info(self) -> cri.ImageFsInfoResponse:
        return self.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=self.timeout)

    # pods and containers ---------------------------------------------------------------

    def version(self) -> cri.VersionResponse:
        return self.runtime.Version(cri.VersionRequest(version="v1"), timeout=self.timeout)

    @staticmethod
    def host_network_sandbox(name: str, log_directory: Path) -> cri.PodSandboxConfig:
        """A pod in the node's network namespace (no CNI needed; no hostname either, runc sets
        none without a private UTS namespace), logs under ``log_directory``."""
        host_net = cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=f"uid-{name}", namespace="clip-test"),
            log_directory=str(log_directory),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=host_net)
            ),
        )

    def run_pod(self, config: cri.PodSandboxConfig) -> str:
        req = cri.RunPodSandboxRequest(config=config)
        return self.runtime.RunPodSandbox(req, timeout=self.timeout).pod_sandbox_id

    def create_container(
        self, pod_id: str, sandbox: cri.PodSandboxConfig, name: str, image: str,
        command: Sequence[str],
    ) -> str:  # fmt: skip
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name),
            image=cri.ImageSpec(image=image),
            command=list(command),
            log_path=f"{name}.log",
            linux=cri.LinuxContainerConfig(
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER)
                )
            ),
        )
        req = cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox
        )
        return self.runtime.CreateContainer(req, timeout=self.timeout).container_id

    def start_container(self, container_id: str) -> None:
        req = cri.StartContainerRequest(container_id=container_id)
        self.runtime.StartContainer(req, timeout=self.timeout)

    def container_status(self, container_id: str) -> cri.ContainerStatus:
        req = cri.ContainerStatusRequest(container_id=container_id)
        return self.runtime.ContainerStatus(req, timeout=self.timeout).status

    def wait_exited(self, container_id: str, timeout: float = 120.0) -> cri.ContainerStatus:
        """Poll the container's state until it has exited (failing after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.state == cri.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"container {container_id} still {status.state}")
            time.sleep(0.1)

    def remove_pod(self, pod_id: str) -> None:
        """Stop and remove a sandbox and its containers (idempotent, as CRI defines it)."""
        self.runtime.StopPodSandbox(
            cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout
        )
        self.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout
        )
