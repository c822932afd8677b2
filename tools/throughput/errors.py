"""The benchmark's one error type: a one-line message that names the problem and the fix."""

from __future__ import annotations

import click


class BenchFailure(click.ClickException):
    """click prints it as one line on stderr and exits 1 (no traceback)."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"fednode-bench throughput: error: {self.format_message()}", err=True)
