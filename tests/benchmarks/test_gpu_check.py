"""The device check (benchmarks/gpu_check.py): its plan is sound here, its dry check catches a
broken plan, and its runner keeps every promise a GPU lease depends on (a step never outlasts
its timeout, nothing it started outlives it, a failure skips only what depended on it, the
report is written). The runner is tested on small stand-in commands: no GPU, no recship run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import tarfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

_spec = importlib.util.spec_from_file_location("recship_benchmarks_gpu_check", SCRIPT)
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check  # dataclasses look their module up while the class is made
_spec.loader.exec_module(gpu_check)

Step, StepKind, Status = gpu_check.Step, gpu_check.StepKind, gpu_check.Status


@pytest.fixture
def config(tmp_path: Path):
    """The plan of a 16-core GPU host, over this test run's own venv."""
    return gpu_check.PlanConfig(Path(sys.prefix), tmp_path / "work", 16)


def _step(name: str, *argv: str, timeout_s: float = 20, **fields) -> Step:
    return Step(name, StepKind.HOST_TOOL, tuple(argv), timeout_s, "a test step", **fields)


def _problems(plan, config) -> list[str]:
    checks, overall = gpu_check.check_plan(plan, config)
    return [problem for check in checks for problem in check.problems] + overall


def _named(plan, name: str) -> Step:
    return next(step for step in plan if step.name == name)


# --- the plan, checked dry ------------------------------------------------------------------


@pytest.mark.slow
def test_the_dry_run_finds_the_plan_sound() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--dry-run", "--venv", sys.prefix, "--cores", "16"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the plan is sound" in result.stdout
    assert "PROBLEM" not in result.stdout
    # Every step's check said what it checked; pytest's selection collected tests.
    assert "pytest-gpu: collects" in result.stdout
    assert "bench-delay-0ms: its --unbatched-serve-args parse" in result.stdout


def test_make_gpu_check_dry_run_runs_the_dry_check() -> None:
    result = subprocess.run(
        ["make", "-n", "gpu-check", "DRY_RUN=1", f"VENV={sys.prefix}", "ARGS=--cores 16"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"benchmarks/gpu_check.py run --dry-run --venv {sys.prefix} --cores 16" in result.stdout


def test_the_plan_fits_the_budget_and_serves_on_loopback(config) -> None:
    plan = gpu_check.build_plan(config)
    assert sum(step.timeout_s for step in plan) <= gpu_check.BUDGET_S - gpu_check.RESERVE_S
    served = [step for step in plan if step.server is not None]
    assert [step.name for step in served] == [
        *(f"bench-delay-{d}ms" for d in gpu_check.MAX_DELAYS_MS),
        *(f"workers-{n}" for n in (1, 2, 4, 8)),
        "native-workers-8",  # the native front end before the widest sweep's workers
    ]
    for step in served:
        parsed = gpu_check.parse_recship(step.server[1:]).params
        assert (parsed["host"], parsed["port"], parsed["devices"]) == ("127.0.0.1", 0, "cuda:0")


def test_the_workers_sweep_leaves_half_the_cores_to_the_load(config) -> None:
    plan = gpu_check.build_plan(dataclasses.replace(config, cores=5))
    sweep = [step for step in plan if step.name.startswith("workers-")]
    assert [step.server[step.server.index("--workers") + 1] for step in sweep] == ["1", "2"]
    assert all(step.argv[step.argv.index("--processes") + 1] == "2" for step in sweep)


def test_an_unknown_option_is_a_problem(config) -> None:
    doctor = _named(gpu_check.build_plan(config), "doctor")
    bad = dataclasses.replace(doctor, argv=(*doctor.argv, "--no-such-option"))
    assert _problems([bad], config) == [
        "`recship doctor`: No such option '--no-such-option'. "
        "(a typo in the plan, or an option this recship lacks)"
    ]


def test_a_bad_value_and_an_unknown_command_are_problems(config) -> None:
    train = _named(gpu_check.build_plan(config), "train-dlrm")
    # Inputs made by no step of this one-step plan are problems too; keep to the parse here.
    bad_value = dataclasses.replace(train, argv=(*train.argv, "--nproc", "two"), inputs=())
    unknown = dataclasses.replace(train, name="typo", argv=(config.recship, "trian"), inputs=())
    problems = _problems([bad_value, unknown], config)
    assert len(problems) == 2
    assert "'two' is not a valid integer" in problems[0]
    assert "No such command 'trian'" in problems[1]


def test_a_server_off_loopback_or_on_a_fixed_port_is_a_problem(config) -> None:
    bench = _named(gpu_check.build_plan(config), "bench-delay-2ms")
    exposed = dataclasses.replace(
        bench, server=(*bench.server, "--host", "0.0.0.0", "--admin-port", "8501"), inputs=()
    )
    assert _problems([exposed], config) == [
        "the server's host is '0.0.0.0', not 127.0.0.1",
        "the server's admin_port is 8501, not 0 (free)",
    ]


def test_a_bad_option_for_the_unbatched_server_is_a_problem(config) -> None:
    bench = _named(gpu_check.build_plan(config), "bench-delay-0ms")
    argv = list(bench.argv)
    argv[argv.index("--unbatched-serve-args") + 1] = "--devices cuda:0 --no-such-flag"
    problems = _problems([dataclasses.replace(bench, argv=tuple(argv), inputs=())], config)
    assert problems == [
        "`recship serve` (--unbatched-serve-args): No such option '--no-such-flag'. "
        "(a typo in the plan, or an option this recship lacks)"
    ]


def test_inputs_order_placeholders_names_and_budget_are_checked(config, tmp_path: Path) -> None:
    made = tmp_path / "made"
    plan = [
        _step("uses-first", "true", inputs=(made,)),  # made only by the next step: too late
        _step("makes", "true", outputs=(made,), timeout_s=gpu_check.BUDGET_S),
        _step("uses-after", "true", inputs=(made / "file",)),  # under an output: fine
        _step("makes", "echo", "{server}", "{port}"),
    ]
    problems = _problems(plan, config)
    assert problems == [
        f"input {made} is made by no earlier step and is missing",
        "the name 'makes' is not unique and file-safe",
        "placeholder {server} in a step that starts no server",
        "unknown placeholder {port}",
        f"the timeouts add up to {gpu_check.BUDGET_S + 60:g} s, over the "
        f"{gpu_check.BUDGET_S - gpu_check.RESERVE_S:g} s the {gpu_check.BUDGET_S:g} s budget "
        "leaves to steps",
    ]


def test_a_missing_make_target_is_a_problem(config) -> None:
    step = Step("nothing", StepKind.MAKE, ("make", "no-such-target"), 10, "")
    [problem] = _problems([step], config)
    assert problem.startswith("`make -n no-such-target` failed:") and "no-such-target" in problem


@pytest.mark.slow
def test_a_pytest_selection_that_collects_nothing_is_a_problem(config) -> None:
    pytest_step = _named(gpu_check.build_plan(config), "pytest-gpu")
    argv = list(pytest_step.argv)
    argv[argv.index("gpu")] = "gpu and not gpu"
    [problem] = _problems([dataclasses.replace(pytest_step, argv=tuple(argv))], config)
    assert problem.startswith("the selection collects no test (exit 5)")


def test_bad_arguments_of_the_data_step_are_a_problem(config) -> None:
    data = _named(gpu_check.build_plan(config), "synthetic-data")
    bad = dataclasses.replace(data, argv=(*data.argv, "--num-users", "many"))
    [problem] = _problems([bad], config)
    assert "does not parse" in problem


def test_the_data_step_writes_a_movielens_folder(tmp_path: Path) -> None:
    options = {"num_users": 30, "num_items": 20, "interactions_per_user": 3, "seed": 1}
    gpu_check.write_synthetic(tmp_path / "data", options)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "u.data", "u.genre", "u.item", "u.user",
    ]  # fmt: skip
    assert len((tmp_path / "data" / "u.data").read_text().splitlines()) == 30 * 3


# --- the runner ----------------------------------------------------------------------------


def _gone(pid: int, within_s: float = 10.0) -> bool:
    """True once process `pid` no longer runs (gone, or a zombie nobody has reaped yet)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def _run(plan, out: Path):
    return gpu_check.run_plan(plan, out, lambda results: None)


# Starts a grandchild that ignores SIGTERM (so only the group SIGKILL ends it), writes its pid
# to argv[1], then sleeps far past any test timeout.
STUBBORN = textwrap.dedent("""
    import subprocess, sys, time
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    grandchild = subprocess.Popen([sys.executable, "-c", child])
    open(sys.argv[1], "w").write(str(grandchild.pid))
    time.sleep(120)
""")


def _read_pid(path: Path, within_s: float = 10.0) -> int:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


def test_a_step_is_stopped_at_its_timeout_with_all_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    plan = [
        _step("stubborn", sys.executable, "-c", STUBBORN, str(pid_file), timeout_s=5),
        _step("after", sys.executable, "-c", "print('still ran')"),
    ]
    stubborn, after = _run(plan, tmp_path / "out")
    assert stubborn.status is Status.TIMED_OUT
    assert stubborn.seconds <= 5 + 0.5
    assert _gone(_read_pid(pid_file))
    assert after.status is Status.PASSED
    assert "still ran" in after.log.read_text()


def test_a_failure_skips_only_the_steps_that_need_its_outputs(tmp_path: Path) -> None:
    made = tmp_path / "made"
    plan = [
        _step("fails", sys.executable, "-c", "raise SystemExit(3)", outputs=(made,)),
        _step("needs-it", "true", inputs=(made / "part",)),
        _step("needs-nothing-made", "true", inputs=(tmp_path / "absent",)),
        _step("independent", "true"),
        _step("no-such-program", str(tmp_path / "nowhere" / "tool")),
    ]
    results = _run(plan, tmp_path / "out")
    assert [(r.status, r.detail) for r in results] == [
        (Status.FAILED, "exit 3"),
        (Status.SKIPPED, "needs part from fails (FAILED)"),
        (Status.SKIPPED, f"input {tmp_path / 'absent'} is missing"),
        (Status.PASSED, "exit 0"),
        (Status.FAILED, f"{tmp_path / 'nowhere' / 'tool'}: no such program"),
    ]


def test_steps_past_the_budget_are_skipped(tmp_path: Path, monkeypatch) -> None:
    # 2.5 s for everything: the first step is stopped at the budget, not at its own 30 s.
    monkeypatch.setattr(gpu_check, "BUDGET_S", gpu_check.RESERVE_S + 2.5)
    plan = [
        _step("long", sys.executable, "-c", "import time; time.sleep(60)", timeout_s=30),
        _step("late", "true"),
    ]
    started = time.monotonic()
    long, late = _run(plan, tmp_path / "out")
    assert time.monotonic() - started <= 2.5 + 0.5
    assert long.status is Status.TIMED_OUT
    assert (late.status, late.detail) == (Status.SKIPPED, "the run's budget is spent")


# A stand-in for `recship serve`: serves argv[1] as its /metrics on a free port, announces the
# port as recship serve does, writes its pid to argv[2], then waits to be stopped.
FAKE_SERVER = textwrap.dedent("""
    import http.server, os, sys, threading, time

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = sys.argv[1].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    open(sys.argv[2], "w").write(str(os.getpid()))
    print(f"listening on 127.0.0.1:7 metrics {httpd.server_address[1]} admin 127.0.0.1:8",
          flush=True)
    time.sleep(120)
""")
SERVING = 'recship_default_version{bundle="movies"} 1.0\n'
FAILED = (
    'recship_version_state{bundle="movies",state="FAILED",version="1"} 1.0\n'
    'recship_default_version{bundle="movies"} 0.0\n'
)


def _served(tmp_path: Path, name: str, metrics: str, *client: str) -> tuple[Step, Path]:
    script, pid_file = tmp_path / "fake_server.py", tmp_path / f"{name}.pid"
    script.write_text(FAKE_SERVER)
    server = (sys.executable, str(script), metrics, str(pid_file))
    return _step(name, *client, server=server), pid_file


def test_a_served_step_gets_the_announced_endpoints_and_stops_its_server(tmp_path: Path) -> None:
    client = (sys.executable, "-c", "import sys; print('client', *sys.argv[1:])")
    ok, ok_pid = _served(tmp_path, "ok", SERVING, *client, "{server}", "{metrics}", "{admin}")
    failing, failing_pid = _served(tmp_path, "failing", SERVING, "false")
    ok_result, failing_result = _run([ok, failing], tmp_path / "out")
    assert ok_result.status is Status.PASSED
    assert ok_result.server_log is not None and "listening on" in ok_result.server_log.read_text()
    assert "client 127.0.0.1:7 127.0.0.1:" in ok_result.log.read_text()
    assert (failing_result.status, failing_result.detail) == (Status.FAILED, "exit 1")
    assert _gone(_read_pid(ok_pid)) and _gone(_read_pid(failing_pid))


def test_a_server_that_fails_to_load_or_to_start_fails_its_step_at_once(tmp_path: Path) -> None:
    failed, failed_pid = _served(tmp_path, "failed", FAILED, "true")
    dead = _step("dead", "true", server=(sys.executable, "-c", "raise SystemExit(4)"))
    started = time.monotonic()
    failed_result, dead_result = _run([failed, dead], tmp_path / "out")
    assert time.monotonic() - started < 10  # neither waited out its 20 s timeout
    assert failed_result.status is Status.FAILED
    assert failed_result.detail == "every version of movies FAILED to load (see the server log)"
    assert _gone(_read_pid(failed_pid))
    assert (dead_result.status, dead_result.detail) == (
        Status.FAILED, "the server exited (4) before listening",
    )  # fmt: skip


def test_a_server_that_never_serves_times_its_step_out(tmp_path: Path) -> None:
    loading = 'recship_version_state{bundle="movies",state="LOADING",version="1"} 1.0\n'
    step, pid_file = _served(tmp_path, "loading", loading, "true")
    step = dataclasses.replace(step, timeout_s=5)
    [result] = _run([step], tmp_path / "out")
    assert (result.status, result.detail) == (Status.TIMED_OUT, "movies was not serving in time")
    assert result.seconds <= 5 + 0.5
    assert _gone(_read_pid(pid_file))


@pytest.mark.parametrize(
    ("metrics", "state"),
    [
        (SERVING, "serving"),
        (FAILED, "failed"),
        ('recship_version_state{bundle="movies",state="LOADING",version="2"} 1.0\n' + FAILED,
         "starting"),
        (SERVING.replace("movies", "other"), "starting"),
        ("", "starting"),
    ],
)  # fmt: skip
def test_serving_state(metrics: str, state: str) -> None:
    assert gpu_check.serving_state(metrics, "movies") == state


def test_the_real_run_refuses_a_host_without_a_gpu(tmp_path: Path) -> None:
    # PATH without nvidia-smi: what `make gpu-check` does on a CPU host (installs nothing).
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PATH": ""},
    )  # fmt: skip
    assert result.returncode == 2
    assert "no NVIDIA GPU visible here" in result.stderr
    assert not (tmp_path / "out").exists()


# --- the report ----------------------------------------------------------------------------


def _bench_table(capsys, qps: tuple[float, ...]) -> str:
    """What `recship bench` prints for results of these QPS (the real printer, so a change to
    its table breaks this test rather than the report of the next GPU lease)."""
    from recship.runtime.bench import BenchConfig, LoadResult, _print

    results = [
        LoadResult(label, 1.0, np.full(int(rate), 0.002), batch_rows=9.5, batch_requests=2.0,
                   server_cpu_ms=0.4)
        for label, rate in zip(("batched", "unbatched"), qps, strict=False)
    ]  # fmt: skip
    capsys.readouterr()
    _print(BenchConfig(server="127.0.0.1:1", bundle="movies", duration_s=1.0), results)
    return capsys.readouterr().out


def test_bench_rows_reads_the_bench_table(capsys) -> None:
    rows = gpu_check.bench_rows(_bench_table(capsys, (300, 100)))
    assert sorted(rows) == ["batched", "unbatched"]
    assert rows["batched"]["QPS"] == "300"
    assert rows["unbatched"]["requests/batch"] == "2.0"
    assert rows["batched"]["p99 ms"] == "2.00"


def test_the_report_has_the_steps_the_bench_table_and_failing_logs(tmp_path, capsys) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    table = ("Serving", "0 ms")
    steps = {
        "bench-0": _step("bench-0", "x", table=table),
        "bench-1": _step("bench-1", "x", table=("Serving", "1 ms")),
        "broken": _step("broken", "x"),
    }
    (logs / "bench-0.log").write_text(_bench_table(capsys, (300, 100)))
    (logs / "bench-1.log").write_text(_bench_table(capsys, (450,)))
    (logs / "broken.log").write_text("Traceback\nRuntimeError: out of cheese\n")
    results = [
        gpu_check.StepResult(steps["bench-0"], Status.PASSED, 3.0, "exit 0", logs / "bench-0.log"),
        gpu_check.StepResult(steps["bench-1"], Status.PASSED, 2.0, "exit 0", logs / "bench-1.log"),
        gpu_check.StepResult(steps["broken"], Status.FAILED, 1.0, "exit 1", logs / "broken.log"),
    ]
    report = tmp_path / "report.md"
    gpu_check.write_report(report, results, datetime.now(UTC), "abc1234", 6.0)
    text = report.read_text()
    assert "| result | 2 passed, 1 FAILED |" in text
    assert "| 3 | broken | FAILED | 1.0 | 20 | exit 1 | a test step | `logs/broken.log` |" in text
    assert "| 0 ms | 300 |" in text and text.count("| 0 ms, unbatched | 100 |") == 1
    assert "| 1 ms | 450 | 2.00 | 2.00 | 0 | 9.5 | 2.0 | 0.40 | x4.50 |" in text
    assert "RuntimeError: out of cheese" in text
    assert all(gap in text for gap in gpu_check.GAPS)


def test_pack_logs_leaves_one_archive(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "01-a.log").write_text("a\n")
    gpu_check.pack_logs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz"]
    with tarfile.open(tmp_path / "logs.tar.gz") as archive:
        assert archive.getnames() == ["logs", "logs/01-a.log"]
