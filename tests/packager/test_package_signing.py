"""`recship package --sign-key`: the published version carries a MANIFEST.sig that verifies.

A key that cannot sign fails before anything is built; a signed version passes a store that
requires signatures, and `recship verify --public-key` accepts it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from recship.base.errors import InvalidInput
from recship.bundle.layout import published_versions
from recship.bundle.store import BundleStore
from recship.cli.pipeline import SMOKE_GATE
from recship.packager.api import package
from recship.packager.options import PackageOptions

pytestmark = pytest.mark.slow


def test_package_signs_what_it_publishes(trained_runs, tmp_path: Path, signing_keys) -> None:
    key, public, _ = signing_keys
    repo = tmp_path / "repo"
    options = PackageOptions(*trained_runs, repo=repo, name="movies", thresholds=SMOKE_GATE)
    started = time.perf_counter()
    with pytest.raises(InvalidInput, match="not an unencrypted PEM private key"):
        package(dataclasses.replace(options, sign_key=public))
    assert time.perf_counter() - started < 5 and published_versions(repo / "movies") == []

    report = package(dataclasses.replace(options, sign_key=key))
    assert (report.ref.path / "MANIFEST.sig").is_file()
    validated = BundleStore(repo, public_key=public, require_signature=True).validate("movies", 1)
    assert validated.signed

    from recship.bundle.cli import verify_command

    result = CliRunner().invoke(verify_command, [str(report.ref.path), "--public-key", str(public)])
    assert result.exit_code == 0, result.output
    assert "MANIFEST.sig verified" in result.output and "verified" in result.output
