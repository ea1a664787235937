"""The model server's HTTP layer: thin routers over the handlers, middleware, app factory."""
