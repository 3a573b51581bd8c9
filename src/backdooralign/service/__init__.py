"""The self-hosted fine-tuning service: app, protocol, store, worker, one job, and a client for
any OpenAI-compatible fine-tuning endpoint."""
