"""Model families: one module each, an HF config translation and a weight mapping."""
