"""Certifying a dataset: radii from logits, the certificate setup, the engine, PGD, the run with its checkpoints
and torchrun sharding."""
