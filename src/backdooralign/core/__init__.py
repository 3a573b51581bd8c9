"""The method itself: the one conversation builder, the secret, redaction of its echoes, screening
of customer data, and loading of models."""
