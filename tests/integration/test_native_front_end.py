"""`recship serve --front-end native` as real processes: the C++ front end on the inference
port answers every call as the grpc.aio server does (items, scores, codes and messages),
aggregates health, speaks TLS, and is restarted when it dies, its callers seeing only OK or
UNAVAILABLE. (Workers, version switches and SIGTERM behind it: test_serve_workers.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recship.base.errors import FailedPrecondition, RecshipError, Unavailable
from recship.protos.v1 import recommender_pb2
from recship.runtime import front_end
from recship.runtime.client import AdminClient, Query, RecshipClient, model_spec, query_proto
from recship.runtime.security import ClientTLS

from .conftest import needs_front_end_build

SERVICE = "/recship.v1.Recommender/"


def test_a_host_without_the_build_tools_is_told_what_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(front_end.shutil, "which", lambda tool: None)
    with pytest.raises(FailedPrecondition) as caught:
        front_end.front_end_binary(tmp_path)
    message = str(caught.value)
    assert "g++" in message and "libgrpc++-dev" in message and "--front-end grpcio" in message
    assert not any(tmp_path.iterdir())  # nothing half built


def test_the_stats_lines_become_counters_that_survive_a_restart() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    metrics = front_end.FrontEndMetrics(registry)
    for line in (
        "stats queued=3 batches=10 batched_calls=200 queue_full=1 expired=2 cancelled=0 "
        "failed_batches=0",
        "not a stats line",
        "stats queued=x",  # garbled: ignored
        "stats queued=0 batches=12 batched_calls=230 queue_full=1 expired=2 cancelled=1 "
        "failed_batches=1",
        None,  # restarted: its totals start again from 0
        "stats queued=5 batches=2 batched_calls=40 queue_full=0 expired=0 cancelled=0 "
        "failed_batches=0",
    ):
        if line is None:
            metrics.started()
        else:
            metrics.update(line)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("recship_front_end_batches_total") == 14
    assert value("recship_front_end_batched_calls_total") == 270
    assert value("recship_front_end_failed_batches_total") == 1
    assert value("recship_front_end_refused_calls_total", reason="queue_full") == 1
    assert value("recship_front_end_refused_calls_total", reason="deadline") == 2
    assert value("recship_front_end_refused_calls_total", reason="cancelled") == 1
    assert value("recship_front_end_queued_calls") == 5


def _call(channel: grpc.Channel, method: str, body: bytes) -> tuple[Any, ...]:
    try:
        answer = channel.unary_unary(SERVICE + method)(body, timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details()
    response = getattr(recommender_pb2, f"{method}Response").FromString(answer)
    if method == "Recommend":
        return tuple(
            tuple((i.item_id, round(i.rank_score, 5)) for i in r.items) for r in response.results
        )
    return tuple(tuple((i.item_id, round(i.score, 5)) for i in r.items) for r in response.results)


def _bodies(make_user) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
    def recommend(users: list[dict[str, Any]], **fields: Any) -> bytes:
        fields.setdefault("model", model_spec("movies"))
        queries = [recommender_pb2.RecommendQuery(query=query_proto(Query(u))) for u in users]
        return recommender_pb2.RecommendRequest(queries=queries, **fields).SerializeToString()

    retrieve = recommender_pb2.RetrieveRequest(
        model=model_spec("movies"),
        queries=[recommender_pb2.RetrieveQuery(query=query_proto(Query(make_user(3))))],
        top_k=5,
    ).SerializeToString()
    return [
        ("Recommend", recommend([make_user(1), make_user(2, 0.8)], retrieve_k=20, top_n=5)),
        ("Recommend", recommend([make_user(4)], top_n=3)),
        ("Recommend", recommend([{**make_user(5), "bogus": 1}], top_n=3)),
        ("Recommend", recommend([make_user(6)], model=model_spec("nope"), top_n=3)),
        ("Recommend", b"\x0a\xff\xff not a request"),
        ("Recommend", b"\x0a" + b"\x00" * (5 << 20)),  # over max_request_bytes (4 MiB)
        ("Retrieve", retrieve),
    ]


@needs_front_end_build
def test_native_answers_every_call_as_grpcio_does(
    bundle_repo: Path, serve_process, make_user
) -> None:
    single = serve_process(bundle_repo, "--poll-interval-s", "0")
    native = _serve_native(serve_process, bundle_repo)
    with RecshipClient(single.target, timeout=30) as client:
        client.wait_until_serving(180)
    bodies = _bodies(make_user)
    with (
        grpc.insecure_channel(single.target) as plain,
        grpc.insecure_channel(native.target, [("grpc.max_send_message_length", 8 << 20)]) as fast,
    ):
        expected = [_call(plain, method, body) for method, body in bodies]
        assert [_call(fast, method, body) for method, body in bodies] == expected
        codes = [answer[0] for answer in expected if isinstance(answer[0], grpc.StatusCode)]
        assert (
            codes
            == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND]
            + [grpc.StatusCode.INVALID_ARGUMENT] * 2
        )
        health = health_pb2_grpc.HealthStub(fast)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as reflection:
            fast.unary_unary("/grpc.reflection.v1alpha.ServerReflection/Info")(b"", timeout=10)
        assert reflection.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert native.terminate() == 0


def _front_end_pid(serve) -> int:  # type: ignore[no-untyped-def]
    (pid,) = serve.children(b"recship-frontend")
    return pid


def _serve_native(serve_process, repo: Path, *flags: str):  # type: ignore[no-untyped-def]
    """`recship serve --front-end native` over `repo`, waited for until SERVING."""
    serve = serve_process(repo, "--poll-interval-s", "0", "--front-end", "native", *flags)
    with AdminClient(serve.admin, timeout=30) as admin:
        admin.wait_until_serving(180)
    return serve


@needs_front_end_build
def test_a_killed_front_end_is_restarted_and_callers_see_only_ok_or_unavailable(
    bundle_repo: Path, serve_process, make_user
) -> None:
    serve = _serve_native(serve_process, bundle_repo)
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop(caller: int) -> None:
        with RecshipClient(serve.target, timeout=10) as client:
            user = caller
            while not stop.is_set():
                user += 1
                try:
                    client.recommend("movies", [Query(make_user(user % 40 + 1))], 10, 3)
                    outcomes.append((time.monotonic(), "OK"))
                except Unavailable:
                    outcomes.append((time.monotonic(), "UNAVAILABLE"))
                    time.sleep(0.05)
                except RecshipError as error:
                    outcomes.append((time.monotonic(), str(error).split(":", 1)[0]))

    callers = [threading.Thread(target=loop, args=(c,)) for c in range(4)]
    for thread in callers:
        thread.start()
    try:
        time.sleep(1.0)
        old = _front_end_pid(serve)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if serve.scrape().get("recship_front_end_restarts_total") == 1:
                with AdminClient(serve.admin, timeout=30) as admin:
                    if admin.health() == "SERVING":
                        break
            time.sleep(0.2)
        back = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in callers:
            thread.join(30)
    assert back < deadline, "the front end was not restarted"
    assert _front_end_pid(serve) != old
    assert {code for _, code in outcomes} <= {"OK", "UNAVAILABLE"}
    assert any(code == "OK" for at, code in outcomes if at > back)
    assert serve.terminate() == 0


@needs_front_end_build
def test_the_native_front_end_speaks_mutual_tls(
    bundle_repo: Path, serve_process, make_user, tls_files
) -> None:
    serve = serve_process(
        bundle_repo, "--poll-interval-s", "0", "--front-end", "native",
        "--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key),
        "--tls-client-ca", str(tls_files.ca),
    )  # fmt: skip
    trusted = ClientTLS(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    with RecshipClient(serve.target, timeout=30, tls=trusted) as client:
        client.wait_until_serving(180)
        answer = client.recommend("movies", [Query(make_user(1))], 10, 3)
        assert len(answer.results[0]) == 3
    with (
        RecshipClient(serve.target, timeout=10, tls=ClientTLS(ca=tls_files.ca)) as anonymous,
        pytest.raises(Unavailable),
    ):
        anonymous.recommend("movies", [Query(make_user(1))], 10, 3)
    assert serve.terminate() == 0


@needs_front_end_build
def test_a_call_cancelled_while_queued_in_the_front_end_is_never_served(
    bundle_repo: Path, serve_process, make_user
) -> None:
    # A batch waits up to 1 s for more calls (--max-delay-ms, the front end's fill wait) while
    # more are due: after two calls at once, a lone call waits for a second one, and is
    # cancelled meanwhile.
    serve = _serve_native(serve_process, bundle_repo, "--max-delay-ms", "1000")
    (_, body), *_ = _bodies(make_user)
    method = "recship.v1.Recommender/Recommend"
    with grpc.insecure_channel(serve.target) as channel:
        call = channel.unary_unary(SERVICE + "Recommend")
        pair = [call.future(body, timeout=30) for _ in range(2)]
        assert all(answer.result(timeout=30) for answer in pair)
        queued = call.future(body, timeout=30)
        time.sleep(0.2)
        assert queued.cancel()
        time.sleep(3.0)  # a call sent later would have been answered by now
        samples = serve.scrape()
        served = {k: v for k, v in samples.items() if method in k}
        assert served.get(f'recship_requests_total{{code="OK",method="{method}"}}') == 2
        assert not any("CANCELLED" in k for k in served), served  # never reached a worker
        # The front end's own counters (its stats lines, once a second), on the supervisor's
        # endpoint: the pair went in one batch or two, the cancelled call in none.
        assert samples['recship_front_end_refused_calls_total{reason="cancelled"}'] == 1
        assert samples["recship_front_end_batches_total"] in (1, 2)
        assert samples["recship_front_end_batched_calls_total"] == 2
        assert samples["recship_front_end_queued_calls"] == 0
        assert call(body, timeout=30)  # and the front end goes on
    assert serve.terminate() == 0


@needs_front_end_build
def test_a_killed_supervisor_leaves_no_front_end_or_worker_behind(
    bundle_repo: Path, serve_process
) -> None:
    serve = _serve_native(serve_process, bundle_repo)
    children = serve.children()
    assert _front_end_pid(serve) in children and len(children) == 2  # it and one worker
    serve.process.kill()  # no SIGTERM, no drain: only the pipes it held close
    serve.process.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in children):
        time.sleep(0.1)
    # (They are not our children: once gone, their /proc entries are reaped by init.)
    alive = [p for p in children if Path(f"/proc/{p}").exists() and b"Z" not in
             Path(f"/proc/{p}/stat").read_bytes().split(b")")[-1][:3]]  # fmt: skip
    assert not alive, f"still running after their supervisor died: {alive}"


@needs_front_end_build
def test_the_fill_wait_holds_a_batch_only_while_more_calls_are_due(
    bundle_repo: Path, serve_process, make_user
) -> None:
    serve = _serve_native(serve_process, bundle_repo, "--max-delay-ms", "400")
    bodies = dict(reversed(_bodies(make_user)))  # the first body of each method
    with grpc.insecure_channel(serve.target) as channel:

        def timed(count: int, method: str = "Recommend") -> tuple[float, list[bytes]]:
            call = channel.unary_unary(SERVICE + method)
            started = time.monotonic()
            calls = [call.future(bodies[method], timeout=30) for _ in range(count)]
            answers = [c.result(timeout=30) for c in calls]
            return time.monotonic() - started, answers

        # A lone client: its call is all there is, so it goes at once (timed after a first
        # one, which pays the models' cold start: 0.53-0.62 s here).
        _, cold = timed(1)
        lone_s, lone = timed(1)
        # Eight clients at once: the front end has now held eight calls.
        _, first = timed(8)
        # The eight again: the first to arrive waits for the others, and the batch goes the
        # moment the eighth is in, not when the 400 ms are out.
        again_s, again = timed(8)
        # One of the eight: the others are due (eight were held lately), so it waits them out.
        one_s, one = timed(1)
        # A lone call of another method: no other call of its own is due, so it goes at once.
        retrieve_s, retrieved = timed(1, "Retrieve")
    # (The scores' last bits differ between batch sizes; the items do not.)
    items = {
        tuple(
            item.item_id
            for item in recommender_pb2.RecommendResponse.FromString(answer).results[0].items
        )
        for answer in cold + lone + first + again + one
    }
    assert len(items) == 1 and len(next(iter(items))) > 0, items
    assert lone_s < 0.4, lone_s
    assert again_s < 0.4, again_s
    assert one_s >= 0.4, one_s
    assert retrieve_s < 0.4 and retrieved[0], retrieve_s
    time.sleep(1.5)  # the stats line is written once a second
    samples = serve.scrape()
    assert samples["recship_front_end_batched_calls_total"] == 20
    assert serve.terminate() == 0


@needs_front_end_build
def test_max_batch_calls_bounds_the_batches_a_worker_gets(
    bundle_repo: Path, serve_process, make_user
) -> None:
    serve = _serve_native(serve_process, bundle_repo, "--max-batch-calls", "3",
                          "--max-inflight", "2")  # fmt: skip
    (_, body), *_ = _bodies(make_user)
    with grpc.insecure_channel(serve.target) as channel:
        call = channel.unary_unary(SERVICE + "Recommend")
        for _ in range(3):
            answers = [call.future(body, timeout=30) for _ in range(12)]
            assert all(answer.result(timeout=30) for answer in answers)
    time.sleep(1.5)  # the stats line is written once a second
    samples = serve.scrape()
    assert samples["recship_front_end_batched_calls_total"] == 36
    assert samples["recship_front_end_batches_total"] >= 12  # at most 3 calls each
    assert serve.terminate() == 0
