"""What a run writes: the report model, its renderers (and verify's), and the CI gates."""
