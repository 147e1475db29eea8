"""A gRPC load generator for the overload tests, run as its own process (its own GIL).

It sends one pre-serialized request body (so it spends no CPU on protobuf) over several
channels (each its own connection) and runs a list of phases back to back:

- `{"mode": "closed", "concurrency": C, "duration_s": T}`: C callers each send, await the
  answer and send again: what the server sustains (its capacity, in OK answers per second);
- `{"mode": "open", "factor": F, "duration_s": T}`: calls start at F times the capacity
  measured by the closed phases so far (warm-up phases marked `"warmup": true` excluded),
  whatever the answers (offered load);
- `{"mode": "idle", "duration_s": T}`: nothing is sent.

A phase ends when its calls are all answered, so the next one starts on a drained server.

Every call carries `timeout_s` (or its phase's own) as its deadline. Prints one JSON list:
per phase its mode, length, its window on the wall clock (`wall`: time.time() at its start
and end), the calls' status codes, `ok_in_window` (OK answers that arrived before the phase ended),
`ok_until_s` (when, from its start, the last OK answer to its calls arrived), every latency
by code and the offered rate.

Usage: `python loadgen.py SPEC.json` with target, method, body_hex, timeout_s, channels and
phases.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc
import grpc.aio


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _call(
    stub: Any, body: bytes, timeout: float, calls: list[tuple[float, float, str]]
) -> None:
    started = time.perf_counter()
    try:
        await stub(body, timeout=timeout)
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    calls.append((started, time.perf_counter(), code))


def _summary(
    calls: list[tuple[float, float, str]], began: float, seconds: float, **extra: Any
) -> dict[str, Any]:
    by_code: dict[str, list[float]] = {}
    for started, ended, code in calls:
        by_code.setdefault(code, []).append(ended - started)
    return {
        "seconds": seconds,
        "calls": len(calls),
        "codes": {code: len(values) for code, values in by_code.items()},
        "ok_in_window": sum(1 for _, end, code in calls if code == "OK" and end <= began + seconds),
        # Until the last OK answer to the phase's calls (its queue drained), from its start.
        "ok_until_s": max([end - began for _, end, code in calls if code == "OK"], default=0.0),
        "latency": {
            code: {"p50": _percentile(v, 0.5), "p99": _percentile(v, 0.99), "max": max(v)}
            for code, v in by_code.items()
        },
        "latencies": {code: sorted(v) for code, v in by_code.items()},
        **extra,
    }


async def _closed(stubs: list[Any], body: bytes, timeout: float, phase: dict[str, Any]) -> Any:
    calls: list[tuple[float, float, str]] = []
    began = time.perf_counter()
    end = began + float(phase["duration_s"])

    async def caller(i: int) -> None:
        while time.perf_counter() < end:
            await _call(stubs[i % len(stubs)], body, timeout, calls)

    await asyncio.gather(*(caller(i) for i in range(int(phase["concurrency"]))))
    return calls, began, float(phase["duration_s"])


async def _open(stubs: list[Any], body: bytes, timeout: float, rate: float, seconds: float) -> Any:
    calls: list[tuple[float, float, str]] = []
    tasks: set[asyncio.Task[None]] = set()
    began = time.perf_counter()
    sent = 0
    lag = 0.0
    while (due := began + sent / rate) < began + seconds:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            lag = max(lag, now - due)
        task = asyncio.ensure_future(_call(stubs[sent % len(stubs)], body, timeout, calls))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(tasks)
    return calls, began, seconds, lag


async def _run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    body = bytes.fromhex(spec["body_hex"])
    timeout = float(spec["timeout_s"])
    channels = [grpc.aio.insecure_channel(spec["target"]) for _ in range(int(spec["channels"]))]
    stubs = [channel.unary_unary(spec["method"]) for channel in channels]  # bytes in and out
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    results: list[dict[str, Any]] = []
    ok = 0
    closed_s = 0.0
    for phase in spec["phases"]:
        cpu_before = time.process_time()
        phase_timeout = float(phase.get("timeout_s", timeout))
        if phase["mode"] == "closed":
            calls, began, seconds = await _closed(stubs, body, phase_timeout, phase)
            summary = _summary(calls, began, seconds, mode="closed")
            if not phase.get("warmup"):
                ok += summary["ok_in_window"]
                closed_s += seconds
        elif phase["mode"] == "open":
            rate = max(1.0, float(phase["factor"]) * ok / max(closed_s, 1e-9))
            calls, began, seconds, lag = await _open(
                stubs, body, phase_timeout, rate, float(phase["duration_s"])
            )
            summary = _summary(calls, began, seconds, mode="open", rate=rate, lag_s=lag)
        else:
            began = time.perf_counter()
            await asyncio.sleep(float(phase["duration_s"]))
            summary = _summary([], began, float(phase["duration_s"]), mode="idle")
        summary["warmup"] = bool(phase.get("warmup"))
        # This process's CPU seconds over the phase (its drain included): what the load took.
        summary["cpu_s"] = time.process_time() - cpu_before
        # The phase's window on the wall clock, for what the server process measured in it.
        summary["wall"] = [time.time() - (time.perf_counter() - began), 0.0]
        summary["wall"][1] = summary["wall"][0] + summary["seconds"]
        results.append(summary)
    for channel in channels:
        await channel.close()
    return results


def main() -> None:
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    print(json.dumps(asyncio.run(_run(spec))))


if __name__ == "__main__":
    main()
