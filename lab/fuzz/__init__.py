"""Fuzzing our vhost-user back end as a hostile front end and a hostile guest.

Why hypothesis and not atheris:
- the target is pure Python in another process (`python -m lab backend blk`), reached over a
  unix socket and shared memory; atheris' strength, libFuzzer's coverage feedback from
  instrumented native code, would see neither the other process nor anything worth tracing;
- the inputs are structured and stateful: sequences of vhost-user messages with fds that only
  mean something after a handshake, and rings whose descriptors point into mapped guest memory.
  Hypothesis strategies generate exactly those structures (valid enough to go deep, broken in one
  place), and mix in the explicit seeds (the bad-input list and historic CVE shapes);
- shrinking turns a failure into the smallest message sequence or ring that still fails, printed
  as plain data and written as a JSON reproducer (`lab fuzz --replay FILE`);
- hypothesis is already a dependency of the tests; atheris needs a clang-built CPython.

Modules: target (the daemon under test and its health checks), memory (guest RAM with guard
canaries), messages (hostile front end), rings (hostile guest), runner (time-boxed campaign).
"""
