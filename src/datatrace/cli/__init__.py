"""The command line: ``datatrace demo | explain | debug | value | audit``, the spec file, the HTML report."""

from datatrace.cli.main import main

__all__ = ["main"]
