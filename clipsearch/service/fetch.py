"""Images given as URLs, fetched only from an allow-list (off by default).

Each URL must match an allowed host or URL prefix; its host is resolved here, every address
is checked (private, loopback, link-local and other non-global addresses are refused unless
an allowed network holds them), and the connection goes to the checked address (with the
original Host header and TLS server name), so that a second DNS answer cannot point it
elsewhere. Redirects are followed by hand, each one checked the same way. The body is
capped while it streams, and the whole fetch has a deadline. Proxies from the environment
are ignored: they would connect where this module has not checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import httpx

from clipsearch.core.errors import ImageFetchFailed, PayloadTooLarge

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def is_url(item: str | bytes) -> bool:
    """An http(s) URL, not base64 (whose alphabet has no ':')."""
    return isinstance(item, str) and item[:8].lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class Allowed:
    """One allow-list entry: a host (`images.example.com`, `*.example.com`, `host:port`), or a
    URL prefix (`https://cdn.example.com/public/`), which also fixes the scheme and port."""

    host: str
    port: int | None = None
    scheme: str | None = None
    path: str = ""

    @classmethod
    def parse(cls, entry: str) -> Allowed:
        entry = entry.strip()
        if "://" not in entry:
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            return cls(host=host.lower(), port=int(port) if port else None)
        url = httpx.URL(entry)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"image URL prefix {entry!r}: expected http(s)://host[:port][/path]")
        return cls(host=url.host.lower(), port=_port(url), scheme=url.scheme, path=url.path.rstrip("/"))

    def matches(self, url: httpx.URL) -> bool:
        host = url.host.lower()
        if self.host.startswith("*."):
            if not host.endswith(self.host[1:]):
                return False
        elif host != self.host:
            return False
        if self.port is not None and _port(url) != self.port:
            return False
        if self.scheme is not None and url.scheme != self.scheme:
            return False
        return not self.path or url.path == self.path or url.path.startswith(self.path + "/")


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (RFC 2765)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # ::a.b.c.d (deprecated, still routed by some stacks)


def embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries: IPv4-mapped, IPv4-translated, IPv4-compatible,
    NAT64 (well-known and local-use prefixes), 6to4 and Teredo (server and client)."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _IPV4_TRANSLATED or any(address in net for net in _NAT64):
        found.append(low32)
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1
        found.append(low32)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def _path_problem(url: httpx.URL) -> str | None:
    """Why a URL's path cannot be compared with an allowed prefix as it will be sent: encoded
    slashes or backslashes, or dot segments (an origin that decodes and normalizes them would
    serve a path outside the prefix). Literal dot segments httpx has already removed."""
    raw = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw:
        return "an encoded slash or a backslash in the path"
    if any(urllib.parse.unquote(segment) in (".", "..") for segment in raw.split("/")):
        return "a dot segment in the path"
    return None


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


class ImageFetcher:
    """Fetches image URLs under the rules above; `enabled` is False with an empty allow-list."""

    def __init__(self, allowed: Sequence[str], networks: Sequence[str], *, max_bytes: int, timeout_s: float,
                 max_redirects: int = 3) -> None:
        self.allowed = [Allowed.parse(entry) for entry in allowed if entry.strip()]
        self.networks: list[Network] = [ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()]
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self._client: httpx.AsyncClient | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.allowed)

    async def resolve(self, items: Sequence[str | bytes], name: Callable[[int], str]) -> Sequence[str | bytes]:
        """`items` with each URL replaced by the bytes it names, fetched concurrently; errors
        name the item as `name(position)` does."""
        urls = [i for i, item in enumerate(items) if is_url(item)]
        if not urls:
            return items
        out = list(items)
        fetched = await asyncio.gather(*(self.fetch(str(items[i]), name(i)) for i in urls))
        for i, data in zip(urls, fetched, strict=True):
            out[i] = data
        return out

    async def fetch(self, url: str, name: str) -> bytes:
        """The body at `url`, or ImageFetchFailed / PayloadTooLarge naming `name`."""
        if not self.enabled:
            raise ImageFetchFailed(f"{name}: image URLs are not accepted here; send the image itself (base64 or "
                                   "a multipart upload), or allow its host with CLIPSEARCH_IMAGE_URLS", field=name)
        try:
            return await asyncio.wait_for(self._fetch(url, name), self.timeout_s)
        except asyncio.TimeoutError:
            raise ImageFetchFailed(f"{name}: fetching the image took longer than {self.timeout_s:g} s",
                                   field=name) from None

    async def _fetch(self, text: str, name: str) -> bytes:
        try:
            url = httpx.URL(text)
        except httpx.InvalidURL as exc:
            raise ImageFetchFailed(f"{name}: not a valid URL ({exc})", field=name) from None
        for _ in range(self.max_redirects + 1):
            address = await self._check(url, name)
            try:
                async with self._send(url, address) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = url.join(response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageFetchFailed(f"{name}: the image URL answered HTTP {response.status_code}",
                                               field=name)
                    return await self._read(response, name)
            except httpx.HTTPError as exc:
                raise ImageFetchFailed(f"{name}: could not fetch the image URL ({type(exc).__name__})",
                                       field=name) from None
        raise ImageFetchFailed(f"{name}: more than {self.max_redirects} redirects", field=name)

    async def _check(self, url: httpx.URL, name: str) -> Address:
        """The address to connect to, once the URL and every address its host has are allowed."""
        if url.scheme not in ("http", "https") or not url.host:
            raise ImageFetchFailed(f"{name}: only http and https image URLs are fetched", field=name)
        if url.userinfo:
            raise ImageFetchFailed(f"{name}: image URLs with credentials are not fetched", field=name)
        if problem := _path_problem(url):
            raise ImageFetchFailed(f"{name}: image URLs with {problem} are not fetched", field=name)
        if not any(entry.matches(url) for entry in self.allowed):
            raise ImageFetchFailed(f"{name}: {url.scheme}://{url.netloc.decode()} is not an allowed image source "
                                   "(CLIPSEARCH_IMAGE_URLS)", field=name)
        try:
            addresses = [ipaddress.ip_address(url.host)]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(url.host, _port(url), type=socket.SOCK_STREAM)
            except OSError:
                raise ImageFetchFailed(f"{name}: the image URL's host {url.host} does not resolve",
                                       field=name) from None
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            if refused := self._refused(address):
                raise ImageFetchFailed(f"{name}: the image URL's host {url.host} resolves to {refused}, a private or "
                                       "local address, which is not fetched (CLIPSEARCH_IMAGE_URL_NETWORKS allows "
                                       "such networks)", field=name)
        return addresses[0]

    def _allowed_network(self, address: Address) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def _refused(self, address: Address) -> Address | None:
        """The non-global address that `address` is, or the one an IPv6 address carries (each
        IPv4 address embedded in it is checked), unless an allowed network holds it; None if it
        may be fetched."""
        if self._allowed_network(address):
            return None
        carried: list[Address] = list(embedded_ipv4(address))
        for plain in carried or [address]:
            if not plain.is_global and not self._allowed_network(plain):
                return plain
        return None

    def _send(self, url: httpx.URL, address: Address) -> AbstractAsyncContextManager[httpx.Response]:
        """GET `url` from `address`: the checked address, with the URL's own Host header and,
        for https, its TLS server name (the certificate is checked against the host)."""
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                             timeout=httpx.Timeout(self.timeout_s),
                                             headers={"user-agent": "clipsearch-image-fetch"})
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return self._client.stream("GET", url.copy_with(host=str(address)), headers={"host": url.netloc.decode()},
                                   extensions=extensions)

    async def _read(self, response: httpx.Response, name: str) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"{name}: the image at the URL is larger than the limit of {self.max_bytes} bytes",
                                  field=name)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise PayloadTooLarge(f"{name}: the image at the URL is larger than the limit of {self.max_bytes} "
                                      "bytes", field=name)
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
