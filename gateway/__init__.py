"""The gateway: auth, rate limits, response cache, canary routing and resilient upstreams."""
