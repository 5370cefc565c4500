"""``python -m wherefrom.cli``, as the ``wherefrom`` script."""

from wherefrom.cli import main

main()
