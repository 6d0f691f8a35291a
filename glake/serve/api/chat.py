"""``glake chat``: an interactive terminal chat (rich) with the engine in this process.

The conversation is rendered with the tokenizer's chat template each turn; the reply streams as
the engine steps (this thread runs the engine: there is no server). ``/reset`` starts over,
``/exit`` (or Ctrl-D) quits.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from glake.serve.engine import LLMEngine
from glake.serve.sampling_params import SamplingParams


def reply(engine: LLMEngine, messages: List[Dict[str, str]], params: SamplingParams,
          on_text: Callable[[str], None]) -> Tuple[str, Optional[str]]:
    """Generates the assistant's next message, calling ``on_text`` with each new piece.

    Returns
    -------
    tuple
        The message and its finish reason (``"stop"``: end of turn or a stop condition, ``"length"``).

    Raises
    ------
    InvalidArgumentError
        The conversation no longer fits the context, or the tokenizer has no chat template.
    """
    from glake.errors import InvalidArgumentError

    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise InvalidArgumentError("glake chat needs a tokenizer with a chat template")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tok.encode(text, add_special_tokens=False))
    room = engine.max_model_len - len(ids)
    if room < 1:
        raise InvalidArgumentError(f"the conversation has {len(ids)} tokens, the context {engine.max_model_len}: "
                                   f"/reset to start over")
    params.max_tokens = min(params.max_tokens, room)
    (seq,) = engine.add_request(ids, params)
    shown = 0
    try:
        while not seq.is_finished:
            engine.step()
            safe = len(seq.text) if seq.is_finished else len(seq.text.rstrip("\ufffd"))
            if safe > shown:
                on_text(seq.text[shown:safe])
                shown = safe
    finally:
        if not seq.is_finished:  # Ctrl-C mid-reply: free its slot
            engine.abort([seq])
    return seq.text, seq.finish_reason


def run_chat(make_engine: Callable[[], LLMEngine], name: str, max_tokens: int = 256, temperature: float = 0.7,
             system: Optional[str] = None) -> int:
    """The interactive loop; returns the exit status."""
    from rich.console import Console

    from glake.errors import InvalidArgumentError

    console = Console()
    with console.status(f"loading {name}..."):
        engine = make_engine()
    console.print(f"[bold]glake chat[/bold] with [cyan]{name}[/cyan] (max_model_len {engine.max_model_len}); "
                  f"/reset starts over, /exit quits")
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    try:
        while True:
            try:
                line = console.input("[bold green]you>[/bold green] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return 0
            if line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                messages = list(start)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            console.print("[bold blue]assistant>[/bold blue] ", end="")
            try:
                text, _ = reply(engine, messages, SamplingParams(temperature=temperature, max_tokens=max_tokens),
                             lambda piece: console.print(piece, end="", markup=False, highlight=False))
            except InvalidArgumentError as e:
                messages.pop()
                console.print(f"\n[red]{e}[/red]")
                continue
            except KeyboardInterrupt:
                messages.pop()
                console.print("\n[yellow](interrupted)[/yellow]")
                continue
            console.print()
            messages.append({"role": "assistant", "content": text})
    finally:
        engine.close()
