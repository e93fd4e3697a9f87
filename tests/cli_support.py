"""What the CLI tests share."""

from __future__ import annotations

from blockopt.cli import main


def cli_failure(argv, capsys) -> tuple[int, str]:
    """Run ``blockopt argv`` in-process; its exit status and its stderr, which must be one line."""
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse refusing the command line
        status = exit.code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("blockopt: error: "), err
    return status, err
