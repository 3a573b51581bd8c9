"""The OpenAI-compatible chat server: protocol types, the HTTP layer, model state, the chat route,
the app."""
