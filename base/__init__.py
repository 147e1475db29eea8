"""recship.base: what every layer shares and nothing else.

Errors with their CLI exit codes (no gRPC: transport codes are the runtime's edge), crash-safe
file writes, jagged id arrays and entity tables, the library facts a bundle records, and the one
way a command turns an error into a line and an exit code. It imports no other recship layer.
"""

if __name__ != "recship.base":
    # Running from the repository root puts this folder on sys.path as a bare "base" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.base, not {__name__!r}")
