"""recship.trainer.data: data sources and TorchRec batches for two-tower and DLRM training.

Sources (MovieLens-format directories, Criteo TSV files, a synthetic generator) produce numpy
tables in memory (`dataset`), described by a stable feature schema (`schema`); `batches` turns
them into `KeyedJaggedTensor` batches sharded over training ranks.
"""

if __name__ != "recship.trainer.data":
    # Running from the repository root puts this folder on sys.path as a bare "trainer" module;
    # refuse it so that only the namespaced import exists.
    raise ImportError(f"import recship.trainer.data, not {__name__!r}")
