"""Training: the train state, the run builder, the step, the loop, optimizers, numerics guards, metric writers."""
