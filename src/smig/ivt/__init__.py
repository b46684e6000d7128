"""The Integrity Validation Table: one row per hypervisor host, and the hash-chained audit log."""
