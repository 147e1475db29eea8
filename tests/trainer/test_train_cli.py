"""`recship train` errors: one line, non-zero exit, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from recship.cli.main import main

TINY = [
    "--data",
    "synthetic",
    "--num-users",
    "30",
    "--num-items",
    "20",
    "--interactions-per-user",
    "4",
]


def _fail(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    return int(exit_info.value.code), err


def test_train_help_lists_both_models(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "two-tower" in out and "dlrm" in out


def test_refuses_non_empty_out_without_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    code, err = _fail(capsys, ["train", "two-tower", *TINY, "--out", str(tmp_path)])
    assert code == 2
    assert err.count("\n") == 0 and "not empty" in err and "--resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    code, err = _fail(capsys, ["train", "two-tower", *TINY, "--out", str(tmp_path), "--resume"])
    assert code == 2 and "model_config.json" in err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["two-tower", "--data", "/no/such/data"], 3, "no such file or directory"),
        (["two-tower", *TINY, "--tower-layers", "64,x"], 2, "--tower-layers"),
        (
            [
                "dlrm",
                *TINY,
                "--examples",
                "labelled",
                "--embedding-dim",
                "8",
                "--dense-arch-layers",
                "32,16",
            ],
            2,
            "end in",
        ),
        (["dlrm", *TINY], 2, "pass --retrieval"),
        (["two-tower", *TINY, "--batch-size", "4096"], 2, "fewer than one step"),
        (["two-tower", *TINY, "--eval-fraction", "1.5"], 2, "--eval-fraction"),
        (["two-tower", *TINY, "--table-size", "10"], 2, "table_size"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    out = tmp_path / "out"
    got_code, err = _fail(capsys, ["train", argv[0], "--out", str(out), *argv[1:]])
    assert got_code == code, err
    assert message in err and err.startswith("error:") and err.count("\n") == 0
    assert not out.exists()


def test_two_tower_on_a_criteo_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = tmp_path / "day.tsv"
    tsv.write_text("\t".join(["1"] + ["3"] * 13 + ["a1"] * 26) + "\n")
    out = tmp_path / "out"
    code, err = _fail(capsys, ["train", "two-tower", "--data", str(tsv), "--out", str(out)])
    assert code == 2 and "two-tower" in err
    assert not out.exists()
