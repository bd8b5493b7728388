"""Objectives: what a step minimises (LM cross entropy, the fused chunked loss, MLM, classification)."""
