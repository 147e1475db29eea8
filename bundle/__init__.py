"""recship.bundle: the bundle format, owned once, for every reader and writer.

A published version is `<repo>/<name>/<version>/`; `bundle/FORMAT.md` documents each of its
files. One module per file of a version (`manifest`, `index`, `item_features`, `golden`,
`entrypoints`) plus the repository's `layout`, `checksums`, library `compat`ibility, the
`store` that lists and validates versions and the `writer` that publishes them atomically.
The packager writes through this layer and the runtime reads through it; it imports only
`recship.base` and `recship.protos`.
"""

if __name__ != "recship.bundle":
    # Running from the repository root puts this folder on sys.path as a bare "bundle" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.bundle, not {__name__!r}")
