"""The registry client: resolve images, read blobs (whole, streamed, by range), push.

One ``aiohttp.ClientSession`` carries every request so connections are reused. Every public
operation runs under one deadline (the caller's, else ``operation_timeout`` from now) and the
one retry policy of :mod:`snapshotter.registry.policy`: a round tries the registry's endpoints
in order (mirrors first, from containerd's configuration and clip.toml, see
:mod:`snapshotter.registry.hosts`), skipping those whose circuit breaker is open and handing
over at once when one times out, refuses, fails TLS or lacks the content; rounds are retried
with backoff while attempts and time remain. Each request authorizes (cached bearer token or
basic credentials, obtained on the first 401 challenge), follows redirects by hand so the
``Authorization`` header never reaches another origin, and remembers where a blob GET was
redirected (blob storage's signed URL) so later range reads of that blob go there directly
until the URL expires or is refused. What is left is mapped to clip's typed errors with a
message naming the image and the object.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import aiohttp
from yarl import URL

from snapshotter import __version__
from snapshotter.config import Config, RegistryConfig
from snapshotter.contentcache.breaker import CircuitBreaker
from snapshotter.errors import ClipError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from snapshotter.registry import mediatypes as mt
from snapshotter.registry.auth import (
    Challenge,
    Credentials,
    DockerConfig,
    Keychain,
    parse_challenge,
)
from snapshotter.registry.errors import AccessDenied, DigestMismatch
from snapshotter.registry.hosts import ContainerdRegistry, HostEndpoint, RegistryHosts
from snapshotter.registry.policy import Clock, Deadline, RetryPolicy, Sleep, Transient, retrying
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.registry.types import Descriptor, Platform, ResolvedImage, host_platform

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 8 << 20
CHUNK = 1 << 20
REDIRECT_MARGIN = 5.0  # seconds before a signed URL's stated expiry that we stop using it
TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError)

Body = bytes | Path | None
Attempt = Callable[[HostEndpoint, Deadline], Awaitable[T]]


@dataclass
class _Redirect:
    url: URL
    until: float  # on the client's clock


class RegistryClient:
    """Async client for OCI distribution registries (see module docstring).

    ``hosts`` is a :class:`RegistryHosts` (containerd's configuration plus clip.toml
    overrides) or just clip.toml's host tables. ``timeout``, ``retries`` and ``backoff``, when
    given, override the policy's first-byte timeout, attempts (``retries + 1``) and backoff.
    ``clock``, ``wall_clock`` and ``sleep`` are injectable for tests; deadlines passed to
    operations are absolute times on ``clock``.
    """

    def __init__(
        self,
        hosts: Mapping[str, RegistryConfig] | RegistryHosts | None = None,
        docker_config: Path | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        session: aiohttp.ClientSession | None = None,
        *,
        backoff: float | None = None,
        keychain: Keychain | None = None,
        policy: RetryPolicy | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.hosts = hosts if isinstance(hosts, RegistryHosts) else RegistryHosts(hosts)
        self.policy = _tuned(policy or RetryPolicy(), timeout, retries, backoff)
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self.keychain = keychain
        self._wall = wall_clock
        self._sleep = sleep
        self._docker = DockerConfig.load(docker_config)
        self._session = session
        self._own_session = session is None
        self._creds: dict[str, Credentials | None] = {}
        self._tokens: dict[tuple[str, str], str] = {}
        self._basic: dict[tuple[str, str], str] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._redirects: dict[tuple[str, str, str], _Redirect] = {}
        self._ssl: dict[HostEndpoint, ssl.SSLContext | bool] = {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        plain_http_host: str | None = None,
        docker_config: Path | None = None,
        keychain: Keychain | None = None,
    ) -> RegistryClient:
        """A client as clip.toml says: containerd's registry configuration (from
        ``[registry] containerd_config``), the ``[registry."HOST"]`` overrides, the policy."""
        settings = config.registry_settings
        path = Path(settings.containerd_config) if settings.containerd_config else None
        hosts = RegistryHosts(config.registry, ContainerdRegistry.load(path))
        if plain_http_host is not None:
            hosts = hosts.with_plain_http(plain_http_host)
        policy = RetryPolicy.from_settings(settings)
        return cls(hosts, docker_config, policy=policy, keychain=keychain)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it."""
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None if self._own_session else self._session

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=64, limit_per_host=16, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                headers={"User-Agent": f"clip/{__version__}", "Accept-Encoding": "identity"},
            )
            self._own_session = True
        return self._session

    def deadline(self, seconds: float | None = None) -> float:
        """An absolute deadline ``seconds`` (default: the operation timeout) from now."""
        return self.clock() + (self.policy.operation_timeout if seconds is None else seconds)

    def breaker_state(self, host: str) -> str:
        """The circuit state of an endpoint host (closed, open, half_open) for status/tests."""
        found = [b.state for key, b in self._breakers.items() if URL(key).raw_authority == host]
        return found[0] if found else "closed"

    # ------------------------------------------------------------ public API: pull

    async def resolve(
        self,
        ref: str | Reference,
        platform: str | None = None,
        *,
        deadline: float | None = None,
    ) -> ResolvedImage:
        """Manifest, config and layers of ``ref`` for ``platform`` (default: this host's),
        picked from an index; one deadline covers every request."""
        r = parse_reference(ref)
        want = Platform.parse(platform) if platform else host_platform()
        deadline = self.deadline() if deadline is None else deadline
        data, media_type, digest = await self.fetch_manifest(r, deadline=deadline)
        index_bytes = index_digest = None
        if media_type in mt.INDEXES:
            index_bytes, index_digest = data, digest
            chosen = _select_platform(r, json.loads(data), want)
            data, media_type, digest = await self.fetch_manifest(
                r, chosen.digest, deadline=deadline
            )
            if media_type not in mt.MANIFESTS:
                raise InvalidArgument(f"image {r}: index entry {chosen.digest} is {media_type}")
        manifest = _json_object(r, data, "manifest")
        config = Descriptor.from_json(manifest.get("config"), f"image {r}: manifest config")
        layers = [
            Descriptor.from_json(d, f"image {r}: layer {i}")
            for i, d in enumerate(manifest.get("layers") or [])
        ]
        pinned = r.with_digest(digest)
        config_bytes = await self.fetch_blob(
            pinned, config.digest, size=config.size, deadline=deadline
        )
        if index_bytes is None:
            _check_config_platform(r, config_bytes, want)
        return ResolvedImage(
            ref=r,
            manifest_digest=digest,
            manifest=manifest,
            manifest_bytes=data,
            media_type=media_type,
            config=config,
            config_bytes=config_bytes,
            layers=layers,
            platform=str(want),
            index_digest=index_digest,
            index_bytes=index_bytes,
        )

    async def fetch_manifest(
        self,
        ref: str | Reference,
        reference: str | None = None,
        *,
        deadline: float | None = None,
        optional: bool = False,
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; a digest reference is verified.

        ``optional``: the manifest may well not exist (an index artifact's tag): a "not found"
        from any endpoint is the answer (NotFound at once), not a failure to retry elsewhere.
        """
        r = parse_reference(ref)
        reference = reference or r.reference
        what = f"manifest {reference}"
        path = f"/v2/{r.repository}/manifests/{reference}"
        capability = "pull" if reference.startswith("sha256:") else "resolve"
        data, content_type = await self._pull_body(
            r,
            what,
            path,
            headers={"Accept": mt.ACCEPT},
            limit=MAX_MANIFEST_BYTES,
            deadline=deadline,
            optional=optional,
            capability=capability,
        )
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatch(f"image {r}: manifest {reference} has digest {digest}")
        return data, _manifest_media_type(r, data, content_type), digest

    async def fetch_referrers(
        self,
        ref: str | Reference,
        manifest_digest: str,
        artifact_type: str,
        *,
        deadline: float | None = None,
    ) -> bytes | None:
        """The OCI referrers listing (an image index) of ``manifest_digest`` filtered by
        ``artifact_type``; None when the registry has no referrers API or nothing there."""
        r = parse_reference(ref)
        path = f"/v2/{r.repository}/referrers/{manifest_digest}?artifactType={artifact_type}"
        try:
            body, content_type = await self._pull_body(
                r,
                f"referrers of {manifest_digest}",
                path,
                headers={"Accept": mt.OCI_INDEX},
                limit=1 << 20,
                deadline=deadline,
                optional=True,
            )
        except NotFound:
            return None
        return body if content_type.startswith(mt.OCI_INDEX) else None

    async def fetch_blob(
        self,
        ref: str | Reference,
        digest: str,
        *,
        size: int | None = None,
        deadline: float | None = None,
    ) -> bytes:
        """A whole (small) blob, verified against its digest and, if given, its size."""
        r = parse_reference(ref)
        hasher = _hasher(r, digest)
        data, _ = await self._pull_body(
            r, f"blob {digest}", _blob_path(r, digest), deadline=deadline, digest=digest
        )
        hasher.update(data)
        _verify(r, digest, size, len(data), hasher.hexdigest())
        return data

    async def open_blob(
        self,
        ref: str | Reference,
        digest: str,
        *,
        size: int | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream a whole blob in chunks, verified at the end (digest, size).

        ``deadline`` bounds getting the stream going; then a stall longer than the first-byte
        timeout breaks it, and a broken stream resumes with a Range request from the bytes
        already delivered (each resume under a fresh operation deadline; it gives up after
        ``attempts`` breaks with less than 1 MiB between them), so callers see one
        uninterrupted stream.
        """
        r = parse_reference(ref)
        hasher = _hasher(r, digest)
        received = failures = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else {}
            resp = await self._blob_response(
                r, digest, headers, (200, 206), stream=True, deadline=deadline
            )
            deadline, resumed_at = None, received
            try:
                skip = received if resp.status == 200 else 0
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if skip:
                        cut, skip = min(skip, len(chunk)), skip - min(skip, len(chunk))
                        chunk = chunk[cut:]
                        if not chunk:
                            continue
                    hasher.update(chunk)
                    received += len(chunk)
                    if received - resumed_at >= CHUNK:
                        failures = 0  # a stream that moves on may break now and then
                    self.stats["bytes"] += len(chunk)
                    yield chunk
                break
            except TRANSIENT as exc:
                failures += 1
                if failures >= self.policy.attempts:
                    raise Unavailable(
                        f"image {r}: blob {digest} stream broke {failures} times: {_why(exc)}"
                    ) from None
                await self._sleep(self.policy.backoff * 2 ** (failures - 1))
            finally:
                resp.release()
        _verify(r, digest, size, received, hasher.hexdigest())

    async def read_range(
        self,
        ref: str | Reference,
        digest: str,
        offset: int,
        length: int,
        *,
        deadline: float | None = None,
    ) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer only at the blob's end)."""
        r = parse_reference(ref)
        if offset < 0 or length < 0:
            raise InvalidArgument(f"image {r}: bad range {offset}+{length} of blob {digest}")
        if length == 0:
            return b""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        what = f"blob {digest} range {offset}+{length}"

        async def attempt(ep: HostEndpoint, dl: Deadline) -> bytes:
            resp = await self._blob_attempt(r, ep, dl, digest, headers, (200, 206), False, what)
            try:
                return await _range_body(r, what, resp, offset, length)
            except TRANSIENT as exc:
                raise Transient(f"{ep.host}: {_why(exc)}") from None
            finally:
                resp.release()

        return await self._operation(r, what, "pull", deadline, attempt)

    async def blob_exists(
        self, ref: str | Reference, digest: str, *, deadline: float | None = None
    ) -> bool:
        """Whether the repository has the blob (HEAD; 404 from every endpoint means no)."""
        r = parse_reference(ref)
        what = f"blob {digest}"

        async def attempt(ep: HostEndpoint, dl: Deadline) -> bool:
            resp = await self._request(r, what, ep, dl, "HEAD", _blob_path(r, digest), ok=(200,))
            resp.release()
            return True

        try:
            return await self._operation(r, what, "pull", deadline, attempt)
        except NotFound:
            return False

    # ------------------------------------------------------------ public API: push

    async def push_blob(
        self,
        ref: str | Reference,
        data: bytes | Path,
        digest: str | None = None,
        *,
        deadline: float | None = None,
    ) -> Descriptor:
        """Upload a blob (bytes or a file, sent monolithically) unless the registry has it."""
        r = parse_reference(ref)
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        digest = digest or _digest_of(data)
        what = f"blob {digest}"

        async def attempt(ep: HostEndpoint, dl: Deadline) -> None:
            path = _blob_path(r, digest)
            resp = await self._request(r, what, ep, dl, "HEAD", path, ok=(200, 404), push=True)
            resp.release()
            if resp.status != 200:
                await self._upload(r, ep, dl, data, digest, size)

        await self._operation(r, what, "push", deadline, attempt)
        return Descriptor("application/octet-stream", digest, size)

    async def push_manifest(
        self,
        ref: str | Reference,
        data: bytes,
        media_type: str,
        reference: str | None = None,
        *,
        deadline: float | None = None,
    ) -> str:
        """Put a manifest or index under ``reference`` (default: the ref's tag); its digest."""
        r = parse_reference(ref)
        reference = reference or r.reference
        what = f"manifest {reference}"
        path = f"/v2/{r.repository}/manifests/{reference}"

        async def attempt(ep: HostEndpoint, dl: Deadline) -> None:
            headers = {"Content-Type": media_type}
            resp = await self._request(
                r, what, ep, dl, "PUT", path, headers=headers, data=data, ok=(201,), push=True
            )
            resp.release()

        await self._operation(r, what, "push", deadline, attempt)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    async def _upload(
        self,
        r: Reference,
        ep: HostEndpoint,
        dl: Deadline,
        data: bytes | Path,
        digest: str,
        size: int,
    ) -> None:
        what = f"blob {digest}"
        path = f"/v2/{r.repository}/blobs/uploads/"
        resp = await self._request(r, what, ep, dl, "POST", path, ok=(202,), push=True)
        resp.release()
        location = resp.headers.get("Location")
        if not location:
            raise FailedPrecondition(f"image {r}: registry {ep.host} gave no upload location")
        url = resp.url.join(URL(location)).update_query({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        scope = f"repository:{r.repository}:pull,push"
        resp = await self._authorized(r, ep, dl, "PUT", url, scope, headers, data, False)
        resp.release()
        if resp.status in RETRY_STATUSES:
            raise Transient(f"{ep.host}: HTTP {resp.status}")
        if resp.status != 201:
            raise _status_error(r, what, ep, resp)

    # ------------------------------------------------------------ credentials

    def _credentials(self, r: Reference, ep: HostEndpoint) -> Credentials | None:
        """The image's own credentials (keychain), else the host's: containerd's
        ``registry.configs`` auth, then docker's config.json."""
        auth_key = ep.host if ep.mirror else r.registry
        if self.keychain is not None:
            found = self.keychain.credentials(r, auth_key)
            if found is not None:
                return found
        if auth_key not in self._creds:
            configured = self.hosts.credentials(ep.host) or self.hosts.credentials(auth_key)
            self._creds[auth_key] = configured or self._docker.credentials(auth_key)
        return self._creds[auth_key]

    # ------------------------------------------------------------ the one retry policy

    async def _operation(
        self,
        r: Reference,
        what: str,
        capability: str,
        deadline: float | None,
        attempt: Attempt[T],
        *,
        optional: bool = False,
    ) -> T:
        """Run ``attempt`` against the endpoints under one deadline (see module docstring).

        Within a round an endpoint that fails (transiently or with a definite answer such as
        404) hands over to the next at once; one that answered definitely is not asked again.
        The registry itself (the last endpoint) has the final word; a "not found" ends an
        ``optional`` lookup at once.
        """
        started = self.clock()
        dl = Deadline(self.deadline() if deadline is None else deadline, self.clock)
        endpoints = self.hosts.endpoints(r.registry, capability)
        if not endpoints:
            raise FailedPrecondition(f"image {r}: no host of {r.registry} may {capability}")
        if capability == "push":
            endpoints = endpoints[:1]
        answers: dict[HostEndpoint, ClipError] = {}
        reasons: dict[HostEndpoint, str] = {}
        rounds = 0

        async def round_() -> T:
            nonlocal rounds
            rounds += 1
            tried = False
            for ep in endpoints:
                if ep in answers:
                    continue
                breaker = self._breaker(ep)
                if dl.expired() or not breaker.allow():
                    if not dl.expired():
                        reasons[ep] = (
                            f"{ep.host} is failing, not asked for {breaker.retry_in():.0f}s more "
                            f"(last error: {breaker.last_error})"
                        )
                    continue
                tried = True
                try:
                    result = await attempt(ep, dl)
                except Transient as exc:
                    breaker.failure(str(exc))
                    reasons[ep] = str(exc)
                    log.debug("%s for %s from %s: %s", what, r, ep.host, exc)
                    continue
                except ClipError as exc:
                    breaker.success()
                    answers[ep] = exc
                    reasons.pop(ep, None)
                    continue
                except BaseException:
                    breaker.abandon()
                    raise
                breaker.success()
                return result
            return self._round_failed(r, what, endpoints, answers, reasons, tried, optional)

        try:
            return await retrying(round_, self.policy, dl, self._sleep, self._count_retry)
        except Transient:
            elapsed, budget = self.clock() - started, dl.at - started
            answered = [f"{ep.host}: {type(a).__name__}" for ep, a in answers.items()]
            why = "; ".join([*reasons.values(), *answered]) or "deadline passed"
            raise Unavailable(
                f"image {r}: {what} failed after {rounds} attempts in {elapsed:.1f}s "
                f"(deadline {budget:.1f}s): {why}"
            ) from None

    def _round_failed(
        self,
        r: Reference,
        what: str,
        endpoints: list[HostEndpoint],
        answers: Mapping[HostEndpoint, ClipError],
        reasons: Mapping[HostEndpoint, str],
        tried: bool,
        optional: bool,
    ) -> NoReturn:
        """Nothing succeeded in this round: the final answer, or Transient for another."""
        if endpoints[-1] in answers:
            raise answers[endpoints[-1]]
        if len(answers) == len(endpoints):
            raise next(iter(answers.values()))
        not_found = [a for a in answers.values() if isinstance(a, NotFound)]
        if optional and not_found:
            raise not_found[0]
        if not tried:
            why = "; ".join(reasons.values()) or "no time left before the deadline"
            raise Unavailable(f"image {r}: {what}: {why}")
        raise Transient("; ".join(reasons.values()))

    def _count_retry(self) -> None:
        self.stats["retries"] += 1

    def _breaker(self, ep: HostEndpoint) -> CircuitBreaker:
        key = f"{ep.scheme}://{ep.host}"
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = CircuitBreaker(
                self.policy.failure_threshold,
                self.policy.cooldown,
                on_change=lambda state: log.info("registry host %s: circuit %s", key, state),
                clock=self.clock,
            )
            self._breakers[key] = breaker
        return breaker

    # ------------------------------------------------------------ requests

    async def _pull_body(
        self,
        r: Reference,
        what: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        limit: int | None = None,
        deadline: float | None = None,
        optional: bool = False,
        capability: str = "pull",
        digest: str | None = None,
    ) -> tuple[bytes, str]:
        """GET a whole body (and its Content-Type) under one operation."""

        async def attempt(ep: HostEndpoint, dl: Deadline) -> tuple[bytes, str]:
            if digest is not None:
                resp = await self._blob_attempt(
                    r, ep, dl, digest, headers or {}, (200,), False, what
                )
            else:
                resp = await self._request(r, what, ep, dl, "GET", path, headers=headers)
            try:
                if limit is not None and (resp.content_length or 0) > limit:
                    raise InvalidArgument(f"image {r}: {what} is larger than {limit} bytes")
                data = await resp.read()
            except TRANSIENT as exc:
                raise Transient(f"{ep.host}: {_why(exc)}") from None
            finally:
                resp.release()
            self.stats["bytes"] += len(data)
            return data, resp.headers.get("Content-Type", "")

        return await self._operation(r, what, capability, deadline, attempt, optional=optional)

    async def _blob_response(
        self,
        r: Reference,
        digest: str,
        headers: dict[str, str],
        ok: tuple[int, ...],
        *,
        stream: bool,
        deadline: float | None,
    ) -> aiohttp.ClientResponse:
        what = f"blob {digest}"

        async def attempt(ep: HostEndpoint, dl: Deadline) -> aiohttp.ClientResponse:
            return await self._blob_attempt(r, ep, dl, digest, headers, ok, stream, what)

        return await self._operation(r, what, "pull", deadline, attempt)

    async def _blob_attempt(
        self,
        r: Reference,
        ep: HostEndpoint,
        dl: Deadline,
        digest: str,
        headers: dict[str, str],
        ok: tuple[int, ...],
        stream: bool,
        what: str,
    ) -> aiohttp.ClientResponse:
        """A blob GET: straight to the remembered storage URL while it is valid, else through
        the registry (remembering where it redirects to)."""
        key = (ep.api, r.repository, digest)
        cached = self._redirects.get(key)
        if cached is not None and self.clock() < cached.until:
            resp = await self._direct(cached.url, headers, dl, stream)
            if resp is not None and resp.status in ok:
                self.stats["redirect_hits"] += 1
                return resp
            if resp is not None:
                resp.release()
        self._redirects.pop(key, None)
        return await self._request(
            r, what, ep, dl, "GET", _blob_path(r, digest), headers=headers, ok=ok, stream=stream,
            remember=key,
        )  # fmt: skip

    async def _direct(
        self, url: URL, headers: dict[str, str], dl: Deadline, stream: bool
    ) -> aiohttp.ClientResponse | None:
        """One request to a remembered storage URL; None when it cannot be reached."""
        timeout = self.policy.request_timeout(dl.remaining(), stream=stream)
        self.stats["requests"] += 1
        try:
            return await self._get_session().get(
                url, headers=headers, allow_redirects=False, timeout=timeout
            )
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError):
            return None

    async def _request(
        self,
        r: Reference,
        what: str,
        ep: HostEndpoint,
        dl: Deadline,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        data: Body = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
        push: bool = False,
        remember: tuple[str, str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """One request to one endpoint: auth and redirects; a response in ``ok``, a typed
        error for a definite answer, or Transient."""
        scope = f"repository:{r.repository}:pull" + (",push" if push else "")
        url = _endpoint_url(ep, r, path)
        resp = await self._authorized(
            r, ep, dl, method, url, scope, headers, data, stream, remember
        )
        if resp.status in ok:
            return resp
        resp.release()
        if resp.status in RETRY_STATUSES:
            raise Transient(f"{ep.host}: HTTP {resp.status}")
        raise _status_error(r, what, ep, resp)

    async def _authorized(
        self,
        r: Reference,
        ep: HostEndpoint,
        dl: Deadline,
        method: str,
        url: URL,
        scope: str,
        headers: dict[str, str] | None,
        data: Body,
        stream: bool,
        remember: tuple[str, str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send with cached auth; on a 401 challenge obtain auth once and send again."""
        used = self._auth_header(r, ep, scope)
        resp = await self._send(r, ep, dl, method, url, scope, headers, data, stream, remember)
        if resp.status != 401:
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        resp.release()
        if not await self._authorize(r, ep, dl, challenge, scope, used):
            return resp
        return await self._send(r, ep, dl, method, url, scope, headers, data, stream, remember)

    async def _send(
        self,
        r: Reference,
        ep: HostEndpoint,
        dl: Deadline,
        method: str,
        url: URL,
        scope: str,
        headers: dict[str, str] | None,
        data: Body,
        stream: bool,
        remember: tuple[str, str, str] | None,
    ) -> aiohttp.ClientResponse:
        """Send and follow redirects; Authorization and the host's configured headers are
        dropped when the origin changes; a blob's final storage URL is remembered."""
        hdrs = dict(ep.headers)
        hdrs.update(headers or {})
        auth = self._auth_header(r, ep, scope)
        if auth:
            hdrs["Authorization"] = auth
        origin = url.origin()
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            same = current.origin() == origin
            resp = await self._send_once(r, ep, dl, method, current, hdrs, data, stream, same)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                if remember is not None and current.origin() != origin and resp.status < 300:
                    self._remember(remember, current)
                return resp
            resp.release()
            current = current.join(URL(location, encoded=True))
            if current.origin() != origin:
                hdrs = {k: v for k, v in (headers or {}).items()}
            if resp.status == 303:
                method, data = "GET", None
        raise Transient(f"{ep.host}: more than {MAX_REDIRECTS} redirects")

    def _remember(self, key: tuple[str, str, str], url: URL) -> None:
        """Keep a blob's storage URL until its stated expiry (minus a margin) or the TTL."""
        ttl = self.policy.redirect_ttl
        expires = redirect_expiry(url)
        if expires is not None:
            ttl = expires - self._wall() - REDIRECT_MARGIN
        if ttl > 0:
            self._redirects[key] = _Redirect(url, self.clock() + ttl)

    async def _send_once(
        self,
        r: Reference,
        ep: HostEndpoint,
        dl: Deadline,
        method: str,
        url: URL,
        headers: dict[str, str],
        data: Body,
        stream: bool,
        same_origin: bool,
    ) -> aiohttp.ClientResponse:
        if dl.expired():
            raise Transient(f"{ep.host}: deadline passed")
        timeout = self.policy.request_timeout(dl.remaining(), stream=stream)
        try:
            tls = self._ssl_for(ep) if same_origin else True
        except InvalidArgument as exc:
            raise InvalidArgument(f"image {r}: {exc}") from None
        self.stats["requests"] += 1
        session = self._get_session()
        try:
            if isinstance(data, Path):
                with data.open("rb") as fh:
                    return await session.request(
                        method, url, headers=headers, data=fh, allow_redirects=False,
                        timeout=timeout, ssl=tls,
                    )  # fmt: skip
            return await session.request(
                method, url, headers=headers, data=data, allow_redirects=False,
                timeout=timeout, ssl=tls,
            )  # fmt: skip
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise Unavailable(
                f"image {r}: TLS error talking to {url.raw_authority}: {_tls_why(exc)}"
            ) from None
        except TRANSIENT as exc:
            raise Transient(f"{url.raw_authority}: {_why(exc)}") from None

    def _ssl_for(self, ep: HostEndpoint) -> ssl.SSLContext | bool:
        """The endpoint's TLS settings (CA files, client certificates, skip_verify), built once."""
        found = self._ssl.get(ep)
        if found is None:
            found = self._ssl[ep] = ep.ssl_context()
        return found

    def _auth_header(self, r: Reference, ep: HostEndpoint, scope: str) -> str | None:
        key = (ep.host if ep.mirror else r.registry, scope)
        return self._basic.get(key) or self._tokens.get(key)

    async def _authorize(
        self,
        r: Reference,
        ep: HostEndpoint,
        dl: Deadline,
        challenge: Challenge,
        scope: str,
        used: str | None,
    ) -> bool:
        """Act on a 401 challenge: remember basic credentials or fetch a bearer token.

        Concurrent requests that hit the same challenge (many range reads at once on a cold
        client) share one token request: whoever gets the lock second finds a token newer than
        the one it was refused with and just retries.
        """
        creds = self._credentials(r, ep)
        key = (ep.host if ep.mirror else r.registry, scope)
        if creds is not None and creds.registry_token:  # a bearer token to send as it is
            bearer = f"Bearer {creds.registry_token}"
            self._tokens[key] = bearer
            return bearer != used
        if challenge.scheme == "basic":
            if creds is None or creds.basic_header() == used:
                return False
            self._basic[key] = creds.basic_header()
            return True
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return False
        async with self._token_locks.setdefault(key, asyncio.Lock()):
            if self._tokens.get(key) not in (None, used):
                return True
            token = await self._fetch_token(r, dl, challenge, scope, creds)
            self._tokens[key] = f"Bearer {token}"
        return True

    async def _fetch_token(
        self,
        r: Reference,
        dl: Deadline,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
    ) -> str:
        params = challenge.params
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or scope
        timeout = self.policy.request_timeout(dl.remaining(), stream=False)
        session = self._get_session()
        try:
            if creds is not None and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "clip",
                    **query,
                }
                resp = await session.post(params["realm"], data=form, timeout=timeout)
            else:
                headers = {"Authorization": creds.basic_header()} if creds else {}
                resp = await session.get(
                    params["realm"], params=query, headers=headers, timeout=timeout
                )
            async with resp:
                if resp.status in (401, 403):
                    raise AccessDenied(
                        f"image {r}: access denied by token server {URL(params['realm']).host} "
                        f"(HTTP {resp.status}) for {query['scope']}"
                    )
                if resp.status in RETRY_STATUSES:
                    raise Transient(f"token server HTTP {resp.status}")
                if resp.status != 200:
                    raise FailedPrecondition(f"image {r}: token server answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise Unavailable(
                f"image {r}: TLS error talking to token server: {_why(exc)}"
            ) from None
        except TRANSIENT as exc:
            raise Transient(f"token server: {_why(exc)}") from None
        except ValueError:
            raise FailedPrecondition(f"image {r}: token server sent invalid JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise FailedPrecondition(f"image {r}: token server sent no token")
        return token


def _tuned(
    policy: RetryPolicy, timeout: float | None, retries: int | None, backoff: float | None
) -> RetryPolicy:
    """The policy with the constructor's older knobs applied (when given)."""
    changes: dict[str, Any] = {}
    if timeout is not None:
        changes["response_timeout"] = timeout
        changes["connect_timeout"] = min(policy.connect_timeout, timeout)
    if retries is not None:
        changes["attempts"] = max(0, retries) + 1
    if backoff is not None:
        changes["backoff"] = backoff
    return RetryPolicy(**{**policy.__dict__, **changes})


def _blob_path(r: Reference, digest: str) -> str:
    return f"/v2/{r.repository}/blobs/{digest}"


def _endpoint_url(ep: HostEndpoint, r: Reference, path: str) -> URL:
    """``path`` (written ``/v2/...``) under the endpoint's API root; a mirror also gets
    ``ns=<registry>``, as containerd sends it."""
    rest = path[3:] if path.startswith("/v2/") else path
    url = URL(ep.api + rest, encoded=True)
    return url.update_query(ns=r.registry) if ep.mirror else url


def redirect_expiry(url: URL) -> float | None:
    """The wall-clock time a signed storage URL stops working, when the URL says so:
    S3 (``X-Amz-Date`` + ``X-Amz-Expires``), GCS (``X-Goog-Date`` + ``X-Goog-Expires``),
    CloudFront and GCS v2 (``Expires``, epoch seconds), Azure SAS (``se``, ISO time)."""
    q = {k.lower(): v for k, v in url.query.items()}
    for prefix in ("x-amz-", "x-goog-"):
        date, expires = q.get(prefix + "date"), q.get(prefix + "expires")
        if date and expires and expires.isdigit():
            try:
                start = datetime.datetime.strptime(date, "%Y%m%dT%H%M%SZ")
            except ValueError:
                continue
            return start.replace(tzinfo=datetime.UTC).timestamp() + int(expires)
    if q.get("expires", "").isdigit():
        return float(q["expires"])
    if q.get("se"):
        try:
            when = datetime.datetime.fromisoformat(q["se"].replace("Z", "+00:00"))
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    return None


# ---------------------------------------------------------------- helpers


def _why(exc: BaseException) -> str:
    """A short reason for a message (aiohttp's own texts mention internals like ssl:default)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return str(exc) or type(exc).__name__


def _tls_why(exc: BaseException) -> str:
    """The SSL library's reason, with a hint for the common https-to-plain-http mistake."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    reason = getattr(cause, "reason", None) or str(cause)
    detail = getattr(cause, "verify_message", None)
    if detail:
        return f"{reason}: {detail}"
    if "WRONG_VERSION_NUMBER" in str(reason):
        return f"{reason} (does it speak plain HTTP? then set plain_http for this host)"
    return str(reason)


def _status_error(
    r: Reference, what: str, ep: HostEndpoint, resp: aiohttp.ClientResponse
) -> ClipError:
    status, host = resp.status, ep.host
    if status in (401, 403):
        return AccessDenied(
            f"image {r}: access denied by {host} (HTTP {status}) for {what}; check the "
            "credentials in docker's config.json, or whether the repository exists"
        )
    if status == 404:
        return NotFound(f"image {r}: {what} not found on {host}")
    if status == 416:
        return InvalidArgument(f"image {r}: {what} is outside the blob (HTTP 416)")
    return FailedPrecondition(f"image {r}: {what}: {host} answered HTTP {status} {resp.reason}")


def _hasher(r: Reference, digest: str) -> Any:
    """A hashlib object for the digest's algorithm (sha256, sha384 or sha512)."""
    algo = digest.split(":", 1)[0]
    if algo not in ("sha256", "sha384", "sha512"):
        raise InvalidArgument(f"image {r}: unsupported digest algorithm in {digest}")
    return hashlib.new(algo)


def _verify(r: Reference, digest: str, size: int | None, got_size: int, got_hex: str) -> None:
    if size is not None and got_size != size:
        raise DigestMismatch(
            f"image {r}: blob {digest} is {got_size} bytes, the manifest says {size}"
        )
    if got_hex != digest.split(":", 1)[1]:
        algo = digest.split(":", 1)[0]
        raise DigestMismatch(
            f"image {r}: blob {digest} does not match its content ({algo}:{got_hex})"
        )


def _digest_of(data: bytes | Path) -> str:
    if isinstance(data, bytes):
        return "sha256:" + hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with data.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


async def _range_body(
    r: Reference, what: str, resp: aiohttp.ClientResponse, offset: int, length: int
) -> bytes:
    """The asked bytes from a 206 (checked against Content-Range) or a whole-blob 200."""
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {offset}-"):
            raise FailedPrecondition(f"image {r}: {what}: registry sent range {content_range!r}")
        data = await resp.read()
        return data[:length]
    parts: list[bytes] = []
    skipped = taken = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        if skipped + len(chunk) <= offset:
            skipped += len(chunk)
            continue
        start = max(0, offset - skipped)
        skipped += start
        piece = chunk[start : start + length - taken]
        parts.append(piece)
        taken += len(piece)
        if taken >= length:
            break
    return b"".join(parts)


def _json_object(r: Reference, data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise InvalidArgument(f"image {r}: {what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"image {r}: {what} is not a JSON object")
    return obj


def _manifest_media_type(r: Reference, data: bytes, content_type: str) -> str:
    """The media type from the body (authoritative when present), else the header."""
    obj = _json_object(r, data, "manifest")
    media_type = obj.get("mediaType") or content_type.split(";", 1)[0].strip()
    if media_type in mt.DOCKER_SCHEMA1 or obj.get("schemaVersion") == 1:
        raise InvalidArgument(f"image {r}: Docker schema 1 manifests are not supported")
    if media_type not in mt.MANIFESTS | mt.INDEXES:
        if "manifests" in obj:
            return mt.OCI_INDEX
        if "layers" in obj and "config" in obj:
            return mt.OCI_MANIFEST
        raise InvalidArgument(f"image {r}: unsupported manifest media type {media_type!r}")
    return str(media_type)


def _select_platform(r: Reference, index: Any, want: Platform) -> Descriptor:
    """The first index entry for ``want``; NotFound listing what the index offers."""
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise InvalidArgument(f"image {r}: index has no manifests list")
    offered = []
    for i, entry in enumerate(entries):
        desc = Descriptor.from_json(entry, f"image {r}: index entry {i}")
        p = desc.platform or {}
        have = Platform.normalize(
            str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant", ""))
        )
        offered.append(str(have))
        if want.matches(have) and desc.media_type in mt.MANIFESTS | {""}:
            return desc
    raise NotFound(
        f"image {r}: no manifest for platform {want} (index offers {', '.join(offered) or 'none'})"
    )


def _check_config_platform(r: Reference, config_bytes: bytes, want: Platform) -> None:
    """For a single manifest, refuse a config built for another platform, as containerd does."""
    config = _json_object(r, config_bytes, "config")
    if "os" not in config or "architecture" not in config:
        return
    have = Platform.normalize(
        str(config["os"]), str(config["architecture"]), str(config.get("variant", ""))
    )
    if not want.matches(have):
        raise NotFound(f"image {r}: image is for platform {have}, not {want}")
