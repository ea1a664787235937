"""Upstream model servers: replicas per variant with health checks, least-outstanding
balancing, circuit breakers, timeouts and retries (`gateway.upstream.pool.UpstreamPool`)."""
