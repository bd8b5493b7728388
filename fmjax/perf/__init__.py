"""Performance: FLOP accounting and MFU, the step benchmark, ahead-of-time plans for TPU and GPU."""
