"""Wire formats of the model server and the gateway: OpenAI requests, responses, stream
chunks and error bodies as pydantic models. No torch, no engine imports."""
