"""Training runs (`minseg train`): the loop (run.py), each family's data-to-loss adapter (adapters.py), its
original's optimiser and schedule (optim.py), the files of a run (state.py), logging and the loss plot (log.py),
and data-parallel training under torchrun (distributed.py). Augmentations live in minseg.data.transforms."""
