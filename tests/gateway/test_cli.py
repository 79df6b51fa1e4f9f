from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from strata.gateway.cli import app, parse_policy_params


def test_policy_params_are_typed() -> None:
    assert parse_policy_params(["load_factor=1.5", "key_chunks=3", "x=abc"]) == {
        "load_factor": 1.5, "key_chunks": 3, "x": "abc"}
    with pytest.raises(typer.BadParameter):
        parse_policy_params(["nonsense"])


@pytest.mark.parametrize(("args", "message"), [
    (["--policy", "nope"], "unknown routing policy"),
    (["--policy", "prefix_affinity", "--policy-param", "load_factor=0.5"], "load_factor"),
    (["--replica", "ftp://x"], "must look like http://host:port"),
    (["--bytes-per-token", "0"], "bytes_per_token"),
])
def test_bad_options_fail_before_serving(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code != 0
    flat = " ".join(result.output.replace("│", " ").split())
    assert message in flat


def test_replica_urls_are_normalized() -> None:
    from strata.gateway.replica_record import normalize_url

    assert normalize_url("127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert normalize_url(" https://h:1 ") == "https://h:1"


def test_api_keys_that_parse_to_nothing_stop_the_start() -> None:
    result = CliRunner().invoke(app, [], env={"COLUMNS": "400", "STRATA_API_KEYS": ","})
    assert result.exit_code != 0
    assert "STRATA_API_KEYS is set but holds no keys" in " ".join(
        result.output.replace("│", " ").split())
