"""OpenAI- and TGI-compatible HTTP server over the continuous-batching engine."""
