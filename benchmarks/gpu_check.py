"""The device check: one time-boxed run that proves the CUDA path of recship on a GPU host.

A GPU machine is lent for minutes at a time, so everything worth knowing about the CUDA
column (install, doctor, the `gpu` tests, nccl training, a CUDA bundle, serving on `cuda:0`,
batched vs unbatched with a max-delay sweep, a sweep of server worker processes) is measured
in one run of under 8 minutes that never hangs: every step has its own timeout, a failed step
is recorded and the run goes on (steps whose inputs it was to make are skipped), and
everything lands in ONE Markdown report (`report.md`) beside the raw logs (`logs/`).

The run is a *plan*, an ordered list of `Step`s built by `build_plan`. `run --dry-run` checks
the plan on any machine, without a GPU and without running it: every `recship ...` command
line parses against the real click CLI, every server binds 127.0.0.1 on free ports, every
input is made by an earlier step or exists, the make targets exist, `pytest -m gpu` collects
at least one test, and the timeouts fit the budget. The test suite runs the dry check
(tests/benchmarks/test_gpu_check.py), so a CLI change that breaks the plan fails CI, not the
next GPU lease.

This file runs under any Python >= 3.11 with the standard library alone: on a fresh GPU host
it starts before recship is installed (installing is its second step). Only the dry check and
the `synthetic-data` step import recship, from the venv's Python.

Usage::

    make gpu-check                # on a GPU host: report in $OUT, else gpu-check-out/
    make gpu-check DRY_RUN=1      # anywhere: check the plan (the suite does this too)
    python benchmarks/gpu_check.py run --dry-run --cores 16   # the plan a 16-core host runs
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import inspect
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The whole run, every step's timeout included, fits in this many seconds of a GPU machine.
BUDGET_S = 480.0
# Kept free of step timeouts: starting, writing the report, packing the logs.
RESERVE_S = 10.0
# A step's command gets SIGTERM this long before its timeout and SIGKILL at it, so a step,
# stopping what it started included, never outlasts its timeout.
STOP_GRACE_S = 2.0
BUNDLE = "movies"
# Small enough to train in seconds, large enough that the default quality gate is meaningful.
SYNTHETIC = {"num_users": 500, "num_items": 300, "interactions_per_user": 12, "seed": 0}
MAX_DELAYS_MS = (0, 2, 5)
# `recship serve --workers N` sweep, up to half the host's cores (the other half load it).
WORKERS = (1, 2, 4, 8)
BENCH_CONCURRENCY = 64
BENCH_DURATION_S = 2.0
BENCH_WARMUP_S = 0.5
# What the check cannot prove because the CLI has no way to ask for it (stated in the report).
GAPS = (
    "FAISS search stays on the CPU: neither `recship package` nor `recship serve` has an "
    "option to place the index on a GPU (`recship.bundle.index.to_gpu` exists; the runtime "
    "does not call it). The `gpu` tests cover the GPU index copy alone.",
    "`recship train` has no backend option: nccl is what the trainer picks when CUDA is "
    "visible, so the training steps prove nccl only together with doctor's CUDA row.",
    "`recship bench` prints a table only (no machine-readable output): the report parses it.",
)
# Endpoints of the server a served step starts, filled into its command once announced.
PLACEHOLDERS = ("{server}", "{metrics}", "{admin}")
_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ANNOUNCEMENT = re.compile(r"^listening on (\S+) metrics (\S+) admin (\S+)$", re.MULTILINE)


class StepKind(enum.Enum):
    """What runs a step's command, which decides how the dry check checks it."""

    HOST_TOOL = "host tool"  # a program of the GPU host (nvidia-smi): looked up at run time
    MAKE = "make"  # a make target: `make -n` shows it exists
    PYTEST = "pytest"  # the venv's pytest: its selection must collect
    RECSHIP = "recship"  # the venv's recship: parsed against the click CLI
    SELF = "self"  # a subcommand of this file, run by the venv's Python


@dataclass(frozen=True)
class Step:
    """One command of the plan.

    Attributes:
        name: unique and file-safe; its log is `logs/<NN>-<name>.log`.
        kind: what runs `argv`.
        argv: the command; in a served step it may hold PLACEHOLDERS.
        timeout_s: wall-clock limit of the whole step (its server's start and stop included).
        proves: what passing this step shows, for the report.
        inputs: paths that must exist when it starts; a step is skipped when one of its
            inputs is an output of an earlier step that did not pass.
        outputs: paths it makes.
        server: a `recship serve` command started first (on free loopback ports, announced on
            its stdout), waited on until the bundle serves, and stopped when the step ends.
        show_output: put the tail of its log in the report (short, telling outputs).
        table: (report table, row label) for the rows of a `recship bench` table it prints.
    """

    name: str
    kind: StepKind
    argv: tuple[str, ...]
    timeout_s: float
    proves: str
    inputs: tuple[Path, ...] = ()
    outputs: tuple[Path, ...] = ()
    server: tuple[str, ...] | None = None
    show_output: bool = False
    table: tuple[str, str] | None = None


@dataclass(frozen=True)
class PlanConfig:
    """Where the plan runs.

    Attributes:
        venv: the virtual environment `make install` creates (Makefile VENV).
        work: scratch folder for data, checkpoints and the bundle repository.
        cores: CPU cores of the host; half go to the load generator.
    """

    venv: Path
    work: Path
    cores: int

    @property
    def recship(self) -> str:
        return str(self.venv / "bin" / "recship")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")


def build_plan(config: PlanConfig) -> list[Step]:
    """The device check's steps, in order. Pure: builds values, touches nothing."""
    work, venv, recship = config.work, config.venv, config.recship
    data, repo = work / "data", work / "repo"
    runs = {model: work / "runs" / model for model in ("two-tower", "dlrm")}
    plan = [
        Step(
            "nvidia-smi", StepKind.HOST_TOOL, ("nvidia-smi",), 5,
            "the driver sees the GPU (name, driver, memory)", show_output=True,
        ),
        Step(
            "install", StepKind.MAKE, ("make", "install", "ACCEL=cuda", f"VENV={venv}"), 70,
            "the CUDA column installs (torch CUDA build, fbgemm-gpu, faiss-gpu, torchrec); "
            "a no-op when the venv already holds it",
            outputs=(venv,),
        ),
        Step(
            "doctor", StepKind.RECSHIP, (recship, "doctor"), 20,
            "torch, fbgemm_gpu, torchrec and faiss load together and compute right; CUDA "
            "devices and faiss GPU support as the libraries see them",
            inputs=(venv,), show_output=True,
        ),
        Step(
            "synthetic-data", StepKind.SELF,
            (config.python, str(Path(__file__).resolve()), "synthetic-data", str(data),
             *_flags(**SYNTHETIC)),
            15,
            "a packageable data set without the network (synthetic, written as MovieLens)",
            inputs=(venv,), outputs=(data,),
        ),
        Step(
            "pytest-gpu", StepKind.PYTEST,
            (config.python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
             "--timeout", "30", str(ROOT / "tests")),
            40,
            "the `gpu`-marked tests pass on a GPU (skips are listed with their reasons)",
            inputs=(venv, ROOT / "tests"), show_output=True,
        ),
        *(
            Step(
                f"train-{model}", StepKind.RECSHIP,
                (recship, "train", model, *_flags(data=data, nproc=1, epochs=2, out=out)), 35,
                f"{model} trains under DistributedModelParallel on cuda:0 (nccl, one rank) "
                "and writes a DCP checkpoint",
                inputs=(venv, data), outputs=(out,),
            )
            for model, out in runs.items()
        ),
        Step(
            "package-cuda", StepKind.RECSHIP,
            (recship, "package", *_flags(retrieval=runs["two-tower"], ranking=runs["dlrm"],
                                         repo=repo, name=BUNDLE, device_type="cuda", devices=1)),
            45,
            "int8 tables sharded for one CUDA device, TorchScript entry points and golden "
            "outputs recorded on CUDA, index built, default quality gate vs fp32 passed",
            inputs=(venv, runs["two-tower"], runs["dlrm"]), outputs=(repo / BUNDLE,),
            show_output=True,
        ),
    ]  # fmt: skip
    for delay in MAX_DELAYS_MS:
        compare = delay == 0
        plan.append(
            Step(
                f"bench-delay-{delay}ms", StepKind.RECSHIP,
                _bench_argv(config, repo, compare_unbatched=compare, unbatched_serve_args=(
                    "--devices cuda:0 --grace-s 1 --poll-interval-s 0" if compare else None)),
                40 if compare else 20,
                "serving on cuda:0 loads and self-tests the CUDA bundle; Recommend QPS and "
                f"latency at --max-delay-ms {delay}"
                + (", and against a server with batching off" if compare else ""),
                inputs=(venv, repo / BUNDLE),
                server=_serve_argv(config, repo, max_delay_ms=delay),
                table=("Serving on cuda:0: batched vs unbatched, max-delay sweep", f"{delay} ms"),
            )
        )  # fmt: skip
    # Read like one process: the server announces one `listening on` line and its metrics
    # endpoint reports the bundle's default version, whatever the number of workers.
    for workers in (n for n in WORKERS if n <= max(1, config.cores // 2)):
        plan.append(
            Step(
                f"workers-{workers}", StepKind.RECSHIP, _bench_argv(config, repo),
                20 if workers <= 2 else 25,
                f"`--workers {workers}`: server processes on one port, each on cuda:0; "
                "Recommend QPS and latency as workers are added on the host's cores",
                inputs=(venv, repo / BUNDLE),
                server=_serve_argv(config, repo, workers=workers),
                table=("Workers sweep on cuda:0", f"--workers {workers}"),
            )
        )  # fmt: skip
    # The native front end in front of the most workers the sweep ran (its build needs g++ and
    # gRPC C++ on the host: without them this step fails, saying what to install).
    widest = max(n for n in WORKERS if n <= max(1, config.cores // 2))
    plan.append(
        Step(
            f"native-workers-{widest}", StepKind.RECSHIP, _bench_argv(config, repo), 25,
            f"`--front-end native --workers {widest}`: recship-frontend (C++ gRPC) batches "
            "the calls for the workers on cuda:0; Recommend QPS and latency beside the sweep",
            inputs=(venv, repo / BUNDLE),
            server=_serve_argv(config, repo, workers=widest, front_end="native"),
            table=("Workers sweep on cuda:0", f"--front-end native --workers {widest}"),
        )
    )  # fmt: skip
    return plan


def _flags(**options: object) -> list[str]:
    """`--name value` per keyword (underscores become dashes); True is a bare flag, None none."""
    flags = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flags.append(f"--{name.replace('_', '-')}")
        if value is not True:
            flags.append(str(value))
    return flags


def _serve_argv(config: PlanConfig, repo: Path, **options: object) -> tuple[str, ...]:
    """`recship serve` of the bundle on cuda:0, on free loopback ports, quick to stop."""
    loopback = "127.0.0.1"
    return (
        config.recship, "serve",
        *_flags(repo=repo, bundle=BUNDLE, host=loopback, port=0, metrics_host=loopback,
                metrics_port=0, admin_host=loopback, admin_port=0, devices="cuda:0", grace_s=1,
                poll_interval_s=0, **options),
    )  # fmt: skip


def _bench_argv(config: PlanConfig, repo: Path, **options: object) -> tuple[str, ...]:
    """`recship bench` against the step's server, half the host's cores generating load."""
    return (
        config.recship, "bench",
        *_flags(server="{server}", metrics="{metrics}", repo=repo, bundle=BUNDLE,
                concurrency=BENCH_CONCURRENCY, duration=BENCH_DURATION_S,
                warmup=BENCH_WARMUP_S, processes=max(1, config.cores // 2), **options),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The dry check


@dataclass
class StepCheck:
    """What the dry check found about one step: `problems` fail the plan, `notes` inform."""

    step: Step
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_plan(plan: Sequence[Step], config: PlanConfig) -> tuple[list[StepCheck], list[str]]:
    """Checks a plan without running it (no GPU needed; needs recship installed in `venv`).

    Returns:
        (one StepCheck per step, problems of the plan as a whole). The plan is sound when
        every list of problems is empty.
    """
    made: set[Path] = set()
    names: set[str] = set()
    checks = []
    for step in plan:
        check = StepCheck(step)
        if not _STEP_NAME.match(step.name) or step.name in names:
            check.problems.append(f"the name {step.name!r} is not unique and file-safe")
        names.add(step.name)
        for path in step.inputs:
            if not _made_by(path, made) and not path.exists():
                check.problems.append(f"input {path} is made by no earlier step and is missing")
        made.update(step.outputs)
        if step.timeout_s <= STOP_GRACE_S:
            check.problems.append(f"timeout {step.timeout_s:g} s leaves no time to run")
        _check_placeholders(step, check)
        CHECKERS[step.kind](step, config, check)
        checks.append(check)
    total = sum(step.timeout_s for step in plan)
    overall = []
    if total > BUDGET_S - RESERVE_S:
        overall.append(
            f"the timeouts add up to {total:g} s, over the {BUDGET_S - RESERVE_S:g} s "
            f"the {BUDGET_S:g} s budget leaves to steps"
        )
    return checks, overall


def _made_by(path: Path, outputs: set[Path]) -> bool:
    return any(path == output or output in path.parents for output in outputs)


def _check_placeholders(step: Step, check: StepCheck) -> None:
    for token in re.findall(r"\{[^{}]*\}", " ".join(step.argv)):
        if token not in PLACEHOLDERS:
            check.problems.append(f"unknown placeholder {token}")
        elif step.server is None:
            check.problems.append(f"placeholder {token} in a step that starts no server")


def _check_host_tool(step: Step, config: PlanConfig, check: StepCheck) -> None:
    found = shutil.which(step.argv[0])
    check.notes.append(
        f"{step.argv[0]} is at {found}" if found else f"{step.argv[0]} is not on this host"
    )


def _check_make(step: Step, config: PlanConfig, check: StepCheck) -> None:
    """`make -n TARGET VARS` prints the recipe without running it; it fails on no such target."""
    argv = (step.argv[0], "-n", *step.argv[1:])
    result = _capture(argv, 60)
    if result.returncode != 0:
        check.problems.append(f"`{shlex.join(argv)}` failed: {_last_line(result.stdout)}")
    else:
        check.notes.append(f"`{shlex.join(argv)}`: the target exists")


def _check_pytest(step: Step, config: PlanConfig, check: StepCheck) -> None:
    """The step's own selection, with --collect-only: exit 0 means at least one test."""
    argv = (*step.argv, "--collect-only")
    result = _capture(argv, 180)
    counted = re.search(r"(\d+)(?:/\d+)? tests? collected", result.stdout)
    if result.returncode != 0 or counted is None or int(counted.group(1)) == 0:
        check.problems.append(
            f"the selection collects no test (exit {result.returncode}): "
            f"{_last_line(result.stdout)}"
        )
    else:
        check.notes.append(f"collects {counted.group(1)} tests")


def _check_recship(step: Step, config: PlanConfig, check: StepCheck) -> None:
    """Parses the command (and its server's, and a nested serve command) with the real CLI."""
    sample = {token: "127.0.0.1:1" for token in PLACEHOLDERS}
    argv = [_fill(arg, sample) for arg in step.argv]
    context = _parse_into(check, argv[1:], "")
    if context is not None:
        check.notes.append(f"parsed by `{context.command_path}`")
        nested = context.params.get("unbatched_serve_args")
        # What `recship bench --compare-unbatched` puts before its own serve options.
        if nested and _parse_into(check, ["serve", *shlex.split(nested), "--repo", "repo"],
                                  " (--unbatched-serve-args)"):  # fmt: skip
            check.notes.append("its --unbatched-serve-args parse as `recship serve` options")
    if step.server is not None:
        served = _parse_into(check, list(step.server[1:]), " (the step's server)")
        if served is not None:
            check.notes.append(f"its server parsed by `{served.command_path}`")
            _check_binding(served.params, check)


def _check_binding(params: dict[str, Any], check: StepCheck) -> None:
    """A server the check starts listens on loopback only, on ports the kernel picks."""
    for host in ("host", "metrics_host", "admin_host"):
        if params.get(host) != "127.0.0.1":
            check.problems.append(f"the server's {host} is {params.get(host)!r}, not 127.0.0.1")
    for port in ("port", "metrics_port", "admin_port"):
        if params.get(port) != 0:
            check.problems.append(f"the server's {port} is {params.get(port)!r}, not 0 (free)")


def _parse_into(check: StepCheck, args: list[str], what: str) -> Any:
    """click.Context of `recship ARGS`, or None with the reason added to `check.problems`.

    `what` names the command line in the problem, e.g. " (the step's server)".
    """
    import click

    try:
        return parse_recship(args)
    except Exception as error:  # click's usage errors and the options' own callbacks' errors
        message = error.format_message() if isinstance(error, click.ClickException) else error
        if isinstance(error, click.NoSuchOption):
            message = f"{message} (a typo in the plan, or an option this recship lacks)"
        check.problems.append(f"`recship {args[0]}`{what}: {message}")
        return None


def parse_recship(args: Sequence[str]) -> Any:
    """Parses `recship ARGS` as the CLI would, without running the command.

    Groups are walked with `resolve_command` (recship's groups take no options of their own);
    the leaf command's `make_context` applies types, defaults, required options and callbacks.

    Returns:
        The leaf command's click.Context (its `params` are the parsed options).

    Raises:
        click.UsageError: unknown command or option, bad or missing value.
        RecshipError: an option's callback refused its value.
    """
    import click

    from recship.cli.main import cli

    group: click.Group = cli
    context = click.Context(cli, info_name="recship")
    rest = list(args)
    while True:
        if not rest:
            raise click.UsageError("missing command", context)
        name, found, rest = group.resolve_command(context, rest)
        if found is None or name is None:  # resolve_command raises first outside resilient mode
            raise click.UsageError("no such command", context)
        if not isinstance(found, click.Group):
            return found.make_context(name, rest, parent=context)
        group, context = found, click.Context(found, info_name=name, parent=context)


def _check_self(step: Step, config: PlanConfig, check: StepCheck) -> None:
    """This file's own subcommand: its arguments parse and what it calls exists."""
    try:
        options = build_parser().parse_args(list(step.argv[2:]))
    except SystemExit:
        check.problems.append(f"`{shlex.join(step.argv[2:])}` does not parse (see above)")
        return
    generate, _ = _synthetic_writers()
    try:
        inspect.signature(generate).bind(**_synthetic_options(options))
    except TypeError as error:
        check.problems.append(f"the synthetic generator refuses these options: {error}")
    else:
        check.notes.append("its arguments parse and the generator takes them")


CHECKERS: dict[StepKind, Callable[[Step, PlanConfig, StepCheck], None]] = {
    StepKind.HOST_TOOL: _check_host_tool,
    StepKind.MAKE: _check_make,
    StepKind.PYTEST: _check_pytest,
    StepKind.RECSHIP: _check_recship,
    StepKind.SELF: _check_self,
}


def _capture(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Runs a short command of the dry check; its output (stdout and stderr) in `.stdout`."""
    try:
        return subprocess.run(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout_s, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, -1, f"timed out after {timeout_s:g} s")
    except OSError as error:
        return subprocess.CompletedProcess(argv, -1, str(error))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def print_dry_report(
    checks: Sequence[StepCheck], overall: Sequence[str], config: PlanConfig
) -> bool:
    """Prints the plan as a Markdown table and what the check found; True when it is sound."""
    print(f"# recship GPU check: the plan for a {config.cores}-core host (dry run)\n")
    print("| # | step | command | timeout s | what it proves |")
    print("|---|---|---|---|---|")
    for number, check in enumerate(checks, 1):
        step = check.step
        command = _display(step.argv, config)
        if step.server is not None:
            command = f"{_display(step.server, config)} & {command}"
        print(f"| {number} | {step.name} | `{command}` | {step.timeout_s:g} | {step.proves} |")
    total = sum(check.step.timeout_s for check in checks)
    print(f"\nTimeouts add up to {total:g} s of a {BUDGET_S:g} s budget.\n")
    sound = not overall
    for check in checks:
        for note in check.notes:
            print(f"ok       {check.step.name}: {note}")
        for problem in check.problems:
            print(f"PROBLEM  {check.step.name}: {problem}")
        sound = sound and not check.problems
    for problem in overall:
        print(f"PROBLEM  plan: {problem}")
    print("\nNot covered (no CLI option for it):")
    for gap in GAPS:
        print(f"- {gap}")
    print("\nthe plan is sound" if sound else "\nthe plan has problems (above)")
    return sound


def _display(argv: Sequence[str], config: PlanConfig) -> str:
    """A command as a person would type it: venv programs by name, scratch paths under $WORK."""
    programs = {config.recship: "recship", config.python: "python"}
    text = shlex.join(programs.get(arg, arg) for arg in argv)
    return text.replace(str(config.work), "$WORK").replace(str(ROOT) + "/", "")


# ---------------------------------------------------------------------------------------------
# The run


class Status(enum.Enum):
    """How a step ended."""

    PASSED = "passed"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED OUT"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StepResult:
    """How one step ended. `detail`: exit code, reason of a skip or failure."""

    step: Step
    status: Status
    seconds: float
    detail: str
    log: Path
    server_log: Path | None = None


class StepFailed(Exception):
    """A served step could not reach the point of running its command (message says why)."""

    def __init__(self, message: str, status: Status = Status.FAILED) -> None:
        super().__init__(message)
        self.status = status


def run_plan(
    plan: Sequence[Step], out: Path, on_result: Callable[[list[StepResult]], None]
) -> list[StepResult]:
    """Runs the steps in order, each within its timeout and the overall budget.

    A step is skipped when one of its inputs is an output of an earlier step that did not
    pass, or is missing; a failing step never stops the run. `on_result` gets the results so
    far after every step (the report is rewritten each time, so a killed run still leaves one).
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S - RESERVE_S
    producers: dict[Path, StepResult] = {}
    results: list[StepResult] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for number, step in enumerate(plan, 1):
        log = logs / f"{number:02d}-{step.name}.log"
        server_log = logs / f"{number:02d}-{step.name}.server.log" if step.server else None
        blocked = _blocked_by(step, producers)
        allowed = min(step.timeout_s, deadline - time.monotonic())
        if blocked:
            result = StepResult(step, Status.SKIPPED, 0.0, blocked, log)
        elif allowed <= STOP_GRACE_S:
            result = StepResult(step, Status.SKIPPED, 0.0, "the run's budget is spent", log)
        else:
            started = time.monotonic()
            status, detail = _run_step(step, log, server_log, allowed, env)
            result = StepResult(
                step, status, time.monotonic() - started, detail, log,
                server_log if server_log and server_log.exists() else None,
            )  # fmt: skip
        results.append(result)
        for path in step.outputs:
            producers[path] = result
        on_result(results)
    return results


def _blocked_by(step: Step, producers: dict[Path, StepResult]) -> str:
    for path in step.inputs:
        for output, result in producers.items():
            if (path == output or output in path.parents) and result.status is not Status.PASSED:
                return f"needs {path.name} from {result.step.name} ({result.status.value})"
        if not path.exists():
            return f"input {path} is missing"
    return ""


def _run_step(
    step: Step, log: Path, server_log: Path | None, allowed_s: float, env: dict[str, str]
) -> tuple[Status, str]:
    """Runs one step; whatever it started is dead when this returns."""
    deadline = time.monotonic() + allowed_s
    if step.server is None or server_log is None:
        return _run_command(step.argv, log, deadline, env)
    server = _start(step.server, server_log, env)
    if server is None:
        return Status.FAILED, f"cannot start {step.server[0]}"
    try:
        endpoints = _wait_announced(server, server_log, deadline - STOP_GRACE_S)
        _wait_serving(server, endpoints["{metrics}"], deadline - STOP_GRACE_S)
        argv = tuple(_fill(arg, endpoints) for arg in step.argv)
        # The server's own stop comes out of the step's time too.
        return _run_command(argv, log, deadline - STOP_GRACE_S, env)
    except StepFailed as error:
        log.write_text(f"{error}\n")
        return error.status, str(error)
    finally:
        _stop_group(server, STOP_GRACE_S)


def _run_command(
    argv: Sequence[str], log: Path, deadline: float, env: dict[str, str]
) -> tuple[Status, str]:
    """Runs `argv` in its own process group, output to `log`, until `deadline` (monotonic).

    SIGTERM goes to the group STOP_GRACE_S before the deadline, SIGKILL at it; the group is
    killed after a normal exit too, so nothing it started outlives the step.
    """
    process = _start(argv, log, env)
    if process is None:
        return Status.FAILED, f"{argv[0]}: no such program"
    try:
        code = process.wait(max(deadline - time.monotonic() - STOP_GRACE_S, 0.0))
    except subprocess.TimeoutExpired:
        _stop_group(process, STOP_GRACE_S)
        return Status.TIMED_OUT, "stopped at its timeout"
    _stop_group(process, 0.0)
    return (Status.PASSED, "exit 0") if code == 0 else (Status.FAILED, f"exit {code}")


def _start(argv: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """Starts `argv` as the leader of a new session (its own process group), or None."""
    with log.open("ab") as output:
        output.write(f"$ {shlex.join(argv)}\n".encode())
        output.flush()
        try:
            return subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        except OSError as error:
            output.write(f"{error}\n".encode())
            return None


def _stop_group(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """Ends the process's whole group: SIGTERM and up to `grace_s` for the leader to exit
    (skipped when 0), then SIGKILL to whatever is left of the group; reaps the leader."""
    if grace_s > 0 and _signal_group(process, signal.SIGTERM):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    _signal_group(process, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5.0)


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> bool:
    """Sends `signum` to the group the process leads; False when the group is gone."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        return False
    return True


def _wait_announced(server: subprocess.Popen[bytes], log: Path, deadline: float) -> dict[str, str]:
    """The server's endpoints from its `listening on H:P metrics M admin A` line."""
    while time.monotonic() < deadline:
        found = _ANNOUNCEMENT.search(log.read_text(errors="replace"))
        if found:
            server_at, metrics, admin = found.groups()
            if not metrics.isdigit():
                raise StepFailed(f"the server announced no metrics port: {found.group(0)!r}")
            return {"{server}": server_at, "{metrics}": f"127.0.0.1:{metrics}", "{admin}": admin}
        if server.poll() is not None:
            raise StepFailed(f"the server exited ({server.returncode}) before listening")
        time.sleep(0.05)
    raise StepFailed("the server did not announce its ports in time", Status.TIMED_OUT)


def _wait_serving(server: subprocess.Popen[bytes], metrics: str, deadline: float) -> None:
    """Polls the server's Prometheus endpoint until the bundle has a default version."""
    while time.monotonic() < deadline:
        try:
            wait_s = min(2.0, max(deadline - time.monotonic(), 0.1))
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=wait_s) as response:
                state = serving_state(response.read().decode(), BUNDLE)
        except (urllib.error.URLError, OSError):
            state = "starting"
        if state == "serving":
            return
        if state == "failed":
            raise StepFailed(f"every version of {BUNDLE} FAILED to load (see the server log)")
        if server.poll() is not None:
            raise StepFailed(f"the server exited ({server.returncode}) before serving")
        time.sleep(0.1)
    raise StepFailed(f"{BUNDLE} was not serving in time", Status.TIMED_OUT)


def serving_state(metrics_text: str, bundle: str) -> str:
    """Whether `bundle` is "serving", "failed" or "starting", from Prometheus exposition text.

    Serving: the bundle's `recship_default_version` is a version (> 0). Failed: it has none,
    a version is FAILED and none is still NEW or LOADING (`recship_version_state`).
    """
    defaults = _samples(metrics_text, "recship_default_version", bundle)
    if any(value > 0 for _, value in defaults):
        return "serving"
    versions = _samples(metrics_text, "recship_version_state", bundle)
    states = {labels.get("state") for labels, value in versions if value == 1}
    if "FAILED" in states and not states & {"NEW", "LOADING"}:
        return "failed"
    return "starting"


def _samples(metrics_text: str, name: str, bundle: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of metric `name` labelled with `bundle`."""
    samples = []
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels_text, _, value = line[len(name) :].rpartition(" ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', labels_text))
        if labels.get("bundle") == bundle:
            samples.append((labels, float(value)))
    return samples


def _fill(arg: str, endpoints: dict[str, str]) -> str:
    for token, value in endpoints.items():
        arg = arg.replace(token, value)
    return arg


# ---------------------------------------------------------------------------------------------
# The report


def bench_rows(text: str) -> dict[str, dict[str, str]]:
    """The rows of `recship bench`'s table in `text`, by server label, cells by column name."""
    header: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if line.count("┃") >= 2:
            header = [cell.strip() for cell in line.strip().strip("┃").split("┃")]
        elif header and line.count("│") >= 2:
            cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
            if len(cells) == len(header):
                rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


BENCH_COLUMNS = ("QPS", "p50 ms", "p99 ms", "errors", "rows/batch", "requests/batch",
                 "server CPU ms/req")  # fmt: skip


def write_report(
    path: Path, results: Sequence[StepResult], started: datetime, commit: str, wall_s: float
) -> None:
    """Writes the Markdown report of a (possibly unfinished) run, atomically."""
    counts = {status: sum(r.status is status for r in results) for status in Status}
    lines = [
        "# recship GPU check",
        "",
        "| | |",
        "|---|---|",
        f"| host | {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()} |",
        f"| commit | {commit} |",
        f"| started | {started:%Y-%m-%d %H:%M:%S} UTC |",
        f"| wall | {wall_s:.0f} s of a {BUDGET_S:g} s budget |",
        "| result | " + ", ".join(f"{n} {s.value}" for s, n in counts.items() if n) + " |",
        "",
        "## Steps",
        "",
        "| # | step | status | seconds | timeout s | detail | what it proves | log |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, r in enumerate(results, 1):
        logs = f"`logs/{r.log.name}`" + (f", `logs/{r.server_log.name}`" if r.server_log else "")
        lines.append(
            f"| {number} | {r.step.name} | {r.status.value} | {r.seconds:.1f} | "
            f"{r.step.timeout_s:g} | {r.detail} | {r.step.proves} | {logs} |"
        )
    lines += _bench_tables(results)
    lines += ["", "## Not covered by this check", "", *(f"- {gap}" for gap in GAPS)]
    for r in results:
        if r.step.show_output or r.status in (Status.FAILED, Status.TIMED_OUT):
            lines += _log_tail(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text("\n".join(lines) + "\n")
    os.replace(staged, path)


def _bench_tables(results: Sequence[StepResult]) -> list[str]:
    tables: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for r in results:
        if r.step.table is None:
            continue
        title, label = r.step.table
        rows = bench_rows(r.log.read_text(errors="replace")) if r.status is Status.PASSED else {}
        entries = tables.setdefault(title, [])
        if not rows:
            entries.append((label, {"QPS": f"no result ({r.status.value})"}))
        for server, cells in rows.items():
            entries.append((label if server == "batched" else f"{label}, {server}", cells))
    lines: list[str] = []
    for title, entries in tables.items():
        unbatched = next(
            (_number(c.get("QPS")) for n, c in entries if n.endswith(", unbatched")), None
        )
        lines += ["", f"## {title}", "", f"Recommend, concurrency {BENCH_CONCURRENCY}, "
                  f"{BENCH_DURATION_S:g} s after a {BENCH_WARMUP_S:g} s warm-up.", ""]  # fmt: skip
        lines.append("| run | " + " | ".join(BENCH_COLUMNS) + " | QPS vs unbatched |")
        lines.append("|---" * (len(BENCH_COLUMNS) + 2) + "|")
        for name, cells in entries:
            qps = _number(cells.get("QPS"))
            ratio = f"x{qps / unbatched:.2f}" if qps is not None and unbatched else "-"
            row = [cells.get(column, "-") for column in BENCH_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(row) + f" | {ratio} |")
    return lines


def _number(text: str | None) -> float | None:
    try:
        return float(text or "")
    except ValueError:
        return None


def _log_tail(result: StepResult, lines: int = 40) -> list[str]:
    out = ["", f"## {result.step.name}: {result.status.value}, last lines of its log", ""]
    for log in (result.log, result.server_log):
        if log is None or not log.exists():
            continue
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out += [f"`logs/{log.name}`:", "", "```text", *tail, "```", ""]
    return out


def _commit() -> str:
    result = _capture(("git", "rev-parse", "--short", "HEAD"), 10)
    return result.stdout.strip() if result.returncode == 0 else "unknown (no git checkout)"


def pack_logs(out: Path) -> None:
    """Replaces `out/logs/` by `out/logs.tar.gz` (for hosts that take back only a few files)."""
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        archive.add(out / "logs", arcname="logs")
    shutil.rmtree(out / "logs")


# ---------------------------------------------------------------------------------------------
# The synthetic-data step


def _synthetic_writers() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(the synthetic generator, the MovieLens writer) of recship's trainer."""
    from recship.trainer.data.movielens import write_movielens
    from recship.trainer.data.synthetic import generate

    return generate, write_movielens


def _synthetic_options(options: argparse.Namespace) -> dict[str, int]:
    return {key: getattr(options, key) for key in SYNTHETIC}


def write_synthetic(folder: Path, options: dict[str, int]) -> None:
    """Writes synthetic data as a MovieLens folder: read back through the built-in feature
    spec, it has raw ids and fitted transforms, which `recship package` needs (the bare
    `synthetic` source has none, and ML-100K needs the network)."""
    generate, write_movielens = _synthetic_writers()
    write_movielens(generate(**options), folder)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the device check (or --dry-run: check its plan)")
    run.add_argument("--dry-run", action="store_true", help="check the plan; run nothing")
    run.add_argument("--out", type=Path, default=None,
                     help="report folder [default: $OUT when set, else gpu-check-out]")  # fmt: skip
    run.add_argument("--venv", type=Path, default=ROOT / ".venv", help="the venv to install into")
    run.add_argument("--work", type=Path, default=None,
                     help="scratch folder, kept [default: a temporary one, removed]")  # fmt: skip
    run.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                     help="CPU cores to plan for [default: this host's]")  # fmt: skip
    run.add_argument("--pack-logs", action="store_true",
                     help="leave logs.tar.gz, not logs/ (for few files to carry back)")  # fmt: skip
    data = commands.add_parser("synthetic-data", help="write the check's data set (a step)")
    data.add_argument("folder", type=Path)
    for key, value in SYNTHETIC.items():
        data.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 when the plan is sound (dry run) or every step passed."""
    options = build_parser().parse_args(argv)
    if options.command == "synthetic-data":
        write_synthetic(options.folder, _synthetic_options(options))
        return 0
    venv = options.venv.absolute()
    if options.dry_run:
        work = options.work or Path(tempfile.gettempdir()) / "recship-gpu-check-work"
        config = PlanConfig(venv, work.absolute(), options.cores)
        checks, overall = check_plan(build_plan(config), config)
        return 0 if print_dry_report(checks, overall, config) else 1
    gpus = _capture(("nvidia-smi", "-L"), 20)
    if gpus.returncode != 0 or "GPU" not in gpus.stdout:
        # Its install step would put the CUDA builds into the venv of a host that cannot use them.
        print(f"no NVIDIA GPU visible here (`nvidia-smi -L`: {_last_line(gpus.stdout)}); "
              "check the plan with --dry-run instead", file=sys.stderr)  # fmt: skip
        return 2
    out = (options.out or Path(os.environ.get("OUT") or ROOT / "gpu-check-out")).absolute()
    if options.work is not None and options.work.exists() and any(options.work.iterdir()):
        print(f"--work {options.work} must be empty or new", file=sys.stderr)
        return 2
    work = options.work or Path(tempfile.mkdtemp(prefix="recship-gpu-check-"))
    config = PlanConfig(venv, work.absolute(), options.cores)
    for stale in ("report.md", "logs", "logs.tar.gz"):
        target = out / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    started, clock, commit = datetime.now(UTC), time.monotonic(), _commit()
    report = out / "report.md"
    try:
        results = run_plan(
            build_plan(config), out,
            lambda so_far: write_report(report, so_far, started, commit, time.monotonic() - clock),
        )  # fmt: skip
    finally:
        if options.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if options.pack_logs:
        pack_logs(out)
    print(f"report: {report}")
    return 0 if all(r.status is Status.PASSED for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
