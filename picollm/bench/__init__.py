"""`picollm bench`: training, evaluation, generation and data-preparation speed, each measured side by
side with a baseline in the same run, and checked against targets. One module per job:

- `options`: what a run measures (the settings the CLI fills in);
- `suite`: the run itself, part by part (`Bench`, `run_bench`);
- `workloads`: what is timed (picollm's training step, the plain baseline, the per-position k-gram loop,
  generation, data preparation) and the model specs;
- `worker`: the fresh process each path runs in, and the JSON-lines protocol that drives it
  (`python -m picollm.bench.worker`);
- `machine`: the machine (CPU, memory, load, matmul peaks) and a process's memory;
- `targets`: the thresholds and PASS/FAIL; `markdown`: a result as Markdown tables.

docs/performance.md has the protocol, the figures and how to rerun them.
"""
