"""The Integrity Validation Table: one row per hypervisor host, and the hash-chained audit log.

``base`` holds the store interface and :func:`open_store` (the backend is chosen by URL),
``sqlite`` the default backend, ``audit`` the hash chain's pure logic.
"""

from smig.ivt.base import AuditEntry, IVTStore, Transaction, open_store

__all__ = ["AuditEntry", "IVTStore", "Transaction", "open_store"]
