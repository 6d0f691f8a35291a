"""Talk to a running ``glake serve`` with the ``openai`` package: a completion, then a streamed chat reply.

    glake serve --model /path/to/hf-dir --api-key secret &
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=secret python examples/client.py

The model id is the first one ``/v1/models`` lists (or ``$GLAKE_MODEL``).
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = os.environ.get("GLAKE_MODEL") or client.models.list().data[0].id

    done = client.completions.create(model=model, prompt="The capital of France is", max_tokens=args.max_tokens,
                                     temperature=0)
    print(f"completion: {done.choices[0].text!r} ({done.choices[0].finish_reason}, {done.usage.total_tokens} tokens)")

    print("chat (streamed): ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=args.max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
