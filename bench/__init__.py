"""Benchmarks of the FedPhD deployment: scripts that measure, not tests that assert.

Each module runs as ``python -m bench.<name>`` from the repository root and prints its table
(and, where there is one, ``ratio: <float>`` as the last line of stdout); progress goes to
stderr. The published figures and the commands that reproduce them are in
``docs/benchmarks.md``.

- ``bench.transport``: one cloud→edge→client→edge→cloud round with no local steps versus a
  bare grpcio relay carrying the same bytes over the same hops;
- ``bench.training_overhead``: the client's local-training path versus a bare PyTorch loop,
  and pruned (0.2) versus unpruned step time;
- ``bench.traffic_quality``: traffic and sample quality of FedAvg, FedProx, FedDM-quant,
  FedDiffuse UDEC, FedPhD (± 8-bit) and centralised training on one non-IID split;
- ``bench.scale``: one edge with many clients (several clients per process), round time
  and edge memory.
"""
