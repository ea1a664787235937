"""Storage backends: keys (SQLite, Redis), rate limits and the response cache (memory, Redis)."""
