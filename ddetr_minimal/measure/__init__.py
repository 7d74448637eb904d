"""Measurement (chapters 1, 2, 4, 9, 10): time, memory, cost, provenance, attention statistics and the
benchmarks.

* :mod:`.timing` -- median wall-clock or CPU time of calls, measured in turn;
* :mod:`.memory` -- bytes saved for backward, and the attention matrices' analytic size;
* :mod:`.cost` -- FLOP counters, exponent fits, attention entropy, one layer's cost as the map grows;
* :mod:`.retrieval` -- chapter 1's retrieval task, learned by vanilla or deformable attention;
* :mod:`.attention_stats` -- normalised attention entropy and attention mass inside matched boxes;
* :mod:`.records` -- provenance (command, commit, machine, date) and atomic writes of results;
* :mod:`.benchmark`, :mod:`.bench_kernel` -- ``python -m ddetr_minimal benchmark`` / ``bench-kernel``;
* :mod:`.versus_transformers`, :mod:`.formulations` -- the CPU path against transformers' pure-PyTorch
  Deformable DETR, and the op's formulations (``bench-formulations``); transformers is imported
  only there, when they run.
"""
