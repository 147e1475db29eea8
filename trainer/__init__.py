"""recship.trainer: sharded TorchRec training of two-tower and DLRM models."""

if __name__ != "recship.trainer":
    # Running from the repository root puts this folder on sys.path as a bare "trainer" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.trainer, not {__name__!r}")
