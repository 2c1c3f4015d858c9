"""Training: `trainer.train(config)` runs a whole run; the loop itself is `trainer.Trainer.loop`, and one
optimizer step is `step.train_step`.

Around them, one job per module: `setup` (data, model, optimizer, the step budget), `checkpoints`
(periodic, best/, final/), `evaluator` (validation, early stopping, the final splits), `metrics`
(metrics.jsonl, W&B, progress), `state` (`TrainState`, saved with each checkpoint), `signals`
(SIGTERM/SIGINT), `distributed` (torchrun), `schedule` (the learning rate), `recipe` (what a resume
may not change), `footprint` (memory estimated on the meta device), `lr_search` (`lr: auto`: the sweep
that picks a run's peak learning rate), `faults` (for tests). The run
directory's lock is `picollm.runlock`.
"""
