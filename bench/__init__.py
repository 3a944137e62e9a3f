"""Development tools: the throughput benchmark (`make bench`); not part of the runtime package."""
