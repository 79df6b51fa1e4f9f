"""positional_constructor builds the same objects as the dataclass's own __init__."""

from __future__ import annotations

import dataclasses

import pytest

from strata.load import LoadReport
from strata.routing.types import ReplicaState, RouteRequest
from strata.sim.frozen import positional_constructor


def test_load_report_and_router_state_equal_their_init() -> None:
    report = LoadReport("m", 3, 2, 100, 10, 100, 16, 128, 2048, 0.25, 1.5, 2.5, 0.02, 0.001,
                        True, False, "")
    made = positional_constructor(LoadReport)(*dataclasses.astuple(report))
    assert type(made) is LoadReport and made == report and made.kv_usage == report.kv_usage
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.running = 4  # type: ignore[misc]
    state = ReplicaState("u0", True, 3, 2, 1, 0.5, report, 1, 100, 0, 1.25, frozenset())
    fields = [getattr(state, f.name) for f in dataclasses.fields(ReplicaState)]
    assert positional_constructor(ReplicaState)(*fields) == state


def test_refuses_classes_whose_init_validates() -> None:
    with pytest.raises(TypeError, match="__post_init__"):
        positional_constructor(RouteRequest)


def test_names_the_field_order_its_callers_rely_on() -> None:
    names = " ".join(f.name for f in dataclasses.fields(LoadReport))
    assert positional_constructor(LoadReport, names) is not None
    swapped = names.replace("running waiting", "waiting running")
    with pytest.raises(TypeError, match="fields are"):
        positional_constructor(LoadReport, swapped)
