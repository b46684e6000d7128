"""The ``smig`` command."""
