"""Handlers: endpoint requests in, engine requests out, responses or SSE frames back.

Every text endpoint — OpenAI chat and completions, KServe `infer`, Triton `generate` and
`generate_stream` — runs through one pipeline:

    request --sampling.py--> GenerationRequest(s) + OutputOptions      (the request side)
            --run.py-------> TextRun: admit, merge, abort what ended    (the engine side)
            --output.py----> ChoiceDelta per choice and engine step     (the output side)
            --run.py-------> collect() into ChoiceResults, or stream() through a StreamFormat

`sampling.py` is where request fields become engine settings and constraints (the hook for
`tools` and `response_format`); an `OutputProcessor` is what a choice's tokens become (wrap
it for a tool-call parser or a JSON validator); each endpoint only says how its wire format
renders results (`chat.py`, `completions.py`, `kserve.py`). Handlers run over any
`EngineClient` and raise only `serving.errors` (engine errors propagate); the routers in
`serving.api` turn results into JSON / SSE and errors into HTTP responses.
"""
