"""recship.cli: the `recship` command's root group, `recship demo` and `recship doctor`.

The top layer: it may import every other one. Each subcommand lives with the layer it drives
(`recship.trainer.cli`, `recship.packager.cli`, `recship.bundle.cli`, `recship.runtime.serve_cli`)
and is imported only when it runs.
"""

if __name__ != "recship.cli":
    # Running from the repository root puts this folder on sys.path as a bare "cli" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.cli, not {__name__!r}")
