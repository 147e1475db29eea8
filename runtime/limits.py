"""Per-request bounds of the inference API, owned here: the service enforces them and
`recship serve` exposes them as flags (this module stays light for the CLI to import)."""

from __future__ import annotations

from dataclasses import dataclass

from recship.bundle.manifest import DEFAULT_MAX_TOP_K


@dataclass(frozen=True)
class ServiceLimits:
    """Per-request bounds; beyond them a request is INVALID_ARGUMENT naming the field.

    Attributes:
        max_top_k: largest `top_k` / `retrieve_k`.
        max_queries: most queries in one request.
        max_candidates: most candidate ids of one Rank query.
        max_exclusions: most item ids one Retrieve or Recommend query may exclude.
        max_request_bytes: largest serialized request. The transport limit is set above it
            (see `recship.runtime.server`), so a request between the two is answered
            INVALID_ARGUMENT by this check rather than RESOURCE_EXHAUSTED by gRPC.
    """

    max_top_k: int = DEFAULT_MAX_TOP_K
    max_queries: int = 1024
    max_candidates: int = 4096
    max_exclusions: int = 1024
    max_request_bytes: int = 4 * 1024 * 1024
