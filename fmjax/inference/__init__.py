"""Using a trained model: loading (api), KV-cache decoding, generate, evaluate, inspect, classify."""
