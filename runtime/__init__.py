"""recship.runtime: the gRPC serving runtime, the CLI root and clients."""

if __name__ != "recship.runtime":
    # Running from the repository root puts this folder on sys.path as a bare "runtime" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.runtime, not {__name__!r}")
