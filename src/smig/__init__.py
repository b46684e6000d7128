"""SMIG: move VMs off a hypervisor that stopped being trustworthy, live, onto trusted ones."""

__version__ = "0.1.0"
