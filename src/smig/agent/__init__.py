"""The per-host agent: carries out the RC-TCB's orders on its host's hypervisor."""
