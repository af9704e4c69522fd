"""Lint the deployment files: containerd configs, systemd unit, Kubernetes manifests, Dockerfile.

These files are only read by other programs (containerd, systemd, the API server, a Docker
builder), so a typo in them shows up on an operator's node, not in our suite. (The Dockerfile
is also built and run with podman by integration/test_container_image.py; the checks here are
the fast ones.) Each check below
uses the real consumer where this machine has it (containerd 1.6's own config loader,
systemd-analyze) and otherwise parses the file and holds it to the field names and keys that
consumer documents. The files must also agree with each other: the socket, root and config
paths, the runtime handler name and the image version appear in several of them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from snapshotter import __version__
from snapshotter.config import CriConfig, load

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
UNIT = CONFIG / "clip.service"
DAEMONSET_YAML = CONFIG / "kubernetes" / "daemonset.yaml"
RUNTIMECLASS_YAML = CONFIG / "kubernetes" / "runtimeclass.yaml"
DOCKERFILE = REPO / "Dockerfile"

ROOT = "/var/lib/clip"
SOCKET = "/run/clip/clip.sock"
CLIP_CONFIG = "/etc/clip/clip.toml"
SERVE_ARGS = ["serve", "--root", ROOT, "--address", SOCKET, "--config", CLIP_CONFIG]
V2_CRI = "io.containerd.grpc.v1.cri"
V3_IMAGES = "io.containerd.cri.v1.images"
V3_RUNTIME = "io.containerd.cri.v1.runtime"
# containerd config snippets this suite owns, by the containerd line they target.
CONTAINERD_SNIPPETS = {
    "1.6": CONFIG / "containerd-1.6.toml",
    "1.7": CONFIG / "containerd-1.7.toml",
    "2.x": CONFIG / "containerd-2.x.toml",
}


def _files(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in CONFIG.rglob(pattern))


def _load_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _dig(doc: dict[str, Any], *keys: str) -> Any:
    """Follow nested table keys, failing with the dotted path that is missing."""
    node: Any = doc
    for i, key in enumerate(keys):
        assert isinstance(node, dict) and key in node, f"missing [{'.'.join(keys[: i + 1])}]"
        node = node[key]
    return node


# --------------------------------------------------------------------------------------------
# containerd configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _files("*.toml"), ids=lambda p: str(p.relative_to(REPO)))
def test_every_toml_under_config_parses(path: Path) -> None:
    assert isinstance(_load_toml(path), dict)


@pytest.mark.parametrize("path", _files("containerd*.toml"), ids=lambda p: str(p.relative_to(REPO)))
def test_containerd_configs_declare_the_clip_proxy_plugin(path: Path) -> None:
    """Any containerd config we ship reaches clip as a snapshot proxy plugin over a socket."""
    doc = _load_toml(path)
    assert doc.get("version") in (2, 3), "containerd needs version = 2 (1.x) or 3 (2.x)"
    plugin = _dig(doc, "proxy_plugins", "clip")
    assert plugin.get("type") == "snapshot"
    address = plugin.get("address")
    assert isinstance(address, str) and address.startswith("/") and address.endswith(".sock")


def _cri_image_settings(doc: dict[str, Any]) -> dict[str, Any]:
    """The table holding the CRI default snapshotter: it moved between config versions."""
    if doc["version"] == 3:
        return dict(_dig(doc, "plugins", V3_IMAGES))
    return dict(_dig(doc, "plugins", V2_CRI, "containerd"))


def _cri_runtimes(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["version"] == 3:
        return dict(_dig(doc, "plugins", V3_RUNTIME, "containerd", "runtimes"))
    return dict(_dig(doc, "plugins", V2_CRI, "containerd", "runtimes"))


@pytest.mark.parametrize("line", sorted(CONTAINERD_SNIPPETS))
def test_containerd_snippet_keys(line: str) -> None:
    doc = _load_toml(CONTAINERD_SNIPPETS[line])
    assert doc["version"] == (3 if line == "2.x" else 2)
    assert _dig(doc, "proxy_plugins", "clip") == {
        "type": "snapshot",
        "address": SOCKET,
        "exports": {"root": ROOT},
    }
    images = _cri_image_settings(doc)
    assert images.get("snapshotter") == "clip"
    # Without the annotations containerd sends no cri.* labels and nothing loads lazily.
    assert images.get("disable_snapshot_annotations") is False


@pytest.mark.parametrize("line", ["1.7", "2.x"])
def test_containerd_snippet_runtime_class_snapshotter(line: str) -> None:
    runtimes = _cri_runtimes(_load_toml(CONTAINERD_SNIPPETS[line]))
    clip = runtimes.get("clip")
    assert clip == {"runtime_type": "io.containerd.runc.v2", "snapshotter": "clip"}
    assert runtimes.get("runc", {}).get("runtime_type") == "io.containerd.runc.v2"


def test_containerd_2x_snippet_uses_only_version_3_plugin_ids() -> None:
    """containerd 2.x moved CRI image and runtime settings out of the grpc.v1.cri plugin."""
    plugins = _dig(_load_toml(CONTAINERD_SNIPPETS["2.x"]), "plugins")
    assert set(plugins) == {V3_IMAGES, V3_RUNTIME}


def _containerd_dump(config: Path) -> dict[str, Any]:
    """containerd's own view of a config file: `config dump` loads and prints it, starts nothing.

    It falls back to the defaults, silently, when the file is missing, so the callers check that
    our values came through rather than trusting the exit code alone.
    """
    binary = shutil.which("containerd")
    assert binary, "containerd is not installed (Debian package containerd; `make system-deps`)"
    assert config.is_file(), config
    done = subprocess.run(
        [binary, "--config", str(config), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return tomllib.loads(done.stdout)


@pytest.mark.parametrize("line", ["1.6", "1.7"])
def test_installed_containerd_accepts_snippet(line: str) -> None:
    """The Debian containerd (1.6) decodes the file and keeps our settings where CRI reads them.

    The 1.7 snippet is a superset of the 1.6 one, so 1.6 must load it too (it keeps the extra
    runtime entry and ignores the per-runtime snapshotter key, which it does not know).
    """
    dump = _containerd_dump(CONTAINERD_SNIPPETS[line])
    assert dump["version"] == 2
    assert _dig(dump, "proxy_plugins", "clip", "type") == "snapshot"
    assert _dig(dump, "proxy_plugins", "clip", "address") == SOCKET
    cri = _dig(dump, "plugins", V2_CRI, "containerd")
    assert cri["snapshotter"] == "clip"
    assert cri["disable_snapshot_annotations"] is False
    if line == "1.7":
        assert _dig(cri, "runtimes", "clip", "runtime_type") == "io.containerd.runc.v2"


# --------------------------------------------------------------------------------------------
# systemd unit
# --------------------------------------------------------------------------------------------


def _parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd's unit syntax: [Section], Key=Value, '#'/';' comments, '\\' continuations.

    Keys may repeat (each occurrence appends), so values are kept as an ordered list.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = re.sub(r"\\\n", " ", text)
    for number, raw in enumerate(logical.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"line {number}: setting outside any section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"line {number}: {raw}"
        current.append((key.strip(), value.strip()))
    return sections


def _unit_values(section: list[tuple[str, str]], key: str) -> list[str]:
    """All whitespace-separated values given for `key` (list-valued settings accumulate)."""
    return [word for k, v in section if k == key for word in v.split()]


def _unit_value(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}= must be set exactly once, found {values}"
    return values[0]


def _check_unit_structure(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "containerd.service" in _unit_values(unit["Unit"], "Before")
    service = unit["Service"]
    command = shlex.split(_unit_value(service, "ExecStart"))
    assert command == ["/usr/local/bin/clip", *SERVE_ARGS]
    # The socket and root directories are the ones systemd creates for the unit.
    assert _unit_value(service, "RuntimeDirectory") == Path(SOCKET).parent.name
    assert SOCKET.startswith("/run/" + _unit_value(service, "RuntimeDirectory") + "/")
    assert "/var/lib/" + _unit_value(service, "StateDirectory") == ROOT
    assert _unit_value(service, "Restart") == "on-failure"
    # Only clip serve is signalled: the holder of the stream mount's FUSE session must survive a
    # restart, and nothing may unmount <root>/mnt after a stop (running containers read it).
    assert _unit_value(service, "KillMode") == "process"
    assert not any(f"{ROOT}/mnt" in cmd for cmd in _unit_values(service, "ExecStopPost"))
    nofile = _unit_value(service, "LimitNOFILE")
    assert nofile == "infinity" or int(nofile) >= 65536
    assert "multi-user.target" in _unit_values(unit["Install"], "WantedBy")


def test_unit_sections_and_keys() -> None:
    _check_unit_structure(_parse_unit(UNIT.read_text()))


def test_unit_parser_rejects_garbage() -> None:
    with pytest.raises(AssertionError):
        _parse_unit("ExecStart=/bin/true\n")
    with pytest.raises(AssertionError):
        _parse_unit("[Service]\nnot a setting\n")


def _verify_root(tmp_path: Path) -> Path:
    """A throwaway filesystem root for `systemd-analyze verify --root`.

    verify resolves ExecStart= and the units the service depends on (sysinit.target, ...)
    inside that root: it gets a copy of the system's unit directory, the unit under test, and
    an executable stand-in for /usr/local/bin/clip, which is not installed on a dev machine.
    """
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    clip = root / "usr/local/bin/clip"
    clip.parent.mkdir(parents=True)
    clip.write_text("#!/bin/sh\nexit 0\n")
    clip.chmod(0o755)
    return root


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own checker; any message (unknown key, bad value) counts as a failure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # No systemd on this machine: hold the unit to the parsed checks instead.
        _check_unit_structure(_parse_unit(UNIT.read_text()))
        return
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={_verify_root(tmp_path)}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def test_systemd_analyze_verify_catches_a_bad_key(tmp_path: Path) -> None:
    """The verify check above is only worth something if a broken unit makes it speak."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        with pytest.raises(AssertionError):
            _check_unit_structure(_parse_unit(UNIT.read_text().replace("KillMode=", "KilMode=")))
        return
    root = _verify_root(tmp_path)
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=proces"))
    done = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "KillMode" in done.stdout + done.stderr or "kill mode" in done.stderr


# --------------------------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------------------------
# The subset of the Kubernetes API (apps/v1 DaemonSet, node.k8s.io/v1 RuntimeClass, core/v1 pod
# types) that our manifests may use, written from the API reference. A field is either a
# Python type, a nested schema (dict), a one-element list (array of that), or a set of allowed
# string values. Anything not listed is a typo or a field the API server would reject.

Schema = dict[str, Any]

STR_MAP = {"*": str}
OBJECT_META: Schema = {"name": str, "namespace": str, "labels": STR_MAP, "annotations": STR_MAP}
LABEL_SELECTOR: Schema = {
    "matchLabels": STR_MAP,
    "matchExpressions": [
        {"key": str, "operator": {"In", "NotIn", "Exists", "DoesNotExist"}, "values": [str]}
    ],
}
TOLERATION: Schema = {
    "key": str,
    "operator": {"Exists", "Equal"},
    "value": str,
    "effect": {"NoSchedule", "PreferNoSchedule", "NoExecute"},
    "tolerationSeconds": int,
}
PROBE: Schema = {
    "exec": {"command": [str]},
    "initialDelaySeconds": int,
    "periodSeconds": int,
    "timeoutSeconds": int,
    "successThreshold": int,
    "failureThreshold": int,
    "terminationGracePeriodSeconds": int,
}
SECURITY_CONTEXT: Schema = {
    "privileged": bool,
    "runAsUser": int,
    "runAsGroup": int,
    "runAsNonRoot": bool,
    "allowPrivilegeEscalation": bool,
    "readOnlyRootFilesystem": bool,
    "capabilities": {"add": [str], "drop": [str]},
}
QUANTITIES = {"*": (str, int)}
CONTAINER: Schema = {
    "name": str,
    "image": str,
    "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
    "command": [str],
    "args": [str],
    "env": [{"name": str, "value": str}],
    "securityContext": SECURITY_CONTEXT,
    "readinessProbe": PROBE,
    "livenessProbe": PROBE,
    "startupProbe": PROBE,
    "resources": {"requests": QUANTITIES, "limits": QUANTITIES},
    "volumeMounts": [
        {
            "name": str,
            "mountPath": str,
            "readOnly": bool,
            "subPath": str,
            "mountPropagation": {"None", "HostToContainer", "Bidirectional"},
        }
    ],
}
HOST_PATH_TYPES = {
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
}
VOLUME: Schema = {
    "name": str,
    "hostPath": {"path": str, "type": HOST_PATH_TYPES},
    "configMap": {
        "name": str,
        "optional": bool,
        "defaultMode": int,
        "items": [{"key": str, "path": str}],
    },
    "emptyDir": {"medium": str, "sizeLimit": str},
}
POD_SPEC: Schema = {
    "nodeSelector": STR_MAP,
    "tolerations": [TOLERATION],
    "priorityClassName": str,
    "hostPID": bool,
    "hostNetwork": bool,
    "hostIPC": bool,
    "serviceAccountName": str,
    "terminationGracePeriodSeconds": int,
    "runtimeClassName": str,
    "containers": [CONTAINER],
    "initContainers": [CONTAINER],
    "volumes": [VOLUME],
}
DAEMONSET: Schema = {
    "apiVersion": {"apps/v1"},
    "kind": {"DaemonSet"},
    "metadata": OBJECT_META,
    "spec": {
        "selector": LABEL_SELECTOR,
        "updateStrategy": {
            "type": {"RollingUpdate", "OnDelete"},
            "rollingUpdate": {"maxUnavailable": (int, str), "maxSurge": (int, str)},
        },
        "minReadySeconds": int,
        "revisionHistoryLimit": int,
        "template": {"metadata": OBJECT_META, "spec": POD_SPEC},
    },
}
RUNTIME_CLASS: Schema = {
    "apiVersion": {"node.k8s.io/v1"},
    "kind": {"RuntimeClass"},
    "metadata": OBJECT_META,
    "handler": str,
    "overhead": {"podFixed": QUANTITIES},
    "scheduling": {"nodeSelector": STR_MAP, "tolerations": [TOLERATION]},
}
SCHEMAS = {"DaemonSet": DAEMONSET, "RuntimeClass": RUNTIME_CLASS}


def _schema_errors(value: Any, schema: Any, path: str) -> Iterator[str]:
    """Every place where `value` strays from `schema`, as 'path: problem'."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            yield f"{path}: expected a mapping"
            return
        for key, item in value.items():
            sub = schema.get(key, schema.get("*"))
            if sub is None:
                yield f"{path}.{key}: not a field of this Kubernetes type"
            else:
                yield from _schema_errors(item, sub, f"{path}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            yield f"{path}: expected a list"
            return
        for i, item in enumerate(value):
            yield from _schema_errors(item, schema[0], f"{path}[{i}]")
    elif isinstance(schema, set):
        if value not in schema:
            yield f"{path}: {value!r} is not one of {sorted(schema)}"
    elif not isinstance(value, schema) or (schema is int and isinstance(value, bool)):
        yield f"{path}: {value!r} has the wrong type"


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _only(path: Path, kind: str) -> dict[str, Any]:
    docs = [d for d in _documents(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}"
    return docs[0]


@pytest.mark.parametrize("path", _files("*.yaml", "*.yml"), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_under_config_parses_with_known_kubernetes_fields(path: Path) -> None:
    docs = _documents(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        kind = doc.get("kind")
        assert kind in SCHEMAS, f"{path.name}: kind {kind!r} has no schema in this test"
        assert list(_schema_errors(doc, SCHEMAS[kind], kind)) == []


def test_schema_check_catches_misspelt_and_misplaced_fields() -> None:
    doc = _only(DAEMONSET_YAML, "DaemonSet")
    mount = doc["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    mount["mountPropogation"] = "Bidirectional"
    doc["spec"]["template"]["spec"]["privileged"] = True
    errors = sorted(_schema_errors(doc, DAEMONSET, "DaemonSet"))
    assert errors == [
        "DaemonSet.spec.template.spec.containers[0].volumeMounts[0].mountPropogation: "
        "not a field of this Kubernetes type",
        "DaemonSet.spec.template.spec.privileged: not a field of this Kubernetes type",
    ]


def _pod_spec() -> dict[str, Any]:
    return dict(_only(DAEMONSET_YAML, "DaemonSet")["spec"]["template"]["spec"])


def _clip_container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_daemonset_selector_matches_its_pods() -> None:
    spec = _only(DAEMONSET_YAML, "DaemonSet")["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_daemonset_runs_clip_privileged_with_the_serve_arguments() -> None:
    pod, container = _pod_spec(), _clip_container()
    assert pod.get("hostPID", False) is False
    assert container["securityContext"]["privileged"] is True
    assert container["command"] + container["args"] == ["clip", *SERVE_ARGS]
    assert container["image"].endswith(f":{__version__}")
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["clip", "status"]
    assert SOCKET in probe
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]


def test_daemonset_mounts_host_paths_at_the_same_place() -> None:
    """Overlay lowerdirs that clip returns name host paths, so the pod must see the same ones."""
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in _clip_container()["volumeMounts"]}
    assert {m["name"] for m in mounts.values()} <= volumes.keys()
    expected = {
        "/dev/fuse": "CharDevice",
        ROOT: "DirectoryOrCreate",
        str(Path(SOCKET).parent): "DirectoryOrCreate",
    }
    for path, host_type in expected.items():
        host_path = volumes[mounts[path]["name"]]["hostPath"]
        assert host_path == {"path": path, "type": host_type}
    assert mounts[ROOT].get("mountPropagation") == "Bidirectional"
    assert mounts[CLIP_CONFIG.rsplit("/", 1)[0]].get("readOnly") is True


# --------------------------------------------------------------------------------------------
# The CRI image service (kubelet's --image-service-endpoint)
# --------------------------------------------------------------------------------------------

CRI_SOCKET = "/run/clip/cri-image.sock"
KUBELET_FLAG = f"--image-service-endpoint=unix://{CRI_SOCKET}"
CRI_DOCS = [REPO / "README.md", REPO / "docs" / "deploy.md", UNIT, DAEMONSET_YAML,
            CONFIG / "kubernetes" / "README.md"]  # fmt: skip


@pytest.mark.parametrize("path", CRI_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_kubelet_flag_and_cri_socket_agree_everywhere(path: Path) -> None:
    """Every place that tells an operator about the image service names the same socket, and
    that socket sits in the directory the unit and the DaemonSet provide."""
    text = path.read_text()
    assert KUBELET_FLAG in text
    endpoints = set(re.findall(r"--image-service-endpoint=(\S+?)[`\s]", text))
    assert endpoints == {f"unix://{CRI_SOCKET}"}
    for address in re.findall(r'image_service_address = "([^"]*)"', text):
        assert address == CRI_SOCKET
    assert Path(CRI_SOCKET).parent == Path(SOCKET).parent


def test_clip_toml_documents_every_cri_key_at_its_default() -> None:
    shipped = load(CONFIG / "clip.toml").cri
    assert shipped == CriConfig()
    assert set(_load_toml(CONFIG / "clip.toml")["cri"]) == {
        f.name for f in dataclasses.fields(CriConfig)
    }


def test_daemonset_reaches_containerd_through_its_socket_directory() -> None:
    """The proxy dials containerd's socket; mounting the directory (not the file) survives a
    containerd restart, which replaces the socket file."""
    directory = str(Path(CriConfig().containerd_cri_address).parent)
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in _clip_container()["volumeMounts"]}
    assert volumes[mounts[directory]["name"]]["hostPath"] == {
        "path": directory,
        "type": "Directory",
    }


def test_unit_starts_before_kubelet() -> None:
    """With the image service in use, kubelet's image calls need clip up first."""
    unit = _parse_unit(UNIT.read_text())
    assert "kubelet.service" in _unit_values(unit["Unit"], "Before")


def test_runtimeclass_names_the_containerd_handler() -> None:
    rc = _only(RUNTIMECLASS_YAML, "RuntimeClass")
    assert rc["metadata"]["name"] == "clip"
    assert rc["handler"] == "clip"
    for line in ("1.7", "2.x"):
        assert rc["handler"] in _cri_runtimes(_load_toml(CONTAINERD_SNIPPETS[line]))


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------

COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make|pkg-config|[\w.+-]+-dev)\b")


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs.

    As Docker does, whole-line comments go first (so a comment ending in a backslash continues
    nothing), then '\\' continuations are joined.
    """
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(kept))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _stages(text: str, **build_args: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(base image, stage name, instructions) for each FROM.

    Global ARGs take their default unless given in ``build_args``, as `--build-arg` does.
    """
    args: dict[str, str] = {}
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for word, rest in _instructions(text):
        if word == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, f"unparsable FROM {rest}"
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], match[1])
            stages.append((image, match[2] or "", []))
        elif stages:
            stages[-1][2].append((word, rest))
        else:
            assert word == "ARG", f"{word} before the first FROM"
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default)
    return stages


def _runs(instructions: list[tuple[str, str]]) -> str:
    return "\n".join(rest for word, rest in instructions if word == "RUN")


def test_dockerfile_stages() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert [(image, name) for image, name, _ in stages] == [
        ("python:3.11-slim-bookworm", "builder"),
        ("python:3.11-slim-bookworm", "runtime"),
    ]
    builder_runs = _runs(stages[0][2])
    for package in ("libfuse3-dev", "pkg-config", "gcc"):
        assert package in builder_runs.split(), package


def test_dockerfile_base_is_one_build_arg_for_both_stages() -> None:
    """`--build-arg BASE=...` moves both stages: the venv's python must exist in both."""
    base = "localhost/clip-base:bookworm"
    stages = _stages(DOCKERFILE.read_text(), BASE=base)
    assert [image for image, _, _ in stages] == [base, base]


def test_dockerfile_installs_debian_python_when_the_base_has_none() -> None:
    """A plain Debian base has no python3: the builder adds Debian's with headers and venv,
    the runtime the interpreter alone, each only when `command -v python3` finds none."""
    (_, _, builder), (_, _, runtime) = _stages(DOCKERFILE.read_text())
    builder_runs, runtime_runs = _runs(builder), _runs(runtime)
    assert 'command -v python3 >/dev/null || python="python3 python3-dev python3-venv"' in (
        builder_runs
    )
    assert 'command -v python3 >/dev/null || python="python3"' in runtime_runs
    for runs in (builder_runs, runtime_runs):
        assert re.search(r"apt-get install -y --no-install-recommends [^;&]*\$python", runs)
    # The runtime layer keeps neither apt's lists nor its package caches.
    assert "apt-get clean" in runtime_runs and "rm -rf /var/lib/apt/lists/*" in runtime_runs


def test_dockerfile_runtime_stage_has_no_compiler() -> None:
    _, _, runtime = _stages(DOCKERFILE.read_text())[-1]
    runs = _runs(runtime)
    assert COMPILERS.findall(runs) == []
    assert {"libfuse3-3", "fuse3"} <= set(runs.split())
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies == ["--from=builder /opt/clip /opt/clip"]


def test_dockerfile_compiler_check_is_not_blind() -> None:
    assert COMPILERS.findall("apt-get install -y gcc libfuse3-dev") == ["gcc", "libfuse3-dev"]
    assert COMPILERS.findall("apt-get install -y libfuse3-3 fuse3 ca-certificates") == []


def test_dockerfile_entrypoint_user_and_sources() -> None:
    _, _, runtime = _stages(DOCKERFILE.read_text())[-1]
    last = {word: rest for word, rest in runtime}
    assert last["USER"] == "root"
    assert json.loads(last["ENTRYPOINT"]) == ["clip"]
    assert json.loads(last["CMD"]) == SERVE_ARGS


def test_dockerfile_copies_what_pip_install_needs() -> None:
    """The builder's `pip install .` needs pyproject.toml, setup.py (the C extension), its
    readme file and the package.

    The readme is held to pyproject's `readme` entry rather than to the file system: README.md
    belongs to the top-level docs and is checked by the packaging tests, not here.
    """
    builder = _stages(DOCKERFILE.read_text())[0][2]
    sources = [
        source
        for word, rest in builder
        if word == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    ]
    readme = _load_toml(REPO / "pyproject.toml")["project"]["readme"]
    assert sorted(sources) == sorted(["pyproject.toml", "setup.py", readme, "snapshotter"])
    assert (REPO / "pyproject.toml").is_file() and (REPO / "snapshotter").is_dir()
    assert (REPO / "setup.py").is_file()


def test_dockerignore_keeps_the_build_inputs() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= ignored
    assert not {"pyproject.toml", "setup.py", "README.md", "snapshotter", "*"} & ignored
