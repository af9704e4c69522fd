"""The registry client: resolve images, read blobs (whole, streamed, by range), push.

One ``aiohttp.ClientSession`` carries every request so connections are reused. Each request
goes through the same steps: pick endpoints (mirrors first for pulls), authorize (cached bearer
token or basic credentials, obtained on the first 401 challenge), follow redirects by hand so the
``Authorization`` header never reaches another origin (blob storage behind a redirect has its own
signed URL), retry transient failures (connection errors, timeouts, 408/429/5xx) a bounded number
of times with exponential backoff, and map what is left to clip's typed errors with a message
naming the image. A call therefore finishes within about ``(retries + 1) * (timeout + backoff)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from snapshotter import __version__
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
from snapshotter.registry.reference import Reference, parse_reference
from snapshotter.registry.types import (
    Descriptor,
    Platform,
    RegistryHostConfig,
    ResolvedImage,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 8 << 20
CHUNK = 1 << 20
TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError)

Body = bytes | Path | None


@dataclass(frozen=True)
class _Endpoint:
    """Where to send requests for one registry: base URL and how to authenticate there."""

    base: str  # scheme://host[:port][/prefix]
    auth_key: str  # host name used for credential lookup
    mirror: bool
    skip_verify: bool

    @property
    def host(self) -> str:
        return URL(self.base).raw_authority


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, 5xx); carries the reason for the message."""


class RegistryClient:
    """Async client for OCI distribution registries (see module docstring)."""

    def __init__(
        self,
        hosts: Mapping[str, RegistryHostConfig] | None = None,
        docker_config: Path | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        session: aiohttp.ClientSession | None = None,
        *,
        backoff: float = 0.2,
        keychain: Keychain | None = None,
    ) -> None:
        self.hosts = dict(hosts or {})
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.stats: Counter[str] = Counter()
        self._docker = DockerConfig.load(docker_config)
        self.keychain = keychain
        self._session = session
        self._own_session = session is None
        self._creds: dict[str, Credentials | None] = {}
        self._tokens: dict[tuple[str, str], str] = {}
        self._basic: dict[tuple[str, str], str] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}

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

    # ------------------------------------------------------------ public API: pull

    async def resolve(self, ref: str | Reference, platform: str = "linux/amd64") -> ResolvedImage:
        """Manifest, config and layers of ``ref`` for ``platform`` (picked from an index)."""
        r = parse_reference(ref)
        want = Platform.parse(platform)
        data, media_type, digest = await self.fetch_manifest(r)
        index_bytes = index_digest = None
        if media_type in mt.INDEXES:
            index_bytes, index_digest = data, digest
            chosen = _select_platform(r, json.loads(data), want)
            data, media_type, digest = await self.fetch_manifest(r, chosen.digest)
            if media_type not in mt.MANIFESTS:
                raise InvalidArgument(f"image {r}: index entry {chosen.digest} is {media_type}")
        manifest = _json_object(r, data, "manifest")
        config = Descriptor.from_json(manifest.get("config"), f"image {r}: manifest config")
        layers = [
            Descriptor.from_json(d, f"image {r}: layer {i}")
            for i, d in enumerate(manifest.get("layers") or [])
        ]
        pinned = r.with_digest(digest)
        config_bytes = await self.fetch_blob(pinned, config.digest, size=config.size)
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
        self, ref: str | Reference, reference: str | None = None
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index; a digest reference is verified."""
        r = parse_reference(ref)
        reference = reference or r.reference
        what = f"manifest {reference}"
        path = f"/v2/{r.repository}/manifests/{reference}"
        data, content_type = await self._pull_body(
            r, what, path, headers={"Accept": mt.ACCEPT}, limit=MAX_MANIFEST_BYTES
        )
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatch(f"image {r}: manifest {reference} has digest {digest}")
        return data, _manifest_media_type(r, data, content_type), digest

    async def fetch_blob(
        self, ref: str | Reference, digest: str, *, size: int | None = None
    ) -> bytes:
        """A whole (small) blob, verified against its digest and, if given, its size."""
        r = parse_reference(ref)
        hasher = _hasher(r, digest)
        data, _ = await self._pull_body(r, f"blob {digest}", f"/v2/{r.repository}/blobs/{digest}")
        hasher.update(data)
        _verify(r, digest, size, len(data), hasher.hexdigest())
        return data

    async def open_blob(
        self, ref: str | Reference, digest: str, *, size: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream a whole blob in chunks, verified at the end (digest, size).

        A connection lost mid-stream resumes with a Range request from the bytes already
        delivered, within the retry budget, so callers see one uninterrupted stream.
        """
        r = parse_reference(ref)
        path = f"/v2/{r.repository}/blobs/{digest}"
        hasher = _hasher(r, digest)
        received = failures = 0
        while True:
            headers = {"Range": f"bytes={received}-"} if received else {}
            resp = await self._pull(
                r, f"blob {digest}", path, headers=headers, ok=(200, 206), stream=True
            )
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
                    self.stats["bytes"] += len(chunk)
                    yield chunk
                break
            except TRANSIENT as exc:
                failures += 1
                if failures > self.retries:
                    raise Unavailable(
                        f"image {r}: blob {digest} stream broke {failures} times: {_why(exc)}"
                    ) from None
                await asyncio.sleep(self._delay(failures))
            finally:
                resp.release()
        _verify(r, digest, size, received, hasher.hexdigest())

    async def read_range(
        self, ref: str | Reference, digest: str, offset: int, length: int
    ) -> bytes:
        """``length`` bytes of a blob from ``offset`` (fewer only at the blob's end)."""
        r = parse_reference(ref)
        if offset < 0 or length < 0:
            raise InvalidArgument(f"image {r}: bad range {offset}+{length} of blob {digest}")
        if length == 0:
            return b""
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        path = f"/v2/{r.repository}/blobs/{digest}"
        what = f"blob {digest} range {offset}+{length}"
        for attempt in range(self.retries + 1):
            resp = await self._pull(r, what, path, headers=headers, ok=(200, 206))
            try:
                return await _range_body(r, what, resp, offset, length)
            except TRANSIENT as exc:
                if attempt == self.retries:
                    raise Unavailable(f"image {r}: {what}: {_why(exc)}") from None
                await asyncio.sleep(self._delay(attempt + 1))
            finally:
                resp.release()
        raise AssertionError("unreachable")

    async def blob_exists(self, ref: str | Reference, digest: str) -> bool:
        """Whether the repository has the blob (HEAD; 404 means no)."""
        r = parse_reference(ref)
        path = f"/v2/{r.repository}/blobs/{digest}"
        resp = await self._pull(r, f"blob {digest}", path, method="HEAD", ok=(200, 404))
        resp.release()
        return resp.status == 200

    # ------------------------------------------------------------ public API: push

    async def push_blob(
        self, ref: str | Reference, data: bytes | Path, digest: str | None = None
    ) -> Descriptor:
        """Upload a blob (bytes or a file, sent monolithically) unless the registry has it."""
        r = parse_reference(ref)
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        digest = digest or _digest_of(data)
        ep = self._endpoints(r, push=True)[0]
        scope = f"repository:{r.repository}:pull,push"
        blob_url = f"{ep.base}/v2/{r.repository}/blobs/{digest}"
        resp = await self._request(r, f"blob {digest}", ep, "HEAD", blob_url, scope, ok=(200, 404))
        resp.release()
        if resp.status != 200:
            await self._upload(r, ep, scope, data, digest, size)
        return Descriptor("application/octet-stream", digest, size)

    async def push_manifest(
        self,
        ref: str | Reference,
        data: bytes,
        media_type: str,
        reference: str | None = None,
    ) -> str:
        """Put a manifest or index under ``reference`` (default: the ref's tag); its digest."""
        r = parse_reference(ref)
        reference = reference or r.reference
        ep = self._endpoints(r, push=True)[0]
        scope = f"repository:{r.repository}:pull,push"
        url = f"{ep.base}/v2/{r.repository}/manifests/{reference}"
        resp = await self._request(
            r,
            f"manifest {reference}",
            ep,
            "PUT",
            url,
            scope,
            headers={"Content-Type": media_type},
            data=data,
            ok=(201,),
        )
        resp.release()
        return "sha256:" + hashlib.sha256(data).hexdigest()

    async def _upload(
        self, r: Reference, ep: _Endpoint, scope: str, data: bytes | Path, digest: str, size: int
    ) -> None:
        start = f"{ep.base}/v2/{r.repository}/blobs/uploads/"
        what = f"blob {digest}"
        resp = await self._request(r, what, ep, "POST", start, scope, ok=(202,))
        resp.release()
        location = resp.headers.get("Location")
        if not location:
            raise FailedPrecondition(f"image {r}: registry {ep.host} gave no upload location")
        url = resp.url.join(URL(location)).update_query({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = await self._request(
            r, what, ep, "PUT", str(url), scope, headers=headers, data=data, ok=(201,)
        )
        resp.release()

    # ------------------------------------------------------------ endpoints and credentials

    def _host_config(self, host: str) -> RegistryHostConfig:
        return self.hosts.get(host) or RegistryHostConfig()

    def _endpoints(self, r: Reference, push: bool = False) -> list[_Endpoint]:
        cfg = self._host_config(r.registry)
        endpoints = [] if push else [self._mirror(m) for m in cfg.mirrors]
        scheme = "http" if cfg.plain_http else "https"
        endpoints.append(
            _Endpoint(f"{scheme}://{r.endpoint_host}", r.registry, False, cfg.skip_verify)
        )
        return endpoints

    def _mirror(self, mirror: str) -> _Endpoint:
        if "://" in mirror:
            url = URL(mirror.rstrip("/"))
            cfg = self._host_config(url.raw_authority)
            return _Endpoint(str(url), url.raw_authority, True, cfg.skip_verify)
        cfg = self._host_config(mirror)
        scheme = "http" if cfg.plain_http else "https"
        return _Endpoint(f"{scheme}://{mirror}", mirror, True, cfg.skip_verify)

    def _credentials(self, r: Reference, auth_key: str) -> Credentials | None:
        """The image's own credentials (keychain), else the host's (config, docker config)."""
        if self.keychain is not None:
            found = self.keychain.credentials(r, auth_key)
            if found is not None:
                return found
        if auth_key not in self._creds:
            configured = self._host_config(auth_key).auth
            self._creds[auth_key] = configured or self._docker.credentials(auth_key)
        return self._creds[auth_key]

    # ------------------------------------------------------------ request machinery

    async def _pull_body(
        self,
        r: Reference,
        what: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        limit: int | None = None,
    ) -> tuple[bytes, str]:
        """GET and read a whole body (and its Content-Type), retrying if the body breaks off."""
        for attempt in range(self.retries + 1):
            resp = await self._pull(r, what, path, headers=headers)
            try:
                if limit is not None and (resp.content_length or 0) > limit:
                    raise InvalidArgument(f"image {r}: {what} is larger than {limit} bytes")
                data = await resp.read()
                self.stats["bytes"] += len(data)
                return data, resp.headers.get("Content-Type", "")
            except TRANSIENT as exc:
                if attempt == self.retries:
                    raise Unavailable(f"image {r}: {what}: {_why(exc)}") from None
                await asyncio.sleep(self._delay(attempt + 1))
            finally:
                resp.release()
        raise AssertionError("unreachable")

    async def _pull(
        self,
        r: Reference,
        what: str,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
    ) -> aiohttp.ClientResponse:
        """A pull-side request: mirrors in order, then the registry; last error wins."""
        endpoints = self._endpoints(r)
        scope = f"repository:{r.repository}:pull"
        for i, ep in enumerate(endpoints):
            try:
                return await self._request(
                    r,
                    what,
                    ep,
                    method,
                    ep.base + path,
                    scope,
                    headers=headers,
                    ok=ok,
                    stream=stream,
                )
            except ClipError as exc:
                if i == len(endpoints) - 1:
                    raise
                log.warning("mirror %s failed for %s (%s); trying next", ep.host, r, exc)
        raise AssertionError("unreachable")

    async def _request(
        self,
        r: Reference,
        what: str,
        ep: _Endpoint,
        method: str,
        url: str,
        scope: str,
        *,
        headers: dict[str, str] | None = None,
        data: Body = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
    ) -> aiohttp.ClientResponse:
        """One logical request with auth, redirects and bounded retries; a response in ``ok``."""
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self._delay(attempt))
            try:
                resp = await self._authorized(r, ep, method, url, scope, headers, data, stream)
            except _Transient as exc:
                reason = str(exc)
                continue
            if resp.status in ok:
                return resp
            resp.release()
            if resp.status in RETRY_STATUSES:
                reason = f"HTTP {resp.status}"
                continue
            raise _status_error(r, what, ep, resp)
        raise Unavailable(
            f"image {r}: {what} from {ep.host} failed after {self.retries + 1} attempts: {reason}"
        )

    async def _authorized(
        self,
        r: Reference,
        ep: _Endpoint,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str] | None,
        data: Body,
        stream: bool,
    ) -> aiohttp.ClientResponse:
        """Send with cached auth; on a 401 challenge obtain auth once and send again."""
        used = self._auth_header(ep, scope)
        resp = await self._send(r, ep, method, url, scope, headers, data, stream)
        if resp.status != 401:
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        resp.release()
        if not await self._authorize(r, ep, challenge, scope, used):
            return resp
        return await self._send(r, ep, method, url, scope, headers, data, stream)

    async def _send(
        self,
        r: Reference,
        ep: _Endpoint,
        method: str,
        url: str,
        scope: str,
        headers: dict[str, str] | None,
        data: Body,
        stream: bool,
    ) -> aiohttp.ClientResponse:
        """Send and follow redirects; Authorization is dropped when the origin changes."""
        hdrs = dict(headers or {})
        auth = self._auth_header(ep, scope)
        if auth:
            hdrs["Authorization"] = auth
        origin = URL(url).origin()
        current = URL(url, encoded=True)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._send_once(r, ep, method, current, hdrs, data, stream, origin)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            current = current.join(URL(location, encoded=True))
            if current.origin() != origin:
                hdrs.pop("Authorization", None)
            if resp.status == 303:
                method, data = "GET", None
        raise _Transient(f"more than {MAX_REDIRECTS} redirects")

    async def _send_once(
        self,
        r: Reference,
        ep: _Endpoint,
        method: str,
        url: URL,
        headers: dict[str, str],
        data: Body,
        stream: bool,
        origin: URL,
    ) -> aiohttp.ClientResponse:
        if stream:
            timeout = aiohttp.ClientTimeout(sock_connect=self.timeout, sock_read=self.timeout)
        else:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
        verify = not (ep.skip_verify and url.origin() == origin)
        self.stats["requests"] += 1
        try:
            if isinstance(data, Path):
                with data.open("rb") as fh:
                    return await self._get_session().request(
                        method,
                        url,
                        headers=headers,
                        data=fh,
                        allow_redirects=False,
                        timeout=timeout,
                        ssl=verify,
                    )
            return await self._get_session().request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
                ssl=verify,
            )
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise Unavailable(
                f"image {r}: TLS error talking to {url.raw_authority}: {_tls_why(exc)}"
            ) from None
        except TRANSIENT as exc:
            raise _Transient(f"{url.raw_authority}: {_why(exc)}") from None

    def _auth_header(self, ep: _Endpoint, scope: str) -> str | None:
        return self._basic.get((ep.auth_key, scope)) or self._tokens.get((ep.auth_key, scope))

    async def _authorize(
        self, r: Reference, ep: _Endpoint, challenge: Challenge, scope: str, used: str | None
    ) -> bool:
        """Act on a 401 challenge: remember basic credentials or fetch a bearer token.

        Concurrent requests that hit the same challenge (many range reads at once on a cold
        client) share one token request: whoever gets the lock second finds a token newer than
        the one it was refused with and just retries.
        """
        creds = self._credentials(r, ep.auth_key)
        if creds is not None and creds.registry_token:  # a bearer token to send as it is
            bearer = f"Bearer {creds.registry_token}"
            self._tokens[(ep.auth_key, scope)] = bearer
            return bearer != used
        if challenge.scheme == "basic":
            if creds is None or creds.basic_header() == used:
                return False
            self._basic[(ep.auth_key, scope)] = creds.basic_header()
            return True
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return False
        key = (ep.auth_key, scope)
        async with self._token_locks.setdefault(key, asyncio.Lock()):
            if self._tokens.get(key) not in (None, used):
                return True
            token = await self._fetch_token(r, ep, challenge, scope, creds)
            self._tokens[key] = f"Bearer {token}"
        return True

    async def _fetch_token(
        self,
        r: Reference,
        ep: _Endpoint,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
    ) -> str:
        params = challenge.params
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or scope
        timeout = aiohttp.ClientTimeout(total=self.timeout)
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
                    raise _Transient(f"token server HTTP {resp.status}")
                if resp.status != 200:
                    raise FailedPrecondition(f"image {r}: token server answered HTTP {resp.status}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
            raise Unavailable(
                f"image {r}: TLS error talking to token server: {_why(exc)}"
            ) from None
        except TRANSIENT as exc:
            raise _Transient(f"token server: {_why(exc)}") from None
        except ValueError:
            raise FailedPrecondition(f"image {r}: token server sent invalid JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise FailedPrecondition(f"image {r}: token server sent no token")
        return token

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, capped so bounded retries stay bounded in time."""
        base: float = min(self.backoff * (2 ** (attempt - 1)), 5.0)
        return base * (0.5 + random.random() / 2)


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
    r: Reference, what: str, ep: _Endpoint, resp: aiohttp.ClientResponse
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
