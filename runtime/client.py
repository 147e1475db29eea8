"""Typed Python clients for a recship server: `RecshipClient` (inference) and `AdminClient`.

Queries are plain mappings from feature name to a raw value (text, an integer, a number, or a
list of one of those), as the data holds them: the server applies the bundle's transforms.
Item ids are the catalogue's, as text. Results come back as frozen dataclasses. gRPC errors
become the matching `RecshipError` (INVALID_ARGUMENT -> `InvalidInput`, NOT_FOUND ->
`NotFound`, UNAUTHENTICATED -> `Unauthenticated`, ...) carrying the server's message; a
server that cannot be reached (or that speaks TLS to a plaintext client) is `Unavailable`.

A server with several worker processes (`recship serve --workers N`) balances by connection:
`RecshipClient(target, channels=C)` opens C connections and spreads calls over them in turn;
the kernel hands each connection to one worker (a few per worker spread them well).

The admin API has its own listener (`recship serve --admin-port`, loopback by default) and
takes a bearer token: `AdminClient(target, token=...)`. Both clients take `ClientTLS` for TLS
and mTLS servers.

Example::

    with AdminClient("127.0.0.1:8501", token=token) as admin:
        admin.wait_until_serving(timeout=60)       # says why at once if every version FAILED
    with RecshipClient("127.0.0.1:8500") as client:
        response = client.recommend(
            "movies", [{"user_id": 196}], retrieve_k=100, top_n=10, exclude=[["242", "302"]]
        )
        for item in response.results[0]:
            print(item.item_id, item.rank_score)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recship.base import errors
from recship.base.errors import InvalidInput
from recship.protos.v1 import admin_pb2, admin_pb2_grpc, recommender_pb2, recommender_pb2_grpc
from recship.runtime.grpc_errors import STATUS_CODES
from recship.runtime.security import ClientTLS, bearer_metadata, open_channel

# A query's sparse features: name -> one id or several ids.
# A raw feature value: text, an integer, a number, or a list of one of those.
RawValue = str | int | float | Sequence[str] | Sequence[int] | Sequence[float]
# A query's features: raw values by feature name.
Features = Mapping[str, RawValue]

# The server's status table read backwards: a status code -> the error class it stands for.
_ERRORS: dict[grpc.StatusCode, type[errors.RecshipError]] = {
    code: error for error, code in STATUS_CODES.items()
}


@dataclass(frozen=True)
class Query:
    """One query: raw feature values by name (only the user key is enough for a stored user)."""

    features: Features


@dataclass(frozen=True)
class ServedBy:
    """The version that served a call."""

    bundle: str
    version: int
    release_id: str


@dataclass(frozen=True)
class RetrievedItem:
    item_id: str
    score: float


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    rank_score: float
    retrieval_score: float


@dataclass(frozen=True)
class RetrieveResponse:
    """`results[i]`: the candidates of query i, best first; `cold_start[i]`: its user key was
    unknown to the bundle (defaults stood in)."""

    served_by: ServedBy
    results: list[list[RetrievedItem]] = field(default_factory=list)
    cold_start: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class RankResponse:
    """`results[i]`: probabilities of query i's candidates, in request order."""

    served_by: ServedBy
    results: list[list[float]] = field(default_factory=list)
    cold_start: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class RecommendResponse:
    """`results[i]`: the recommendations of query i, best first."""

    served_by: ServedBy
    results: list[list[RecommendedItem]] = field(default_factory=list)
    cold_start: list[bool] = field(default_factory=list)


def value_proto(value: RawValue, message: recommender_pb2.Value) -> None:
    """Fills a wire `Value` from a Python value (bool and other types are refused)."""
    if isinstance(value, bool):
        raise InvalidInput(f"feature value {value!r}: send text, an integer or a number")
    if isinstance(value, str):
        message.string_value = value
    elif isinstance(value, int | np.integer):
        message.int_value = int(value)
    elif isinstance(value, float | np.floating):
        message.double_value = float(value)
    elif isinstance(value, Sequence | np.ndarray):
        items = list(value)
        lists = message.list_value
        lists.SetInParent()
        if all(isinstance(v, str) for v in items):
            lists.strings.extend(items)
        elif all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in items):
            lists.ints.extend(int(v) for v in items)
        elif all(isinstance(v, int | float | np.number) for v in items):
            lists.doubles.extend(float(v) for v in items)
        else:
            raise InvalidInput(f"feature value {value!r}: a list holds one kind of value")
    else:
        raise InvalidInput(f"feature value {value!r}: send text, an integer, a number or a list")


def query_proto(query: Query | Features) -> recommender_pb2.Query:
    """The wire form of a query given as a `Query` or as a features mapping."""
    features = query.features if isinstance(query, Query) else query
    message = recommender_pb2.Query()
    for name, value in features.items():
        value_proto(value, message.features[name])
    return message


def model_spec(
    bundle: str, version: int | None = None, label: str | None = None
) -> recommender_pb2.ModelSpec:
    """A `ModelSpec` naming a bundle and optionally one version or label."""
    spec = recommender_pb2.ModelSpec(bundle=bundle)
    if version is not None:
        spec.version = version
    if label is not None:
        spec.label = label
    return spec


def _served_by(message: recommender_pb2.ServedBy) -> ServedBy:
    return ServedBy(message.bundle, message.version, message.release_id)


def as_recship_error(error: grpc.RpcError) -> errors.RecshipError:
    """The `RecshipError` for a failed call, with the server's message."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details() or code.name  # type: ignore[attr-defined]
    return _ERRORS.get(code, errors.RecshipError)(f"{code.name}: {details}")


class _Client:
    """One blocking channel and the health service on it; thread-safe (gRPC channels are)."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        tls: ClientTLS | None,
        metadata: tuple[tuple[str, str], ...] = (),
        max_message_bytes: int = 64 << 20,
        channels: int = 1,
    ) -> None:
        if channels < 1:
            raise InvalidInput(f"channels must be >= 1, got {channels}")
        self.target = target
        self.timeout = timeout
        self._metadata = metadata
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", max_message_bytes)]
        if channels > 1:
            # Channels to one target share their connection unless each has its own pool.
            options.append(("grpc.use_local_subchannel_pool", 1))
        self.channels = [open_channel(target, tls, options) for _ in range(channels)]
        self.channel = self.channels[0]
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata or None,
            )
        except grpc.RpcError as error:
            raise as_recship_error(error) from None

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name ("SERVING", "NOT_SERVING", ...)."""
        response = self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _failures(self) -> list[str]:
        """Reasons the server will never serve (none known on the inference listener)."""
        return []

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Blocks until health is SERVING.

        Raises:
            Unavailable: not SERVING within `timeout` seconds, or (through the admin API) at
                once with the reasons when every version of a bundle has FAILED and none is
                still loading.
            Unauthenticated, PermissionDenied: the admin API refused the credentials.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.health(timeout=max(deadline - time.monotonic(), 0.1))
                failures = [] if state == "SERVING" else self._failures()
            except (errors.Unauthenticated, errors.PermissionDenied):
                raise
            except errors.RecshipError:
                state, failures = None, []
            if state == "SERVING":
                return
            if failures:
                raise errors.Unavailable(f"{self.target} will not serve: " + "; ".join(failures))
            if time.monotonic() >= deadline:
                raise errors.Unavailable(f"{self.target} is not SERVING after {timeout:.0f} s")
            time.sleep(0.05)


class RecshipClient(_Client):
    """A blocking client of the inference API (Retrieve, Rank, Recommend, health).

    Args:
        target: "host:port" of the inference listener.
        timeout: default per-call deadline in seconds (None: no deadline).
        tls: how to reach a TLS server (None: plaintext).
        max_message_bytes: largest response accepted.
        channels: connections to open; calls take them in turn (for a server with several
            worker processes, where each connection reaches one worker).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 30.0,
        tls: ClientTLS | None = None,
        max_message_bytes: int = 64 << 20,
        channels: int = 1,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            tls=tls,
            max_message_bytes=max_message_bytes,
            channels=channels,
        )
        self._stubs = [recommender_pb2_grpc.RecommenderStub(c) for c in self.channels]
        self._turn = itertools.count()

    @property
    def recommender(self) -> recommender_pb2_grpc.RecommenderStub:
        """The stub of the next channel in turn (thread-safe: `itertools.count` is atomic)."""
        return self._stubs[next(self._turn) % len(self._stubs)]

    def __enter__(self) -> RecshipClient:
        return self

    def retrieve(
        self,
        bundle: str,
        queries: Sequence[Query | Features],
        top_k: int,
        *,
        exclude: Sequence[Sequence[str]] | None = None,
        version: int | None = None,
        label: str | None = None,
        timeout: float | None = None,
    ) -> RetrieveResponse:
        """Top-k candidates per query, never `exclude[i]` for query i."""
        excluded = exclude if exclude is not None else [()] * len(queries)
        request = recommender_pb2.RetrieveRequest(
            model=model_spec(bundle, version, label),
            queries=[
                recommender_pb2.RetrieveQuery(
                    query=query_proto(q), exclude_item_ids=[str(i) for i in e]
                )
                for q, e in zip(queries, excluded, strict=True)
            ],
            top_k=top_k,
        )
        response = self._call(self.recommender.Retrieve, request, timeout)
        return RetrieveResponse(
            _served_by(response.served_by),
            [[RetrievedItem(i.item_id, i.score) for i in r.items] for r in response.results],
            [r.cold_start for r in response.results],
        )

    def rank(
        self,
        bundle: str,
        queries: Sequence[Query | Features],
        candidates: Sequence[Sequence[str]],
        *,
        version: int | None = None,
        label: str | None = None,
        timeout: float | None = None,
    ) -> RankResponse:
        """Probabilities of `candidates[i]` for query i."""
        request = recommender_pb2.RankRequest(
            model=model_spec(bundle, version, label),
            queries=[
                recommender_pb2.RankQuery(
                    query=query_proto(q), candidate_item_ids=[str(i) for i in c]
                )
                for q, c in zip(queries, candidates, strict=True)
            ],
        )
        response = self._call(self.recommender.Rank, request, timeout)
        return RankResponse(
            _served_by(response.served_by),
            [list(r.scores) for r in response.results],
            [r.cold_start for r in response.results],
        )

    def recommend(
        self,
        bundle: str,
        queries: Sequence[Query | Features],
        retrieve_k: int,
        top_n: int,
        *,
        exclude: Sequence[Sequence[str]] | None = None,
        version: int | None = None,
        label: str | None = None,
        timeout: float | None = None,
    ) -> RecommendResponse:
        """Retrieve `retrieve_k` candidates other than `exclude[i]`, rank them and return the best
        `top_n`; `retrieve_k` 0 uses the bundle's default."""
        excluded = exclude if exclude is not None else [()] * len(queries)
        request = recommender_pb2.RecommendRequest(
            model=model_spec(bundle, version, label),
            queries=[
                recommender_pb2.RecommendQuery(
                    query=query_proto(q), exclude_item_ids=[str(i) for i in e]
                )
                for q, e in zip(queries, excluded, strict=True)
            ],
            retrieve_k=retrieve_k,
            top_n=top_n,
        )
        response = self._call(self.recommender.Recommend, request, timeout)
        return RecommendResponse(
            _served_by(response.served_by),
            [
                [RecommendedItem(i.item_id, i.rank_score, i.retrieval_score) for i in r.items]
                for r in response.results
            ],
            [r.cold_start for r in response.results],
        )


class AdminClient(_Client):
    """A blocking client of the admin API (`BundleAdmin` and health on the admin listener).

    Args:
        target: "host:port" or "unix:/path" of the admin listener.
        token: the server's admin token, sent as `authorization: Bearer <token>` on every call
            (None for a server without one).
        timeout: default per-call deadline in seconds.
        tls: how to reach a TLS server (None: plaintext).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        tls: ClientTLS | None = None,
    ) -> None:
        super().__init__(target, timeout=timeout, tls=tls, metadata=bearer_metadata(token))
        self.admin = admin_pb2_grpc.BundleAdminStub(self.channel)

    def __enter__(self) -> AdminClient:
        return self

    def _failures(self) -> list[str]:
        """Why the server cannot become ready: every version of some bundle FAILED, none loading.

        Returns one "bundle vN: reason" per failed version of such bundles; empty while anything
        is still NEW or LOADING (or nothing is known yet).
        """
        failures = []
        for bundle in self.list_bundles(timeout=5).bundles:
            states = {status.state for status in bundle.versions}
            if states and states <= {admin_pb2.VERSION_STATE_FAILED}:
                failures += [
                    f"{bundle.name} v{status.version} FAILED: {status.failure_reason}"
                    for status in bundle.versions
                ]
        return failures

    def list_bundles(
        self, bundle: str = "", timeout: float | None = None
    ) -> admin_pb2.ListBundlesResponse:
        """The admin status listing (protobuf, as the admin API defines it)."""
        return self._call(
            self.admin.ListBundles, admin_pb2.ListBundlesRequest(bundle=bundle), timeout
        )

    def refresh_repository(
        self, timeout: float | None = None
    ) -> admin_pb2.RefreshRepositoryResponse:
        """Asks the server to re-read its repository now; returns once it has reconciled."""
        return self._call(
            self.admin.RefreshRepository, admin_pb2.RefreshRepositoryRequest(), timeout
        )

    def set_version_policy(
        self, bundle: str, policy: admin_pb2.VersionPolicy, timeout: float | None = None
    ) -> admin_pb2.BundleStatus:
        """Replaces a bundle's version policy; returns once the server has applied it.

        `recship.runtime.policy.policy_to_proto(parse_policy("pinned:3"))` builds `policy`.
        """
        request = admin_pb2.SetVersionPolicyRequest(bundle=bundle, policy=policy)
        return self._call(self.admin.SetVersionPolicy, request, timeout).bundle

    def load_version(
        self, bundle: str, version: int, timeout: float | None = None
    ) -> admin_pb2.VersionStatus:
        """Loads one version beside those loaded; returns its status (READY or FAILED)."""
        request = admin_pb2.LoadVersionRequest(bundle=bundle, version=version)
        return self._call(self.admin.LoadVersion, request, timeout).status

    def unload_version(
        self, bundle: str, version: int, timeout: float | None = None
    ) -> admin_pb2.VersionStatus:
        """Drains and unloads one version; returns its status."""
        request = admin_pb2.UnloadVersionRequest(bundle=bundle, version=version)
        return self._call(self.admin.UnloadVersion, request, timeout).status

    def set_label(
        self, bundle: str, label: str, version: int, timeout: float | None = None
    ) -> admin_pb2.BundleStatus:
        """Points `label` at a READY version (0 removes the label)."""
        request = admin_pb2.SetLabelRequest(bundle=bundle, label=label, version=version)
        return self._call(self.admin.SetLabel, request, timeout).bundle

    def bundle_status(self, bundle: str, timeout: float | None = None) -> admin_pb2.BundleStatus:
        """The admin status of one bundle."""
        return self.list_bundles(bundle, timeout).bundles[0]
