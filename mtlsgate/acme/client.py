"""
ACMEv2 (RFC 8555) on Twisted: treq for HTTP, C{acme.messages} and josepy for the protocol objects.

L{ACMEClient} speaks for one account key to one directory.  Every public method returns a
L{Deferred}; the polling waits use the reactor passed in, so a test can drive them with a Clock.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
from collections.abc import Coroutine
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import josepy as jose
from acme import challenges, jws, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from mtlsgate.reactors import IReactorTimeAndTCP
from mtlsgate.tls import pki

log = Logger(namespace="mtlsgate.acme")

T = TypeVar("T")

JOSE_JSON = "application/jose+json"
PEM_CHAIN = "application/pem-certificate-chain"
BAD_NONCE = "urn:ietf:params:acme:error:badNonce"
# RFC 8555 6.5: a badNonce answer is retried with the nonce it carries.  A healthy CA rejects a nonce
# rarely; 10 in a row means something else is wrong (pebble's tests reject 60 %: 0.6^10 is 0.6 %).
_MAX_NONCE_RETRIES = 10
#: The longest one HTTP exchange with the CA may take (certbot's default is 45 s).
REQUEST_TIMEOUT = 60.0

#: Well-known directories, usable by name in C{autocert.directory}.
DIRECTORY_PRESETS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}


class ACMEError(Exception):
    """The CA answered with a problem document (RFC 7807), or broke the protocol."""

    def __init__(self, message: str, problem: messages.Error | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.problem = problem
        self.status = status

    @property
    def type(self) -> str | None:
        return self.problem.typ if self.problem is not None else None

    @classmethod
    def from_problem(cls, what: str, problem: messages.Error, status: int | None = None) -> ACMEError:
        return cls(f"{what}: {describe_problem(problem)}", problem, status)


def describe_problem(problem: messages.Error) -> str:
    """C{type: detail}, with subproblems (one per identifier) appended."""
    text = f"{problem.typ}: {problem.detail or problem.title or 'no detail'}"
    for sub in problem.subproblems or ():
        who = f" ({sub.identifier.value})" if sub.identifier is not None else ""
        text += f"; {sub.typ}{who}: {sub.detail}"
    return text


def _deferred(f: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., defer.Deferred[T]]:
    """Run a coroutine method as a Deferred, so callers get Twisted's usual currency."""

    def wrapper(*args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return defer.Deferred.fromCoroutine(f(*args, **kwargs))

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


def jwk_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> tuple[jose.JWK, jose.JWASignature]:
    """The josepy key and signature algorithm for an account key (ES256 for P-256, RS256 for RSA)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithms = {"secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
        if key.curve.name not in algorithms:
            raise ACMEError(f"account key curve {key.curve.name} is not usable with ACME")
        return jose.JWKEC(key=key), algorithms[key.curve.name]
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise ACMEError(f"account key type {type(key).__name__} is not usable with ACME")


def retry_after(headers: Any, now: float, default: float) -> float:
    """Seconds to wait from a C{Retry-After} header (seconds or an HTTP date), else C{default}."""
    values = headers.getRawHeaders(b"retry-after") or []
    if not values:
        return default
    text = values[0].decode("ascii", "replace").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


class ACMEClient:
    """
    One account key, one ACME directory.

    @param http: a L{treq.client.HTTPClient} whose agent trusts the CA's HTTPS (see L{http_client}).
    @param poll_limit: the longest single wait while polling; C{Retry-After} is honoured up to it.
    @param request_timeout: the longest one HTTP exchange with the CA may take, connection, answer and
        body together; past it the exchange is cancelled and fails with L{ACMEError}, which the
        issuing service retries with its back-off (a hanging CA never stalls renewal).
    """

    def __init__(
        self, reactor: IReactorTime, http: Any, directory_url: str, account_key: Any,
        *, poll_interval: float = 1.0, poll_limit: float = 30.0, poll_timeout: float = 300.0, request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.http = http
        self.directory_url = directory_url
        self.key, self.alg = jwk_for(account_key)
        self.directory: messages.Directory | None = None
        self.account_url: str | None = None
        self.poll_interval = poll_interval
        self.poll_limit = poll_limit
        self.poll_timeout = poll_timeout
        self.request_timeout = request_timeout
        self._nonces: list[str] = []

    # --- transport ------------------------------------------------------------------------------

    async def _exchange(self, method: str, url: str, send: Callable[[], Any]) -> tuple[Any, bytes]:
        """
        One HTTP exchange (C{send()} gives the response Deferred), its body read too, bounded by
        C{request_timeout}: a CA that accepts and never answers, or never finishes a body, is given up.
        """

        async def whole() -> tuple[Any, bytes]:
            response = await send()
            return response, await response.content()

        exchange = defer.Deferred.fromCoroutine(whole())
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            exchange.cancel()  # Agent reports a cancelled request as ResponseNeverReceived, hence the flag

        timer = self.reactor.callLater(self.request_timeout, give_up)
        try:
            return await exchange
        except Exception:
            if timed_out:
                raise ACMEError(f"{method} {url}: no answer from the CA within {self.request_timeout:g}s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _directory(self) -> messages.Directory:
        if self.directory is None:
            response, body = await self._exchange("GET", self.directory_url, lambda: self.http.get(self.directory_url, headers={"Accept": "application/json"}))
            if response.code != 200:
                raise ACMEError(f"directory {self.directory_url}: HTTP {response.code}", status=response.code)
            try:
                self.directory = messages.Directory.from_json(json.loads(body))
            except (ValueError, jose.DeserializationError) as e:
                raise ACMEError(f"directory {self.directory_url}: not an ACME directory ({e})") from None
        return self.directory

    def _keep_nonce(self, response: Any) -> None:
        nonce = response.headers.getRawHeaders(b"replay-nonce")
        if nonce:
            self._nonces.append(nonce[0].decode("ascii"))

    async def _nonce(self) -> str:
        if not self._nonces:
            directory = await self._directory()
            response, _ = await self._exchange("HEAD", directory["newNonce"], lambda: self.http.head(directory["newNonce"]))
            self._keep_nonce(response)
            if not self._nonces:
                raise ACMEError(f"newNonce {directory['newNonce']}: no Replay-Nonce header")
        return self._nonces.pop()

    async def _post(self, url: str, payload: jose.JSONDeSerializable | None, *, kid: bool = True, accept: str | None = None) -> tuple[Any, bytes]:
        """
        A signed POST (C{payload} None is POST-as-GET).  A badNonce answer is retried with the nonce
        the error carried, as RFC 8555 section 6.5 asks; other problems raise L{ACMEError}.
        """
        body = payload.json_dumps().encode() if payload is not None else b""
        for _ in range(_MAX_NONCE_RETRIES):
            nonce = await self._nonce()
            signed = jws.JWS.sign(
                body, key=self.key, alg=self.alg, nonce=jose.b64decode(nonce), url=url,
                kid=self.account_url if kid else None,
            )  # fmt: skip
            headers = {"Content-Type": JOSE_JSON}
            if accept:
                headers["Accept"] = accept
            data = signed.json_dumps().encode()
            response, content = await self._exchange("POST", url, lambda: self.http.post(url, data=data, headers=headers))
            self._keep_nonce(response)
            if response.code < 400:
                return response, content
            problem = _problem(content)
            if problem is not None and problem.typ == BAD_NONCE:
                log.debug("badNonce from {url}; retrying with a fresh nonce", url=url)
                continue
            if problem is None:
                raise ACMEError(f"POST {url}: HTTP {response.code}", status=response.code)
            raise ACMEError.from_problem(f"POST {url}", problem, response.code)
        raise ACMEError(f"POST {url}: the CA rejected {_MAX_NONCE_RETRIES} nonces in a row")

    async def _sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)

    # --- account --------------------------------------------------------------------------------

    @_deferred
    async def register(self, email: str | None = None, eab: tuple[str, str] | None = None) -> str:
        """
        Create the account for this key, or find it again (the CA answers 200 for a known key);
        agrees to the terms of service.  C{eab} is C{(key_id, base64url_mac_key)}.  Returns its URL.
        """
        directory = await self._directory()
        binding = None
        if eab is not None:
            key_id, mac_key = eab
            binding = messages.ExternalAccountBinding.from_data(self.key.public_key(), key_id, mac_key, directory)
        elif directory.meta.external_account_required:
            raise ACMEError(f"{self.directory_url} requires external account binding (autocert.eab: key_id, mac_key)")
        registration = messages.NewRegistration.from_data(
            email=email, terms_of_service_agreed=True, external_account_binding=binding,
        )  # fmt: skip
        response, _ = await self._post(directory["newAccount"], registration, kid=False)
        location = response.headers.getRawHeaders(b"location")
        if not location:
            raise ACMEError("newAccount: no Location header in the CA's answer")
        self.account_url = location[0].decode("ascii")
        return self.account_url

    # --- orders ---------------------------------------------------------------------------------

    @_deferred
    async def new_order(self, names: list[str], replaces: str | None = None) -> tuple[str, messages.Order]:
        """Order a certificate for C{names}; returns the order's URL and body."""
        directory = await self._directory()
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=name) for name in names]
        order: jose.JSONDeSerializable = messages.NewOrder(identifiers=identifiers)
        if replaces is not None:
            order = _Extended(order, "replaces", replaces)
        response, body = await self._post(directory["newOrder"], order)
        location = response.headers.getRawHeaders(b"location")
        if not location:
            raise ACMEError("newOrder: no Location header in the CA's answer")
        return location[0].decode("ascii"), messages.Order.from_json(json.loads(body))

    @_deferred
    async def authorization(self, url: str) -> messages.Authorization:
        _, body = await self._post(url, None)
        return messages.Authorization.from_json(json.loads(body))

    @_deferred
    async def answer(self, challenge: messages.ChallengeBody) -> None:
        """Tell the CA the challenge is ready to be validated (the empty object of RFC 8555 7.5.1)."""
        await self._post(challenge.uri, _EmptyObject())

    @_deferred
    async def wait_for_authorization(self, url: str) -> messages.Authorization:
        """Poll until the authorization is no longer pending; raise with the CA's detail if invalid."""
        authz = await self._poll(url, messages.Authorization, (messages.STATUS_PENDING,))
        if authz.status != messages.STATUS_VALID:
            name = authz.identifier.value if authz.identifier else url
            problems = [c.error for c in authz.challenges or () if c.error is not None]
            detail = "; ".join(describe_problem(p) for p in problems) or f"status {authz.status.name}"
            raise ACMEError(f"authorization for {name} failed: {detail}", problems[0] if problems else None)
        return authz

    @_deferred
    async def finalize(self, order_url: str, order: messages.Order, csr: x509.CertificateSigningRequest) -> messages.Order:
        """Send the CSR, then poll until the order is valid; returns the final order."""
        await self._post(order.finalize, messages.CertificateRequest(csr=csr))
        final = await self._poll(order_url, messages.Order, (messages.STATUS_PENDING, messages.STATUS_READY, messages.STATUS_PROCESSING))
        if final.status != messages.STATUS_VALID or not final.certificate:
            if final.error is not None:
                raise ACMEError.from_problem("order failed", final.error)
            raise ACMEError(f"order ended {final.status.name} without a certificate")
        return final

    @_deferred
    async def wait_until_ready(self, order_url: str) -> messages.Order:
        """Poll an order until its authorizations are done (status ready, or valid)."""
        order = await self._poll(order_url, messages.Order, (messages.STATUS_PENDING,))
        if order.status not in (messages.STATUS_READY, messages.STATUS_VALID):
            if order.error is not None:
                raise ACMEError.from_problem("order failed", order.error)
            raise ACMEError(f"order ended {order.status.name}")
        return order

    @_deferred
    async def certificate_chain(self, url: str) -> bytes:
        """The PEM chain (leaf first) from the order's certificate URL."""
        _, body = await self._post(url, None, accept=PEM_CHAIN)
        return body

    def offers_renewal_info(self) -> bool:
        """Whether the directory (once fetched) advertises ACME Renewal Information."""
        try:
            return self.directory is not None and bool(self.directory["renewalInfo"])
        except KeyError:
            return False

    @_deferred
    async def renewal_info(self, certificate: x509.Certificate) -> tuple[datetime, datetime] | None:
        """
        The CA's suggested renewal window (RFC 9773) for C{certificate}, or None when the CA offers
        no ARI or cannot say.
        """
        directory = await self._directory()
        try:
            base = directory["renewalInfo"]
        except KeyError:
            return None
        url = f"{base.rstrip('/')}/{ari_certificate_id(certificate)}"
        response, body = await self._exchange("GET", url, lambda: self.http.get(url, headers={"Accept": "application/json"}))
        if response.code != 200:
            log.info("renewal info {url}: HTTP {code}; using the configured renewal time", url=url, code=response.code)
            return None
        info = messages.RenewalInfo.from_json(json.loads(body))
        return info.suggested_window.start, info.suggested_window.end

    async def _poll(self, url: str, kind: Any, waiting: tuple[messages.Status, ...]) -> Any:
        waited = 0.0
        delay = self.poll_interval
        while True:
            response, body = await self._post(url, None)
            resource = kind.from_json(json.loads(body))
            if resource.status not in waiting:
                return resource
            if waited >= self.poll_timeout:
                raise ACMEError(f"{url}: still {resource.status.name} after {waited:.0f}s")
            pause = min(self.poll_limit, retry_after(response.headers, self.reactor.seconds(), delay))
            await self._sleep(pause)
            waited += pause
            delay = min(self.poll_limit, delay * 1.5)

    # --- challenges -----------------------------------------------------------------------------

    def key_authorization(self, token: str) -> str:
        """RFC 8555 section 8.1: the token and the account key's thumbprint."""
        return f"{token}.{jose.b64encode(self.key.thumbprint()).decode('ascii')}"


def challenge_type(challenge: messages.ChallengeBody) -> str:
    """The type of a challenge, also for types C{acme} no longer models (tls-alpn-01 in acme 5)."""
    chall = challenge.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("type"))
    return str(chall.typ)


def challenge_token(challenge: messages.ChallengeBody) -> str:
    chall = challenge.chall
    if isinstance(chall, challenges.UnrecognizedChallenge):
        return str(chall.jobj.get("token"))
    return chall.encode("token")


def dns01_txt_value(key_authorization: str) -> str:
    """RFC 8555 section 8.4: base64url(SHA-256(key authorization))."""
    return jose.b64encode(hashlib.sha256(key_authorization.encode("ascii")).digest()).decode("ascii")


def ari_certificate_id(certificate: x509.Certificate) -> str:
    """RFC 9773's CertID: base64url(AuthorityKeyIdentifier) "." base64url(serial DER bytes)."""
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    if aki is None:
        raise ValueError("the certificate's Authority Key Identifier has no key identifier: ARI cannot name it")
    serial = certificate.serial_number
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER: keep a leading 0 for the sign
    return f"{jose.b64encode(aki).decode()}.{jose.b64encode(serial_bytes).decode()}"


def renewal_time_in(window: tuple[datetime, datetime]) -> datetime:
    """A uniformly random moment in an ARI window, as RFC 9773 section 4.2 suggests."""
    start, end = window
    span = max(0.0, (end - start).total_seconds())
    return datetime.fromtimestamp(start.timestamp() + random.uniform(0, span), tz=timezone.utc)


class _EmptyObject(jose.JSONDeSerializable):
    """The payload C{{}} that answers a challenge."""

    def to_partial_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, jobj: Any) -> _EmptyObject:
        return cls()


class _Extended(jose.JSONDeSerializable):
    """A message with one extra top-level field (newOrder's C{replaces}, which acme lacks)."""

    def __init__(self, inner: jose.JSONDeSerializable, name: str, value: Any) -> None:
        self.inner, self.name, self.value = inner, name, value

    def to_partial_json(self) -> dict[str, Any]:
        data = dict(self.inner.to_partial_json())
        data[self.name] = self.value
        return data

    @classmethod
    def from_json(cls, jobj: Any) -> Any:
        raise NotImplementedError


def _problem(content: bytes) -> messages.Error | None:
    try:
        return messages.Error.from_json(json.loads(content))
    except (ValueError, jose.DeserializationError, TypeError):
        return None


def http_client(reactor: IReactorTimeAndTCP, ca_file: str | None, pool: HTTPConnectionPool) -> HTTPClient:
    """A treq client for the ACME server: the system's trust store, or only C{ca_file}'s CAs."""
    policy = BrowserLikePolicyForHTTPS()
    if ca_file is not None:
        roots = [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in pki.load_certificates(ca_file)]
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(roots))
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=30))
