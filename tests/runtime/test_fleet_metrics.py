"""The supervisor's metrics of `serve --workers`: the workers' samples summed per label set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from recship.runtime.fleet import CumulativeCarry, merge_families, per_worker_families


def worker_text(requests: int, queued: int, latencies: list[float], version: int) -> str:
    """One worker's exposition, as it answers the supervisor's `metrics` command."""
    registry = CollectorRegistry()
    counter = Counter("recship_requests", "", ["method", "code"], registry=registry)
    counter.labels("Recommend", "OK").inc(requests)
    Gauge("recship_queue_rows", "", ["model"], registry=registry).labels("movies/rank").set(queued)
    histogram = Histogram("recship_request_latency_seconds", "", ["method"], registry=registry)
    for seconds in latencies:
        histogram.labels("Recommend").observe(seconds)
    Gauge("recship_default_version", "", ["bundle"], registry=registry).labels("movies").set(
        version
    )
    return generate_latest(registry).decode()


def test_workers_are_summed_and_the_supervisors_decisions_are_its_own() -> None:
    own = CollectorRegistry()
    Counter("recship_requests", "", ["method", "code"], registry=own).labels(
        "ListBundles", "OK"
    ).inc()
    Gauge("recship_default_version", "", ["bundle"], registry=own).labels("movies").set(2)
    workers = [
        list(text_string_to_metric_families(worker_text(3, 1, [0.001, 0.3], version=2))),
        list(text_string_to_metric_families(worker_text(4, 5, [0.002], version=1))),
    ]
    merged = merge_families(list(own.collect()), workers)
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return merged

    registry.register(Fixed())  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("recship_requests_total", (("code", "OK"), ("method", "Recommend")))] == 7
    assert samples[("recship_requests_total", (("code", "OK"), ("method", "ListBundles")))] == 1
    assert samples[("recship_queue_rows", (("model", "movies/rank"),))] == 6
    count = ("recship_request_latency_seconds_count", (("method", "Recommend"),))
    assert samples[count] == 3
    bucket = ("recship_request_latency_seconds_bucket", (("le", "0.005"), ("method", "Recommend")))
    assert samples[bucket] == 2
    assert samples[("recship_default_version", (("bundle", "movies"),))] == 2  # not 2 + 2 + 1
    # The workers' creation timestamps are not amounts: dropped, not added up.
    assert ("recship_requests_created", (("code", "OK"), ("method", "Recommend"))) not in samples


def parsed(text: str) -> list:
    return list(text_string_to_metric_families(text))


def summed_samples(families: list) -> dict:
    """Every sample of `families` as the endpoint renders them, by (name, labels)."""
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return families

    registry.register(Fixed())  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def test_each_worker_says_whether_it_is_in_the_sums_and_what_it_answered() -> None:
    workers = {0: parsed(worker_text(3, 0, [], 1)), 1: None, 2: parsed(worker_text(5, 0, [], 1))}
    families = {family.name: family for family in per_worker_families(workers)}
    scraped = {s.labels["worker"]: s.value for s in families["recship_worker_scraped"].samples}
    assert scraped == {"0": 1.0, "1": 0.0, "2": 1.0}
    answered = {
        s.labels["worker"]: s.value
        for s in families["recship_worker_requests"].samples
        if s.name == "recship_worker_requests_total"
    }
    assert answered == {"0": 3.0, "2": 5.0}  # a worker left out has no count, not a 0


def test_summed_counters_never_go_down_when_a_worker_restarts_or_misses_a_scrape() -> None:
    carry = CumulativeCarry()
    ok = ("recship_requests_total", (("code", "OK"), ("method", "Recommend")))
    count = ("recship_request_latency_seconds_count", (("method", "Recommend"),))
    queued = ("recship_queue_rows", (("model", "movies/rank"),))

    def scrape(workers: dict) -> dict:
        return summed_samples(merge_families([], carry.families(workers)))

    first = scrape({0: (10.0, parsed(worker_text(3, 1, [0.01], 1))),
                    1: (10.0, parsed(worker_text(4, 2, [0.01, 0.02], 1)))})  # fmt: skip
    assert (first[ok], first[count], first[queued]) == (7, 3, 3)
    # Worker 1 misses a scrape: its last counts stay in the sums, its queue does not.
    missed = scrape({0: (10.0, parsed(worker_text(5, 1, [0.01] * 2, 1))), 1: None})
    assert (missed[ok], missed[count], missed[queued]) == (5 + 4, 2 + 2, 1)
    # Worker 1 restarted (a new start time) and counts from 0: its predecessor's stay.
    restarted = scrape({0: (10.0, parsed(worker_text(6, 1, [0.01] * 3, 1))),
                        1: (20.0, parsed(worker_text(1, 0, [0.01], 1)))})  # fmt: skip
    assert (restarted[ok], restarted[count], restarted[queued]) == (6 + 4 + 1, 3 + 2 + 1, 1)
    # Counted once: the next scrapes of the same incarnations add nothing twice.
    again = scrape({0: (10.0, parsed(worker_text(6, 1, [0.01] * 3, 1))),
                    1: (20.0, parsed(worker_text(2, 0, [0.01], 1)))})  # fmt: skip
    assert again[ok] == 6 + 4 + 2
