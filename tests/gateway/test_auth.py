from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from strata.gateway.auth import ApiKeys, KeyInfo


def test_plain_and_hashed_keys_verify_and_carry_limits(tmp_path: Path) -> None:
    hashed = hashlib.sha256(b"sk-second").hexdigest()
    f = tmp_path / "keys"
    f.write_text(f"# comment\nsk-first name=alice rpm=5 tpm=100\n\nsha256:{hashed}  # b\n")
    keys = ApiKeys.load(f)
    assert len(keys) == 2
    assert keys.verify("Bearer sk-first") == KeyInfo("alice", rpm=5, tpm=100)
    info = keys.verify("bearer   sk-second")
    assert info is not None and info.name == f"key-{hashed[:8]}" and info.rpm is None
    assert keys.verify("Bearer sk-third") is None
    assert keys.verify("Basic sk-first") is None
    assert keys.verify(None) is None
    assert keys.verify("Bearer ") is None


def test_env_keys_add_to_file_keys(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("sk-a name=a\n")
    keys = ApiKeys.load(f, env_value=" sk-b , sk-c ,")
    assert len(keys) == 3
    assert keys.verify("Bearer sk-c") is not None


def test_keys_are_stored_only_as_digests() -> None:
    keys = ApiKeys.parse("sk-very-secret-value name=x")
    assert "sk-very-secret-value" not in repr(vars(keys))
    assert b"sk-very-secret-value" not in b"".join(d for d, _ in keys._entries)


@pytest.mark.parametrize(("text", "match"), [
    ("sk-a colour=red", "unknown option"),
    ("sk-a rpm=ten", "rpm must be an integer"),
    ("sha256:abcd", "64 hex digits"),
    ("sk-a name=x\nsk-b name=x", "unique"),
])
def test_bad_key_files_fail_naming_the_line(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ApiKeys.parse(text)


def test_verify_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    keys = ApiKeys.parse("sk-hidden")
    with caplog.at_level(logging.DEBUG):
        keys.verify("Bearer sk-hidden")
        keys.verify("Bearer sk-wrong")
    assert "sk-" not in caplog.text


def test_a_source_without_keys_is_an_error_not_open_access(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=f"API key file {empty} holds no keys"):
        ApiKeys.load(empty)
    for value in (",", " , ,"):
        with pytest.raises(ValueError, match="STRATA_API_KEYS is set but holds no keys"):
            ApiKeys.load(None, env_value=value)
    assert len(ApiKeys.load(None, env_value="")) == 0  # unset: no authentication


def test_errors_never_echo_key_material() -> None:
    with pytest.raises(ValueError) as info:
        ApiKeys.parse("sk-first sk-second-secret\n")
    assert "sk-" not in str(info.value) and "line 1" in str(info.value)
    with pytest.raises(ValueError) as info:
        ApiKeys.parse("sk-a c2VjcmV0==\n")
    assert "c2Vj" not in str(info.value)
