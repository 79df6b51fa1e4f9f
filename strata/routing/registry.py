"""Routing policies by name, so configuration and the CLI can choose one with a string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from strata.routing.policies import (
    LeastKV,
    LeastRequests,
    LengthBucket,
    Policy,
    PrefixAffinity,
    RoundRobin,
)
from strata.routing.resource_match import ResourceMatch

DEFAULT_POLICY = "resource_match"

POLICIES: dict[str, Callable[..., Policy]] = {
    "resource_match": ResourceMatch,
    "round_robin": RoundRobin,
    "least_requests": LeastRequests,
    "least_kv": LeastKV,
    "prefix_affinity": PrefixAffinity,
    "length_bucket": LengthBucket,
}


def policy_names() -> list[str]:
    """Names accepted by make_policy, the default first."""
    return [DEFAULT_POLICY] + sorted(n for n in POLICIES if n != DEFAULT_POLICY)


def make_policy(name: str, **params: Any) -> Policy:
    """Build a policy from its name and keyword parameters (e.g. load_factor=1.5)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose one of {', '.join(policy_names())}"
        ) from None
    try:
        return factory(**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for routing policy {name!r}: {err}") from None
