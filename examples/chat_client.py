"""A terminal chat with a running ``glake serve`` through the ``openai`` package (streamed replies).

    glake serve --model /path/to/hf-dir &
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 python examples/chat_client.py

One line per user turn; an empty line or end of input quits. ``glake chat`` does the same in-process.
"""

from __future__ import annotations

import argparse
import os
import sys

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--system", default="You are a helpful assistant.")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = os.environ.get("GLAKE_MODEL") or client.models.list().data[0].id
    messages = [{"role": "system", "content": args.system}]
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        print("assistant> ", end="", flush=True)
        reply = []
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                reply.append(chunk.choices[0].delta.content)
                print(reply[-1], end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


if __name__ == "__main__":
    raise SystemExit(main())
