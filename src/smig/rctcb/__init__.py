"""The Region Critical TCB: the trust policy (when), placement (where), the orchestrator and the
service that keeps the Integrity Validation Table."""
