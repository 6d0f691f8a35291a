"""glake.serve.api: an OpenAI-compatible HTTP server on the engine (``glake serve``) and ``glake chat``.

:mod:`~glake.serve.api.async_engine` (the engine on its own thread, fed from asyncio),
:mod:`~glake.serve.api.protocol` (request models, errors), :mod:`~glake.serve.api.serving`
(completions and chat over the engine), :mod:`~glake.serve.api.server` (the FastAPI app),
:mod:`~glake.serve.api.metrics` (``/metrics``), :mod:`~glake.serve.api.cli` (the commands),
:mod:`~glake.serve.api.chat` (the terminal chat), :mod:`~glake.serve.api.default_model`.
Needs ``pip install 'glake[serve]'`` (fastapi, uvicorn, pydantic, prometheus-client, rich).
"""
