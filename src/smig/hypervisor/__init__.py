"""Drivers that run VMs: the interface in :mod:`base`, one module per backend."""
