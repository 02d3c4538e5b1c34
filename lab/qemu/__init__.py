"""QEMU processes: accelerator choice, argv built from data, QMP, serial console, teardown."""
