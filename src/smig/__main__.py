"""``python -m smig``: the same as the ``smig`` command."""

from smig.cli.main import main

main()
