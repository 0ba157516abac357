"""``python -m walsaga`` is the ``walsaga`` command."""

from walsaga.cli import main

main()
