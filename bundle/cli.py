"""`recship inspect` and `recship verify`: read a published version, change nothing.

Thin click layers over the bundle layer, so that checking a bundle needs neither the trainer
nor the packager. `print_summary` is the one table set describing a version; `recship
package` prints it after publishing and `recship demo` after its packaging step.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from recship.base.errors import InvalidInput, RecshipError, clip
from recship.bundle.layout import BundleRef
from recship.bundle.manifest import END_TO_END_PREFIX
from recship.protos.v1 import manifest_pb2


class VerificationFailed(RecshipError):
    """`recship verify` found a damaged or invalid version or a failing golden self-test."""

    exit_code = 1


def _size(num_bytes: float) -> str:
    """A byte count for people: 512 B, 3.5 KiB, 1.2 MiB, 4.0 GiB."""
    if num_bytes < 1024:
        return f"{num_bytes:.0f} B"
    for unit in ("KiB", "MiB"):
        num_bytes /= 1024
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
    return f"{num_bytes / 1024:.1f} GiB"


def print_summary(
    console: Console,
    ref: BundleRef,
    manifest: manifest_pb2.BundleManifest,
    stage_seconds: dict[str, float] | None = None,
) -> None:
    """Prints the tables `package` ends with and `inspect` shows: sizes, quality, timings."""
    header = Table(title=f"bundle {ref.name} version {ref.version}", show_header=False)
    header.add_row("path", str(ref.path))
    header.add_row("release", manifest.release_id)
    header.add_row("created", manifest.created_at.ToJsonString())
    header.add_row("devices", f"{manifest.sharding.device_count} x {manifest.sharding.device_type}")
    header.add_row(
        "index",
        f"{manifest.index.factory} ({manifest.index.num_vectors} items, "
        f"recall@100 vs exact {manifest.index.recall_at_100_vs_exact:.3f})",
    )
    header.add_row(
        "libraries",
        f"torch {manifest.libraries.torch}, torchrec "
        f"{manifest.libraries.torchrec}, fbgemm_gpu {manifest.libraries.fbgemm_gpu}, "
        f"faiss {manifest.libraries.faiss}",
    )
    console.print(header)

    sizes = Table(title="embedding tables")
    for column in ("model", "table", "rows x dim", "quant", "fp32", "packaged", "ratio"):
        sizes.add_column(
            column, justify="right" if column in ("fp32", "packaged", "ratio") else "left"
        )
    dims = {(t.model, t.name): t for t in manifest.schema.tables}
    fp32_total = packaged_total = 0
    for table in manifest.quantization:
        spec = dims.get((table.model, table.table))
        shape = f"{spec.num_embeddings} x {spec.embedding_dim}" if spec else "?"
        fp32_total += table.fp32_bytes
        packaged_total += table.packaged_bytes
        sizes.add_row(
            manifest_pb2.ModelRole.Name(table.model).removeprefix("MODEL_ROLE_").lower(),
            table.table,
            shape,
            manifest_pb2.QuantDtype.Name(table.dtype).removeprefix("QUANT_DTYPE_").lower(),
            _size(table.fp32_bytes),
            _size(table.packaged_bytes),
            f"{table.fp32_bytes / max(table.packaged_bytes, 1):.2f}x",
        )
    sizes.add_row(
        "all",
        "",
        "",
        "",
        _size(fp32_total),
        _size(packaged_total),
        f"{fp32_total / max(packaged_total, 1):.2f}x",
        style="bold",
    )
    console.print(sizes)

    files = Table(title="files")
    files.add_column("file")
    files.add_column("size", justify="right")
    files.add_column("sha256")
    for entry in manifest.files:
        files.add_row(entry.path, _size(entry.size_bytes), entry.sha256[:16])
    console.print(files)

    report = manifest.quality
    verdict = "UNGATED" if report.ungated else ("passed" if report.passed else "FAILED")
    title = f"quality gate {verdict}" + (f" on {report.eval_source}" if report.eval_source else "")
    quality = Table(title=title)
    for column in ("check", "value", "threshold", "ok"):
        quality.add_column(column)
    for check in manifest.quality.checks:
        quality.add_row(
            check.name,
            f"{check.value:.4f}",
            f"{check.comparison} {check.threshold:g}",
            "yes" if check.passed else "NO",
        )
    console.print(quality)
    metrics = Table(title="quality metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for key in sorted(manifest.quality.metrics):
        if not key.startswith(END_TO_END_PREFIX):  # shown in the table below
            metrics.add_row(key, f"{manifest.quality.metrics[key]:.4f}")
    console.print(metrics)
    if report.HasField("end_to_end"):
        console.print(_end_to_end_table(report, manifest.serving.retrieve_k))
    if stage_seconds:
        timings = Table(title="stages")
        timings.add_column("stage")
        timings.add_column("seconds", justify="right")
        for stage, seconds in stage_seconds.items():
            timings.add_row(stage, f"{seconds:.1f}")
        timings.add_row("total", f"{sum(stage_seconds.values()):.1f}", style="bold")
        console.print(timings)


def _end_to_end_table(report: manifest_pb2.QualityReport, default_k: int) -> Table:
    """Popularity, retrieval alone and Recommend at each retrieve_k of the packager's sweep."""
    measured = report.end_to_end
    n = measured.top_n
    table = Table(title=f"top {n} on {measured.users} validation users (training items excluded)")
    for column in ("pipeline", f"recall@{n}", f"NDCG@{n}", "vs retrieval"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    base_recall, base_ndcg = measured.retrieval_recall, measured.retrieval_ndcg

    def versus(recall: float, ndcg: float) -> str:
        if base_recall <= 0 or base_ndcg <= 0:
            return ""
        return f"{recall / base_recall - 1:+.1%} / {ndcg / base_ndcg - 1:+.1%}"

    popularity = (
        report.metrics.get(f"{END_TO_END_PREFIX}popularity/recall@{n}"),
        report.metrics.get(f"{END_TO_END_PREFIX}popularity/ndcg@{n}"),
    )
    if None not in popularity:
        recall, ndcg = popularity
        table.add_row("popularity", f"{recall:.4f}", f"{ndcg:.4f}", versus(recall, ndcg))
    table.add_row("retrieval alone", f"{base_recall:.4f}", f"{base_ndcg:.4f}", "")
    for point in measured.sweep:
        chosen = point.retrieve_k == default_k
        table.add_row(
            f"Recommend, retrieve_k {point.retrieve_k}" + (" (default)" if chosen else ""),
            f"{point.recall:.4f}",
            f"{point.ndcg:.4f}",
            versus(point.recall, point.ndcg),
            style="bold" if chosen else None,
        )
    return table


def _parse_bundle_path(target: str, version_required: bool) -> tuple[Path, str, int | None]:
    """Splits REPO/NAME[/VERSION] into its parts."""
    path = Path(target)
    version: int | None = None
    if path.name.isdigit():
        version = int(path.name)
        path = path.parent
    if version_required and version is None:
        raise InvalidInput(f"{target}: expected REPO/NAME/VERSION (e.g. repo/movies/3)")
    if not path.name:
        raise InvalidInput(f"{target}: expected REPO/NAME[/VERSION]")
    return path.parent, path.name, version


@click.command("inspect")
@click.argument("target")
def inspect_command(target: str) -> None:
    """Summarise REPO/NAME[/VERSION]: files, sizes fp32 vs packaged, schema, quality."""
    from recship.bundle.store import BundleStore

    repo, name, version = _parse_bundle_path(target, version_required=False)
    store = BundleStore(repo)
    validated = (
        store.validate_latest(name, checksums=False)
        if version is None
        else store.validate(name, version, checksums=False)
    )
    console = Console()
    console.print(f"versions of {name}: {', '.join(map(str, store.list_versions(name)))}")
    print_summary(console, validated.ref, validated.manifest)
    schema = Table(title="features")
    for column in ("feature", "side", "ids", "multi-valued", "used by"):
        schema.add_column(column)
    for feature in validated.manifest.schema.sparse_features:
        schema.add_row(
            feature.name,
            manifest_pb2.FeatureSide.Name(feature.side).removeprefix("FEATURE_SIDE_").lower(),
            str(feature.cardinality),
            "yes" if feature.multi_valued else "",
            ", ".join(
                manifest_pb2.ModelRole.Name(role).removeprefix("MODEL_ROLE_").lower()
                for role in feature.used_by
            ),
        )
    console.print(schema)
    dense = ", ".join(validated.manifest.schema.dense_features) or "none"
    console.print(
        f"dense features: {dense} "
        f"(first {validated.manifest.schema.query_dense_count} sent by clients)"
    )


@click.command("verify")
@click.argument("target")
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="PEM public key: the version must carry a MANIFEST.sig that verifies "
                   "with it.")  # fmt: skip
def verify_command(target: str, public_key: Path | None) -> None:
    """Re-check REPO/NAME/VERSION as a server would, then rerun its golden self-test; exit 0/1.

    The checks are the server's: the store's (`BundleStore.validate`: manifest bounds, schema
    and declared shapes, every file's kind, size and sha256, the signature with --public-key,
    library compatibility, file headers), then what the server checks as it loads the files
    (index ids and shape, item table arrays, golden record shapes, embedding table sizes),
    then the golden self-test of every entry point file the manifest lists, and the raw golden
    queries: the query tower files on their recorded inputs, and the transforms encoding them
    to those inputs. A problem exits non-zero with one line naming it.
    """
    from recship.bundle.store import BundleStore

    repo, name, version = _parse_bundle_path(target, version_required=True)
    store = BundleStore(repo, public_key=public_key, require_signature=public_key is not None)
    try:
        validated = store.validate(name, version or 0)
    except InvalidInput as error:
        raise VerificationFailed(str(error)) from None
    ref, manifest = validated.ref, validated.manifest
    console = Console()
    console.print(f"checksums: {len(manifest.files)} files ok")
    if validated.signed:
        console.print(f"signature: MANIFEST.sig verified with {public_key}")
    for warning in validated.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    try:
        failures = _check_contents(console, ref, manifest)
    except InvalidInput as error:
        raise VerificationFailed(f"{ref}: {error}") from None
    if failures:
        raise VerificationFailed(f"{ref}: " + "; ".join(failures))
    console.print(f"{ref}: verified")


def _check_contents(console: Console, ref: BundleRef, manifest: manifest_pb2.BundleManifest):
    """What a server checks while loading the files (`read_contents`), then the golden
    self-test and the raw golden queries.

    Returns the self-test failures; raises InvalidInput for a file that disagrees with the
    manifest.
    """
    from recship.bundle.contents import read_contents
    from recship.bundle.entrypoints import check_embedding_tables, first_line, load_entry_point
    from recship.bundle.golden import check_golden, check_raw_output, describe_failures
    from recship.bundle.layout import QUERY_TOWER
    from recship.bundle.raw_queries import raw_golden_problems

    contents = read_contents(manifest, ref.path)
    transforms, golden_set = contents.transforms, contents.golden
    console.print(
        "contents: index, item and user tables, transforms and golden record match the manifest"
        " and each other"
    )
    results_table = Table(title=f"golden self-test of {ref}")
    for column in ("entry point", "file", "max abs diff", "ok"):
        results_table.add_column(column)
    failures = []
    for entry in manifest.entry_points:
        module = load_entry_point(ref.path / entry.file)
        check_embedding_tables(module, entry, manifest)
        try:
            results = check_golden({entry.name: module}, golden_set)
        except Exception as error:  # an entry point that cannot run its own golden inputs
            raise InvalidInput(
                f"{entry.file}: fails on its golden inputs: {clip(first_line(error), 200)}"
            ) from None
        result = results[entry.name]
        results_table.add_row(
            escape(entry.name),
            escape(entry.file),
            f"{result.max_abs_diff:.2e}",
            "yes" if result.passed else "NO",
        )
        failures.extend(f"{entry.file}: {line}" for line in describe_failures(results, golden_set))
        if entry.name == QUERY_TOWER and golden_set.raw is not None:
            try:
                raw = check_raw_output(module, golden_set)
            except Exception as error:  # a query tower that cannot run the raw queries' inputs
                raise InvalidInput(
                    f"{entry.file}: fails on its raw golden inputs: {clip(first_line(error), 200)}"
                ) from None
            results_table.add_row(
                "query_tower from raw values",
                escape(entry.file),
                f"{raw.max_abs_diff:.2e}",
                "yes" if raw.passed else "NO",
            )
            if not raw.passed:
                failures.append(
                    f"{entry.file}: differs on the raw golden queries by up to "
                    f"{raw.max_abs_diff:.3g} (atol {golden_set.atol:g}, rtol {golden_set.rtol:g})"
                )
    console.print(results_table)
    # Python's encoding of the raw queries, with this version's transforms, must reproduce the
    # recorded inputs: what a host in another language checks with its own encoder.
    if golden_set.raw is None:
        console.print("raw golden queries: none recorded (packaged before they were)")
    else:
        problems = raw_golden_problems(golden_set, transforms)
        failures.extend(problems)
        if not problems:
            console.print(
                f"raw golden queries: {len(golden_set.raw.queries)} encode to the recorded inputs"
            )
    return failures


@click.command("keygen")
@click.option("--out", "private_key", type=click.Path(path_type=Path), required=True,
              help="Where the private signing key goes (PEM, mode 0600); never "
                   "overwritten.")  # fmt: skip
@click.option("--public-out", "public_key", type=click.Path(path_type=Path), default=None,
              help="Where its public key goes [default: OUT with .pub.pem].")  # fmt: skip
def keygen_command(private_key: Path, public_key: Path | None) -> None:
    """Create an EC P-256 key pair for `recship package --sign-key` and `--public-key`."""
    from recship.bundle.signature import generate_key_pair

    public_key = public_key or private_key.with_name(private_key.stem + ".pub.pem")
    generate_key_pair(private_key, public_key)
    Console().print(
        f"private key {private_key} (keep it secret; `recship package --sign-key`)\n"
        f"public key  {public_key} (`recship serve --require-signature --public-key`, "
        "`recship verify --public-key`)"
    )
