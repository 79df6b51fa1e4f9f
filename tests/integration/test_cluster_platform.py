"""The local platform with real processes: readiness, drain, crash restarts, no orphans.

Replicas here are ``fake_replica.py`` processes (the engine's control surface without a
model), so each start costs a fraction of a second; the engine itself is exercised by
test_cluster.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from strata.config import PlatformOptions
from strata.platform.local import LocalPlatform
from strata.platform.process import ProcessSpec

FAKE = Path(__file__).with_name("fake_replica.py")
FAST = PlatformOptions(health_interval_s=0.1, restart_backoff_s=0.5, restart_backoff_max_s=2,
                       stop_timeout_s=2, drain_timeout_s=10, start_timeout_s=20)


def fake_spec(*extra: str, threads: int = 1) -> ProcessSpec:
    return ProcessSpec(argv=lambda host, port: [sys.executable, str(FAKE), "--host", host,
                                                "--port", str(port), *extra], threads=threads)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[LocalPlatform]:
    p = LocalPlatform({"engine": fake_spec(threads=2)},
                      FAST.model_copy(update={"log_dir": tmp_path / "logs"}))
    try:
        yield p
    finally:
        await p.close()


async def test_scale_up_serves_only_ready_replicas_then_drains_on_scale_down(
        platform: LocalPlatform) -> None:
    await platform.scale("engine", 2)
    assert platform.desired("engine") == 2 and platform.endpoints("engine") == []
    await until(lambda: len(platform.endpoints("engine")) == 2, what="two ready replicas")
    urls = [e.url for e in platform.endpoints("engine")]
    assert len(set(urls)) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
    async with httpx.AsyncClient(timeout=30) as http:
        env = (await http.get(urls[0] + "/env")).json()
        assert env["OMP_NUM_THREADS"] == "2"
        pids = {r.replica_id: r.pid for r in platform.replicas("engine")}

        # A slow request on every replica, then scale to zero: both must finish first.
        slow = [asyncio.create_task(http.post(u + "/v1/completions", json={"sleep_s": 1.5}))
                for u in urls]
        await until(lambda: all(r.phase == "ready" for r in platform.replicas("engine")))
        await asyncio.sleep(0.3)
        await platform.scale("engine", 0)
        assert platform.endpoints("engine") == []  # out of traffic at once
        await until(lambda: any(r.phase == "draining" for r in platform.replicas("engine")),
                    what="draining")
        refused = await http.post(urls[0] + "/v1/completions", json={})
        assert refused.status_code == 503
        assert all(alive(pid) for pid in pids.values() if pid)  # still finishing
        done = await asyncio.gather(*slow)
        assert [r.status_code for r in done] == [200, 200]
    await until(lambda: platform.replicas("engine") == [], what="replicas gone")
    assert not any(alive(pid) for pid in pids.values() if pid)


async def test_a_drain_waits_for_the_specs_own_drained_check(tmp_path: Path) -> None:
    # A stage replica's /load is idle while the head still pins sequences to it: the
    # spec's `drained` check (the head's view) must hold the stop until it agrees.
    asked: list[str] = []
    done = asyncio.Event()

    async def drained(url: str) -> bool:
        asked.append(url)
        return done.is_set()

    spec = fake_spec()
    spec = ProcessSpec(argv=spec.argv, threads=1, drained=drained)
    platform = LocalPlatform({"stage": spec}, FAST.model_copy(update={"log_dir": tmp_path}))
    try:
        await platform.scale("stage", 1)
        await until(lambda: len(platform.endpoints("stage")) == 1, what="ready")
        [r] = platform.replicas("stage")
        await platform.scale("stage", 0)
        await until(lambda: len(asked) >= 3, what="the drained check asked")
        assert set(asked) == {r.url}
        assert [x.phase for x in platform.replicas("stage")] == ["draining"]
        assert r.pid is not None and alive(r.pid)
        done.set()
        await until(lambda: platform.replicas("stage") == [], what="stopped once drained")
        assert not alive(r.pid)
    finally:
        await platform.close()


async def test_crashes_restart_with_backoff_and_keep_their_identity(tmp_path: Path) -> None:
    crash = tmp_path / "crash-once"
    crash.touch()
    platform = LocalPlatform({"engine": fake_spec("--crash-file", str(crash))},
                             FAST.model_copy(update={"log_dir": tmp_path / "logs"}))
    try:
        t0 = time.monotonic()
        await platform.scale("engine", 1)
        await until(lambda: len(platform.endpoints("engine")) == 1, what="restarted replica")
        [r] = platform.replicas("engine")
        assert r.restarts == 1 and r.last_exit == "exited with status 3"
        assert time.monotonic() - t0 >= FAST.restart_backoff_s
        assert "crashing on purpose" in (tmp_path / "logs" / f"{r.replica_id}.log").read_text()

        assert r.pid is not None
        os.kill(r.pid, signal.SIGKILL)  # a crash while serving
        await until(lambda: platform.replicas("engine")[0].phase != "ready", what="noticed")
        await until(lambda: len(platform.endpoints("engine")) == 1, what="second restart")
        [again] = platform.replicas("engine")
        assert again.replica_id == r.replica_id and again.pid != r.pid
        assert again.restarts == 2 and again.last_exit == "exited with status -9"
        assert not alive(r.pid)
    finally:
        await platform.close()


async def test_a_replica_not_ready_in_time_is_killed_and_restarted(tmp_path: Path) -> None:
    platform = LocalPlatform({"engine": fake_spec("--startup-s", "30")},
                             FAST.model_copy(update={"start_timeout_s": 1.0,
                                                     "log_dir": tmp_path}))
    try:
        await platform.scale("engine", 1)
        first_pid = None
        await until(lambda: platform.replicas("engine")[0].pid is not None)
        first_pid = platform.replicas("engine")[0].pid
        await until(lambda: platform.replicas("engine")[0].restarts >= 1, what="restart")
        assert platform.replicas("engine")[0].last_exit == "not ready within 1 s"
        assert first_pid is not None and not alive(first_pid)
    finally:
        await platform.close()


async def test_drain_replaces_a_replica_and_close_kills_stubborn_ones(tmp_path: Path) -> None:
    # SIGKILL comes stop_timeout_s after what is left of the drain timeout, never sooner.
    platform = LocalPlatform({"engine": fake_spec("--ignore-sigterm")},
                             FAST.model_copy(update={"stop_timeout_s": 1.0, "drain_timeout_s": 1.0,
                                                     "log_dir": tmp_path}))
    try:
        await platform.scale("engine", 1)
        await until(lambda: len(platform.endpoints("engine")) == 1)
        [old] = platform.replicas("engine")
        await asyncio.wait_for(platform.drain(old.replica_id), 15)  # SIGTERM ignored: SIGKILL
        assert old.pid is not None and not alive(old.pid)
        await until(lambda: len(platform.endpoints("engine")) == 1, what="replacement")
        [new] = platform.replicas("engine")
        assert new.replica_id != old.replica_id and platform.desired("engine") == 1
    finally:
        t0 = time.monotonic()
        await platform.close()
    assert 1.9 <= time.monotonic() - t0 < 10  # drain_timeout_s + stop_timeout_s
    assert new.pid is not None and not alive(new.pid)
    with pytest.raises(RuntimeError, match="closed"):
        await platform.scale("engine", 1)


def test_replicas_die_with_a_cluster_process_killed_by_sigkill(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        sys.path.insert(0, {str(FAKE.parent)!r})
        from test_cluster_platform import FAST, fake_spec
        from strata.platform.local import LocalPlatform

        async def main():
            p = LocalPlatform({{"engine": fake_spec()}},
                              FAST.model_copy(update={{"log_dir": Path({str(tmp_path)!r})}}))
            await p.scale("engine", 2)
            while len(p.endpoints("engine")) < 2:
                await asyncio.sleep(0.05)
            print(" ".join(str(r.pid) for r in p.replicas("engine")), flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        proc.kill()  # no chance to clean up: only the kernel's parent-death signal is left
        proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "replicas outlived their cluster process"


async def test_children_get_the_internal_token_and_drain_with_it(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    platform = LocalPlatform({"engine": fake_spec()}, FAST.model_copy(update={"log_dir": logs}),
                             internal_token="cluster-token")
    try:
        token_file = logs / "internal-token"
        assert token_file.read_text() == "cluster-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        await platform.scale("engine", 1)
        await until(lambda: len(platform.endpoints("engine")) == 1, what="a ready replica")
        url = platform.endpoints("engine")[0].url
        async with httpx.AsyncClient(timeout=30) as http:
            # The child holds the token: an unauthenticated drain is refused ...
            r = await http.post(url + "/drain")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            slow = asyncio.create_task(http.post(url + "/v1/completions", json={"sleep_s": 1.0}))
            await asyncio.sleep(0.3)
            # ... the platform's is accepted: the replica drains (refuses new work) and stops.
            await platform.scale("engine", 0)
            deadline = time.monotonic() + 10
            while (await http.get(url + "/health")).json()["status"] != "draining":
                assert time.monotonic() < deadline, "the platform's drain was not accepted"
                await asyncio.sleep(0.05)
            refused = await http.post(url + "/v1/completions", json={})
            assert refused.status_code == 503
            assert (await slow).status_code == 200
        await until(lambda: platform.replicas("engine") == [], what="replica gone")
    finally:
        await platform.close()
