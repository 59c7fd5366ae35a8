"""Self-protection, pure logic: token buckets and per-source limits (time is an argument)."""
