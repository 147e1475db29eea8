"""recship.packager: checkpoints to quantized, scripted, indexed, versioned bundles."""

if __name__ != "recship.packager":
    # Running from the repository root puts this folder on sys.path as a bare "packager" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.packager, not {__name__!r}")
