"""``python -m wherefrom``: the ``wherefrom`` command."""

from wherefrom.cli import main

main()
