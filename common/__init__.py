"""The bottom layer every Quiver stage stands on: no torch, no engine, nothing from above.

What both servers share (the pure-ASGI middlewares in `common.asgi`, OpenAI's error shape,
the draining uvicorn server, logging and tracing set-up, build-info metrics) and what every
stage needs (the base error, the version, the evaluation corpus, the supported model
families, waiting for a child process to serve). Imports run one way:
`common` <- `serving`, `gateway`, `optimize`, `loadtests` <- `quiver`.
"""

__version__ = "0.1.0"
