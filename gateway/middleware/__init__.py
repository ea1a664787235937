"""The gateway's middleware, one pure-ASGI class per concern, composed in `create_app`."""
