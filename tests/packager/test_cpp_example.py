"""examples/cpp builds against the torch and pyarrow wheels and passes a bundle's golden
self-test, its raw golden queries encoded in C++ from the bundle's transforms included.

The test builds `recship_golden_check` with CMake in a temporary folder, exports the int8 entry
points (TorchScript for both, AOTInductor for the ranker), transforms of every kind the packaged
synthetic bundle lacks (hashed, multi-valued with a separator, a pattern with a missing bucket,
clipped and standardized dense values, a derived dense value) and a golden file with raw golden
queries into a directory laid out like a bundle version, and runs the program on it: it must
load everything through libtorch + fbgemm_gpu's libraries, encode the raw queries to the
recorded inputs and reproduce the recorded outputs (exit 0), and notice a tampered recording, a
tampered vocabulary or changed transforms (exit 1). A bundle packaged from trained models
(categorical ids, a zip prefix with an OOV bucket, cold starts on defaults) passes in both
formats.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch

from recship.bundle.entrypoints import load_entry_point
from recship.bundle.golden import GoldenRecord, read_golden, write_golden
from recship.bundle.raw_queries import record_raw_queries
from recship.bundle.transforms import (
    Derivation,
    FeatureTransform,
    Transforms,
    Vocabulary,
    write_transforms,
)
from recship.packager.export import export_aoti, export_torchscript

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cmake") is None or shutil.which("g++") is None,
        reason="needs cmake and g++ to build examples/cpp",
    ),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"
ATOL, RTOL = 1e-5, 1e-5
RAW_ROW = "query_tower from raw values"
# The test query tower's features (tests/packager/conftest.py) and the query-side dense ones.
QUERY_FEATURES = ("user_id", "user_age", "user_genres")
QUERY_DENSE = ("user_spend", "user_score", "user_tenure")
GENRES = ("action", "comedy", "drama", "horror", "romance", "sci-fi", "thriller", "western")


def _transforms() -> Transforms:
    """Transforms for the test query tower's tables (1000, 10 and 20 rows) and three dense
    features, with the kinds and derivations the packaged synthetic bundle does not have."""
    features = [
        FeatureTransform("user_id", "user", "hashed", cardinality=1000, seed=11, buckets=1000),
        FeatureTransform(
            "user_age", "user", "bucketized", cardinality=10,
            boundaries=(18.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0, 85.0), missing_bucket=True,
            default="unknown", derivation=Derivation(pattern=r"(\d+)"),
        ),
        FeatureTransform(
            "user_genres", "user", "categorical", multi_valued=True, cardinality=len(GENRES) + 1,
            vocabulary=Vocabulary(pa.array(GENRES)), oov="bucket", default="", max_length=5,
            derivation=Derivation(separator="|"),
        ),
        FeatureTransform(
            "user_spend", "user", "dense", clip_min=0.0, clip_max=1000.0, log1p=True, mean=3.2,
            std=1.1, default=0,
        ),
        FeatureTransform("user_score", "user", "dense", mean=0.5, std=0.25),
        FeatureTransform(
            "user_tenure", "user", "dense", log1p=True,
            derivation=Derivation(pattern=r"(\d+(?:\.\d+)?)"),
        ),
    ]  # fmt: skip
    return Transforms({f.name: f for f in features}, user_key=None, item_key=None)


def _fbgemm_dir() -> str:
    import fbgemm_gpu

    return os.path.dirname(fbgemm_gpu.__file__)


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def golden_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built `recship_golden_check` binary."""
    build = tmp_path_factory.mktemp("cpp-build")
    configure = _run(
        [
            "cmake",
            "-S",
            str(EXAMPLE),
            "-B",
            str(build),
            f"-DPython3_EXECUTABLE={sys.executable}",
        ],
        timeout=300,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = _run(["cmake", "--build", str(build), "-j2"], timeout=900)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    return build / "recship_golden_check"


@pytest.fixture(scope="module")
def bundle(
    entry_case: Callable[[str, int], Any],
    entry_inputs: Callable[..., tuple[torch.Tensor, ...]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """query_tower.pt, ranker.pt, ranker.pt2, transforms.json + vocab/ and golden.pt (batch 16,
    unseen inputs, and 16 raw golden queries made from the transforms)."""
    folder = tmp_path_factory.mktemp("bundle")
    records = {}
    for name in ("query_tower", "ranker"):
        case = entry_case(name, 1)
        export_torchscript(case.module, case.inputs, folder / f"{name}.pt")
        inputs = entry_inputs(name, 16, 21)
        with torch.no_grad():
            records[name] = GoldenRecord(inputs, case.module(*inputs))
    ranker = entry_case("ranker", 1)
    export_aoti(ranker.module, ranker.inputs, folder / "ranker.pt2")
    transforms = _transforms()
    write_transforms(folder, transforms)
    tower = load_entry_point(folder / "query_tower.pt")
    raw = record_raw_queries(transforms, tower, QUERY_FEATURES, QUERY_DENSE)
    write_golden(folder / "golden.pt", records, ATOL, RTOL, raw)
    return folder


def _rows(stdout: str) -> dict[tuple[str, str], tuple[float, str]]:
    """(check, file) -> (max abs diff, verdict) of every result row of the program's table."""
    rows = {}
    for line in stdout.splitlines():
        if line.endswith(("PASS", "FAIL")):
            *name, file, diff, _, verdict = line.split()
            rows[(" ".join(name), file)] = (float(diff), verdict)
    return rows


def _linked_copy(bundle: Path, folder: Path, *replaced: str) -> Path:
    """`folder` holding links to the bundle's files, except `replaced` (left for the caller)."""
    for path in bundle.iterdir():
        if path.name not in replaced:
            (folder / path.name).symlink_to(path)
    return folder


def test_cpp_reproduces_recorded_outputs(golden_check: Path, bundle: Path) -> None:
    result = _run([str(golden_check), str(bundle), "--fbgemm-dir", _fbgemm_dir()], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(result.stdout)
    assert list(rows) == [
        ("query_tower", "query_tower.pt"),
        ("ranker", "ranker.pt"),
        ("ranker", "ranker.pt2"),
        (RAW_ROW, "query_tower.pt"),
    ]
    assert all(verdict == "PASS" and diff <= 1e-6 for diff, verdict in rows.values()), rows


def test_cpp_fails_on_a_tampered_recording(
    golden_check: Path, bundle: Path, tmp_path: Path
) -> None:
    _linked_copy(bundle, tmp_path, "golden.pt")
    golden = read_golden(bundle / "golden.pt")
    records = dict(golden.records)
    ranker = records["ranker"]
    records["ranker"] = GoldenRecord(ranker.inputs, ranker.output + 0.01)
    write_golden(tmp_path / "golden.pt", records, golden.atol, golden.rtol, golden.raw)

    env = {**os.environ, "RECSHIP_FBGEMM_DIR": _fbgemm_dir()}
    result = subprocess.run(
        [str(golden_check), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = {row: verdict for row, (_, verdict) in _rows(result.stdout).items()}
    assert verdicts == {
        ("query_tower", "query_tower.pt"): "PASS",
        ("ranker", "ranker.pt"): "FAIL",
        ("ranker", "ranker.pt2"): "FAIL",
        (RAW_ROW, "query_tower.pt"): "PASS",
    }


def _swap_genres(feature: FeatureTransform) -> FeatureTransform:
    """Two genres' ids swapped in a consistent vocabulary file (its hash index rebuilt)."""
    values = list(GENRES)
    values[0], values[1] = values[1], values[0]
    return dataclasses.replace(feature, vocabulary=Vocabulary(pa.array(values)))


@pytest.mark.parametrize(
    ("feature", "change", "why"),
    [
        ("user_genres", _swap_genres, "user_genres of raw query"),
        ("user_spend", lambda f: dataclasses.replace(f, mean=f.mean + 0.5), "user_spend of raw"),
        ("user_id", lambda f: dataclasses.replace(f, seed=12), "user_id of raw query"),
        # Without its missing bucket, the query sending a text with no number is refused.
        ("user_age", lambda f: dataclasses.replace(f, missing_bucket=False), "has no bucket"),
        ("user_genres", lambda f: dataclasses.replace(f, max_length=4), "5 values, at most 4"),
        (
            "user_tenure",
            lambda f: dataclasses.replace(f, derivation=Derivation(pattern=r"(\d)")),
            "user_tenure of raw query",
        ),
    ],
)
def test_cpp_raw_check_fails_on_changed_transforms(
    golden_check: Path,
    bundle: Path,
    tmp_path: Path,
    feature: str,
    change: Callable[[FeatureTransform], FeatureTransform],
    why: str,
) -> None:
    _linked_copy(bundle, tmp_path, "transforms.json", "vocab")
    transforms = _transforms()
    features = {**transforms.features, feature: change(transforms.features[feature])}
    write_transforms(tmp_path, dataclasses.replace(transforms, features=features))
    result = _run([str(golden_check), str(tmp_path), "--fbgemm-dir", _fbgemm_dir()], timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    verdicts = {row: verdict for row, (_, verdict) in _rows(result.stdout).items()}
    assert verdicts.pop((RAW_ROW, "query_tower.pt")) == "FAIL"
    assert set(verdicts.values()) == {"PASS"}
    assert f"{RAW_ROW}: " in result.stdout and why in result.stdout, result.stdout


def test_cpp_raw_check_fails_without_transforms(
    golden_check: Path, bundle: Path, tmp_path: Path
) -> None:
    _linked_copy(bundle, tmp_path, "transforms.json")
    result = _run([str(golden_check), str(tmp_path), "--fbgemm-dir", _fbgemm_dir()], timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert _rows(result.stdout)[(RAW_ROW, "query_tower.pt")][1] == "FAIL"
    assert "transforms.json: not found" in result.stdout


def test_cpp_usage_errors_exit_2(golden_check: Path, bundle: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "RECSHIP_FBGEMM_DIR"}
    no_fbgemm = subprocess.run(
        [str(golden_check), str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert no_fbgemm.returncode == 2
    assert "--fbgemm-dir" in no_fbgemm.stderr
    missing = _run([str(golden_check), str(bundle / "nowhere"), "--fbgemm-dir", "x"], timeout=60)
    assert missing.returncode == 2
    assert "not a directory" in missing.stderr


def test_cpp_passes_a_published_bundle_in_both_formats(
    golden_check: Path, trained_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    from recship.packager.api import package
    from recship.packager.options import PackageOptions

    report = package(
        PackageOptions(
            retrieval=trained_runs[0],
            ranking=trained_runs[1],
            repo=tmp_path / "repo",
            name="movies",
            export_format="both",
        )
    )
    files = {entry.file for entry in report.manifest.entry_points}
    assert files == {"query_tower.pt", "query_tower.pt2", "ranker.pt", "ranker.pt2"}
    result = _run(
        [str(golden_check), str(report.ref.path), "--fbgemm-dir", _fbgemm_dir()], timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _rows(result.stdout)
    towers = {"query_tower.pt", "query_tower.pt2"}
    assert sorted(rows) == sorted(
        [(file.split(".")[0], file) for file in files] + [(RAW_ROW, file) for file in towers]
    )
    assert {verdict for _, verdict in rows.values()} == {"PASS"}, result.stdout
    # `recship verify` reruns the same recordings from Python for every listed file.
    verified = _run(
        [str(Path(sys.executable).with_name("recship")), "verify", str(report.ref.path)],
        timeout=300,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
