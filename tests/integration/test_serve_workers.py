"""`recship serve --workers 2` as real processes: one port, one version decision, restarts,
graceful SIGTERM and summed metrics; each with both front ends (the workers' own grpc.aio
servers on one port, and the native `recship-frontend` in front of them).

With grpc.aio, which worker holds a connection is read from /proc (the server-side socket of
each established connection, found among each worker's file descriptors), so "both workers"
below is checked, not assumed from the kernel's spreading. Behind the native front end the
workers hold no client connection; that both answered is read from their CPU time instead.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from recship.base.errors import FailedPrecondition, RecshipError, Unavailable
from recship.bundle.manifest import read_manifest
from recship.protos.v1 import admin_pb2
from recship.runtime.client import AdminClient, Query, RecshipClient
from recship.runtime.policy import estimated_bytes

from .conftest import needs_front_end_build

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHANNELS = 8
FRONT_ENDS = pytest.mark.parametrize(
    "front_end", ["grpcio", pytest.param("native", marks=needs_front_end_build)]
)


@pytest.fixture
def repo(bundle_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the session repository (tests here publish versions into it)."""
    shutil.copytree(bundle_repo, tmp_path / "repo")
    return tmp_path / "repo"


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def worker_pids(serve) -> list[int]:  # type: ignore[no-untyped-def]
    """The server's worker processes (not its native front end)."""
    return serve.children(b"recship.runtime.worker")


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """User + system CPU ticks of each process."""
    ticks = {}
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


class Answering:
    """Whether both workers answered calls in a block: connections held (grpc.aio front end)
    or CPU time spent (native front end, whose own connections reach both)."""

    def __init__(self, serve, front_end: str) -> None:  # type: ignore[no-untyped-def]
        self.serve = serve
        self.front_end = front_end
        self.pids = worker_pids(serve)
        self.before = cpu_ticks(self.pids) if front_end == "native" else {}

    def both(self) -> dict[int, int]:
        """Per worker: connections held now, or CPU ticks spent since the start (both > 0)."""
        if self.front_end == "native":
            after = cpu_ticks(self.pids)
            # An idle worker spends a tick now and then; answering ~100 calls costs more.
            return {pid: max(0, after[pid] - self.before[pid] - 2) for pid in self.pids}
        return connections_by_worker(self.pids, self.serve.port)


def connections_by_worker(pids: list[int], port: int) -> dict[int, int]:
    """Established inference connections held by each worker process."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    held = {}
    for pid in pids:
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_inode = re.fullmatch(r"socket:\[(\d+)\]", _readlink(f"/proc/{pid}/fd/{fd}"))
            count += bool(with_inode and with_inode.group(1) in inodes)
        held[pid] = count
    return held


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def spread_client(serve, make_user, front_end: str = "grpcio") -> RecshipClient:  # type: ignore[no-untyped-def]
    """A client whose channels reach every worker (a new set if the kernel put all on one);
    behind the native front end, which balances batches itself, any client."""
    if front_end == "native":
        return RecshipClient(serve.target, timeout=30, channels=2)
    for _ in range(5):
        client = RecshipClient(serve.target, timeout=30, channels=CHANNELS)
        for u in range(CHANNELS):  # one call per channel, in turn: every connection opens
            client.recommend("movies", [Query(make_user(u, 0.0))], 10, 3)
        held = connections_by_worker(worker_pids(serve), serve.port)
        if len(held) == 2 and all(held.values()):
            return client
        client.close()
    raise AssertionError(f"the connections never reached both workers: {held}")


def start_workers(serve_process, repo: Path, front_end: str, *flags: str):  # type: ignore[no-untyped-def]
    serve = serve_process(repo, "--workers", "2", "--front-end", front_end, *flags)
    with AdminClient(serve.admin, timeout=30) as admin:
        admin.wait_until_serving(180)
    return serve


def recommend_all(client: RecshipClient, make_user) -> list[list[tuple[str, float]]]:  # type: ignore[no-untyped-def]
    answers = []
    for u in range(1, 25):
        response = client.recommend("movies", [Query(make_user(u, 0.3))], 20, 5)
        answers.append([(i.item_id, round(i.rank_score, 5)) for i in response.results[0]])
    return answers


@FRONT_ENDS
def test_two_workers_answer_as_one_and_their_metrics_are_summed(
    repo, serve_process, make_user, front_end
) -> None:
    single = serve_process(repo, "--poll-interval-s", "0")
    fleet = start_workers(serve_process, repo, front_end, "--poll-interval-s", "0")
    with RecshipClient(single.target, timeout=30) as client:
        client.wait_until_serving(180)
        expected = recommend_all(client, make_user)
    answering = Answering(fleet, front_end)
    with spread_client(fleet, make_user, front_end) as client:
        warm = 0 if front_end == "native" else CHANNELS
        if front_end == "native":  # concurrent calls, so that batches go to both workers
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda _: recommend_all(client, make_user), range(8)))
            assert answers == [expected] * 8
            warm = 8 * 24
        assert recommend_all(client, make_user) == expected
        sent = warm + 24
        samples = fleet.scrape()
        held = answering.both()
    assert all(held.values()), held
    ok = samples['recship_requests_total{code="OK",method="recship.v1.Recommender/Recommend"}']
    assert ok == sent  # both workers hold connections that took calls: the sum is both
    assert samples["recship_workers_serving"] == 2
    # Per worker: both in this scrape's sums, and both answered calls.
    assert samples['recship_worker_scraped{worker="0"}'] == 1
    assert samples['recship_worker_scraped{worker="1"}'] == 1
    per_worker = [samples[f'recship_worker_requests_total{{worker="{i}"}}'] for i in (0, 1)]
    assert min(per_worker) > 0 and sum(per_worker) >= sent, per_worker
    assert samples['recship_default_version{bundle="movies"}'] == 1  # decided once, not summed
    # One histogram, summed per bucket: its count is every request.
    assert (
        samples['recship_request_latency_seconds_count{method="recship.v1.Recommender/Recommend"}']
        == sent
    )
    assert fleet.terminate() == 0


class Traffic:
    """Callers in a closed loop over a client's channels, recording every outcome."""

    def __init__(self, client: RecshipClient, make_user, callers: int = 8) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.make_user = make_user
        self.outcomes: list[tuple[float, str, int]] = []  # (finished at, code, version)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(c,)) for c in range(callers)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _loop(self, caller: int) -> None:
        user = caller
        while not self._stop.is_set():
            user += 1
            try:
                response = self.client.recommend(
                    "movies", [Query(self.make_user(user % 50 + 1, 0.1))], 10, 3, timeout=10
                )
                outcome = ("OK", response.served_by.version)
            except Unavailable:
                outcome = ("UNAVAILABLE", 0)
            except RecshipError as error:
                outcome = (str(error).split(":", 1)[0], 0)
            self.outcomes.append((time.monotonic(), *outcome))


@FRONT_ENDS
def test_a_version_published_while_two_workers_serve_switches_both(
    repo, serve_process, make_user, publish_copy, front_end
) -> None:
    serve = start_workers(serve_process, repo, front_end, "--poll-interval-s", "0.5")
    with (
        spread_client(serve, make_user, front_end) as client,
        Traffic(client, make_user) as traffic,
    ):
        answering = Answering(serve, front_end)
        time.sleep(1.0)
        publish_copy(repo)
        deadline = time.monotonic() + 120
        with AdminClient(serve.admin, timeout=30) as admin:
            while time.monotonic() < deadline:
                versions = {v.version: v for v in admin.list_bundles("movies").bundles[0].versions}
                old = versions[1].state if 1 in versions else None
                if (
                    2 in versions
                    and versions[2].is_default
                    and old == admin_pb2.VERSION_STATE_UNLOADED
                ):
                    break
                time.sleep(0.05)
            switched = time.monotonic()
        time.sleep(2.0)
        held = answering.both()
    assert time.monotonic() - deadline < 0, "the switch did not complete"
    codes = {code for _, code, _ in traffic.outcomes}
    assert codes == {"OK"}, codes
    after = [version for at, _, version in traffic.outcomes if at > switched]
    assert after and set(after) == {2}
    assert {version for _, _, version in traffic.outcomes} == {1, 2}
    assert all(held.values()), held  # both workers were answering to the end
    assert serve.terminate() == 0


def test_a_memory_budget_is_held_for_both_workers_and_a_switch_unloads_first_in_each(
    repo, serve_process, make_user, publish_copy
) -> None:
    """The supervisor plans with both workers' replicas: a budget that holds one version in
    both makes the next version unload the default first, in both workers (a window its
    metrics report), and refuses an operator's load beside it."""
    manifest = read_manifest(repo / "movies" / "1" / "MANIFEST.json")
    budget = estimated_bytes(manifest, 2) + 1  # the files once, the tables once per worker
    serve = start_workers(
        serve_process, repo, "grpcio", "--poll-interval-s", "0", "--memory-budget-bytes",
        str(budget),
    )  # fmt: skip
    with (
        spread_client(serve, make_user) as client,
        Traffic(client, make_user) as traffic,
        AdminClient(serve.admin, timeout=120) as admin,
    ):
        time.sleep(0.5)
        publish_copy(repo)
        admin.refresh_repository()
        switched = time.monotonic()
        status = {v.version: v for v in admin.bundle_status("movies").versions}
        with pytest.raises(FailedPrecondition, match=r"needs ~\d+ bytes \(2 replica\(s\)"):
            admin.load_version("movies", 1)
        time.sleep(1.0)
    metrics = serve.scrape()
    assert status[2].is_default and status[2].state == admin_pb2.VERSION_STATE_READY
    assert status[1].state == admin_pb2.VERSION_STATE_UNLOADED
    assert metrics['recship_switch_unavailable_seconds_count{bundle="movies"}'] == 1
    codes = {code for _, code, _ in traffic.outcomes}
    assert codes <= {"OK", "UNAVAILABLE"}, codes
    after = [version for at, code, version in traffic.outcomes if at > switched and code == "OK"]
    assert after and set(after) == {2}
    assert serve.terminate() == 0


RECOMMEND_OK = 'recship_requests_total{code="OK",method="recship.v1.Recommender/Recommend"}'


@FRONT_ENDS
def test_a_killed_worker_is_restarted_and_callers_see_only_ok_or_unavailable(
    repo, serve_process, make_user, front_end
) -> None:
    serve = start_workers(serve_process, repo, front_end, "--poll-interval-s", "0")
    pids = worker_pids(serve)
    with (
        spread_client(serve, make_user, front_end) as client,
        Traffic(client, make_user) as traffic,
    ):
        time.sleep(1.0)
        answered = [serve.scrape().get(RECOMMEND_OK, 0.0)]
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 120
        while time.monotonic() < deadline:
            samples = serve.scrape()
            answered.append(samples.get(RECOMMEND_OK, 0.0))
            if samples.get("recship_worker_restarts_total") == 1 and (
                samples.get("recship_workers_serving") == 2
            ):
                break
            time.sleep(0.2)
        restarted = time.monotonic()
        time.sleep(1.0)
    assert restarted < deadline, "the worker was not restarted"
    new = worker_pids(serve)
    assert len(new) == 2 and pids[0] not in new and pids[1] in new
    codes = {code for _, code, _ in traffic.outcomes}
    assert codes <= {"OK", "UNAVAILABLE"}, codes
    assert any(code == "OK" for at, code, _ in traffic.outcomes if at > restarted)
    # The dead worker's counts stay in the sums: the summed counter never goes down.
    assert answered == sorted(answered) and answered[0] > 0, answered
    with AdminClient(serve.admin, timeout=30) as admin:
        assert admin.health() == "SERVING"
    assert serve.terminate() == 0


@FRONT_ENDS
def test_sigterm_lets_requests_in_flight_on_both_workers_finish(
    repo, serve_process, make_user, front_end
) -> None:
    # Batches wait up to 1 s to fill, so the requests are still queued at SIGTERM.
    serve = start_workers(
        serve_process, repo, front_end, "--max-delay-ms", "1000", "--grace-s", "20"
    )
    with spread_client(serve, make_user, front_end) as client:
        pids = worker_pids(serve)
        answering = Answering(serve, front_end)
        if front_end == "native":
            pids += serve.children(b"recship-frontend")
        with concurrent.futures.ThreadPoolExecutor(2 * CHANNELS) as pool:
            calls = [
                pool.submit(client.recommend, "movies", [Query(make_user(u, 0.0))], 10, 3)
                for u in range(2 * CHANNELS)
            ]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                # (Behind the native front end the 1 s fill wait is its own: the calls queue
                # there, but the first to reach each idle worker goes at once, none being due.)
                if front_end == "grpcio":
                    queued = total(serve.scrape(), "recship_queue_rows{") >= 2 * CHANNELS
                else:
                    queued = total(serve.scrape(), "recship_front_end_q") >= CHANNELS
                if queued:
                    break
                time.sleep(0.01)
            # (Behind the native front end the calls wait in its queue or in the workers':
            # which worker holds which is not visible from outside; all must finish.)
            held = answering.both() if front_end == "grpcio" else {}
            serve.process.send_signal(signal.SIGTERM)
            results = [call.result(timeout=60) for call in calls]
    assert all(held.values()), held  # every channel carried two of the queued calls
    assert all(len(r.results[0]) == 3 for r in results)
    assert serve.process.wait(60) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
