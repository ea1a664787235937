"""The Quiver gateway: an OpenAI-compatible front door for one or more model servers.

auth -> rate limit -> response cache -> canary router -> upstream pool, one pure-ASGI
middleware per concern, composed once in `gateway.app.create_app`.
"""
