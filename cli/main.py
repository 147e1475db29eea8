"""The `recship` command line: a thin click layer over library functions.

The root group imports each subcommand's module only when that subcommand runs, so
`recship --help` and `recship --version` answer without importing torch.
"""

from __future__ import annotations

import importlib
from importlib import metadata

import click

from recship.base.commands import run

# Subcommand name -> "module:attribute" of its click command, imported on first use.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("recship.cli.doctor", "doctor_command"),
    "demo": ("recship.cli.demo", "demo_command"),
    "train": ("recship.trainer.cli", "train_command"),
    "serve": ("recship.runtime.serve_cli", "serve_command"),
    "query": ("recship.runtime.serve_cli", "query_command"),
    "status": ("recship.runtime.serve_cli", "status_command"),
    "rollout": ("recship.runtime.rollout", "rollout_command"),
    "bench": ("recship.runtime.bench", "bench_command"),
    "data": ("recship.trainer.data_cli", "data_command"),
    "package": ("recship.packager.cli", "package_command"),
    "inspect": ("recship.bundle.cli", "inspect_command"),
    "verify": ("recship.bundle.cli", "verify_command"),
    "keygen": ("recship.bundle.cli", "keygen_command"),
}

SHORT_HELP: dict[str, str] = {
    "doctor": "Check that torch, torchrec, fbgemm_gpu and faiss work together here.",
    "demo": "Run the end-to-end pipeline on built-in defaults.",
    "serve": "Serve bundles over gRPC (Retrieve, Rank, Recommend) with dynamic batching.",
    "query": "Send one Recommend or Retrieve query to a running server and print a table.",
    "status": "Show a server's bundles and versions (admin API): states, defaults, reasons.",
    "rollout": "Move servers to a bundle version one at a time; roll all back if one fails.",
    "bench": "Closed-loop load against a server: QPS, latency percentiles, batch sizes.",
    "train": "Train a sharded two-tower or DLRM model (TorchRec, N ranks) with DCP checkpoints.",
    "data": "Fetch data sets (movielens-100k) into the local cache and describe data sources.",
    "package": "Quantize, export, index and verify checkpoints into a versioned bundle.",
    "inspect": "Summarise a bundle version: files, sizes, schema, quality.",
    "verify": "Re-check a bundle version as a server would (and its signature), then self-test.",
    "keygen": "Create an EC key pair for signing bundles (package --sign-key).",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The root help lists summaries from SHORT_HELP instead of importing every command.
        with formatter.section("Commands"):
            formatter.write_dl([(name, SHORT_HELP[name]) for name in self.list_commands(ctx)])


def _version() -> str:
    try:
        return metadata.version("recship")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="recship")
def cli() -> None:
    """recship: two-stage recommenders from TorchRec training to a versioned gRPC service."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the CLI; a `RecshipError` becomes one line and its exit code."""
    run(cli, argv, "recship")
