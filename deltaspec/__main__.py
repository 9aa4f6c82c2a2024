"""``python -m deltaspec``: the same as the ``deltaspec`` command."""

from deltaspec.cli import main

main(prog_name="deltaspec")
