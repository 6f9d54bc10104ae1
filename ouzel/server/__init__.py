"""`ouzel serve`: OpenAI- and Anthropic-compatible HTTP APIs over the batching engine."""
