"""OpenAIServing: completions and chat completions over an :class:`AsyncEngine`, streamed or whole.

It tokenizes (chat templates through the tokenizer's ``apply_chat_template``), checks the request
against the context (``prompt + max_tokens <= max_model_len``), maps the fields to
:class:`~glake.serve.SamplingParams`, submits to the engine thread, and turns the engine's
per-step deltas into OpenAI objects: SSE ``data: {...}`` chunks ending with ``data: [DONE]``, or
one response with ``usage``. A stream whose client goes away aborts its request (its KV slot is
freed before the next step).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

from glake.errors import InvalidArgumentError
from glake.serve.api.async_engine import AsyncEngine, CompletionDelta, RequestHandle
from glake.serve.api.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, usage

Request = Union[CompletionRequest, ChatCompletionRequest]


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServing:
    """The OpenAI endpoints' logic (the routes are in :mod:`glake.serve.api.server`).

    Parameters
    ----------
    engine
        The engine thread's front.
    model_name
        The id clients must name in ``model`` (``/v1/models`` lists it).
    """

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

    # ---- preparing a request ---------------------------------------------------------------------

    def _check_model(self, req: Request) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _encode(self, text: str) -> List[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=True))
        except TypeError:  # a plain encode(text)
            return list(self.tokenizer.encode(text))

    def completion_prompt(self, req: CompletionRequest) -> List[int]:
        """The token ids of a completion request's single prompt."""
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"one prompt per request is supported, got {len(p)}", param="prompt")
            p = p[0]
        return self._encode(p) if isinstance(p, str) else list(p)

    def chat_prompt(self, req: ChatCompletionRequest) -> List[int]:
        """The token ids of a conversation, rendered by the tokenizer's chat template."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # the template refused the conversation (jinja raise_exception etc.)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from e
        return list(tok.encode(text, add_special_tokens=False))

    def _max_tokens(self, requested: Optional[int], n_prompt: int, param: str) -> int:
        limit = self.engine.max_model_len
        if n_prompt >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has {n_prompt}",
                           param=param, code="context_length_exceeded")
        if requested is None:
            return limit - n_prompt
        if n_prompt + requested > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; you requested "
                           f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} for the completion)",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    async def _submit(self, req: Request, ids: List[int], param: str) -> Tuple[RequestHandle, int]:
        self._check_model(req)
        if isinstance(req, CompletionRequest):
            if req.echo:
                raise APIError(400, "echo is not supported", param="echo")
            max_tokens, logprobs = self._max_tokens(req.max_tokens, len(ids), param), req.logprobs
        else:
            max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(ids), param)
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        try:
            params = req.sampling_params(max_tokens, logprobs)
            if params.stop and self.tokenizer is None:
                raise InvalidArgumentError("stop strings need a tokenizer")
            return await self.engine.submit(ids, params), (logprobs if logprobs is not None else -1)
        except InvalidArgumentError as e:
            named = re.match(r"SamplingParams\.(\w+)=", str(e))
            raise APIError(400, str(e), param=named.group(1) if named else param if "prompt" in str(e) else None) from e

    # ---- logprobs --------------------------------------------------------------------------------

    def _tok(self, i: int) -> str:
        return self.tokenizer.decode([i]) if self.tokenizer is not None else str(i)

    def _top(self, entry: Dict[int, float], n: int) -> List[Tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:n]

    def completion_logprobs(self, d: CompletionDelta, n: int, offset: int) -> Dict[str, Any]:
        """The legacy completions ``logprobs`` object of one delta (``text_offset`` from ``offset``)."""
        toks = [self._tok(t) for t in d.token_ids]
        offsets, pos = [], offset
        for s in toks:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": toks, "token_logprobs": [e[t] for t, e in zip(d.token_ids, d.logprobs)],
                "top_logprobs": [{self._tok(i): lp for i, lp in self._top(e, n)} for e in d.logprobs],
                "text_offset": offsets}

    def chat_logprobs(self, d: CompletionDelta, n: int) -> Dict[str, Any]:
        """The chat ``logprobs`` object (``{"content": [...]}``) of one delta."""
        def item(i: int, lp: float) -> Dict[str, Any]:
            s = self._tok(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(item(t, e[t]), top_logprobs=[item(i, lp) for i, lp in self._top(e, n)])
                            for t, e in zip(d.token_ids, d.logprobs)]}

    # ---- the endpoints ---------------------------------------------------------------------------

    async def completion(self, req: CompletionRequest) -> Union[Dict[str, Any], AsyncIterator[str]]:
        """``/v1/completions``: the response object, or the SSE stream when ``req.stream``."""
        ids = self.completion_prompt(req)
        handle, nlp = await self._submit(req, ids, "prompt")
        return self._run(req, handle, nlp, chat=False)

    async def chat(self, req: ChatCompletionRequest) -> Union[Dict[str, Any], AsyncIterator[str]]:
        """``/v1/chat/completions``: the response object, or the SSE stream when ``req.stream``."""
        ids = self.chat_prompt(req)
        handle, nlp = await self._submit(req, ids, "messages")
        return self._run(req, handle, nlp, chat=True)

    def _run(self, req: Request, handle: RequestHandle, nlp: int, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(handle, rid, nlp, chat, include_usage)
        return self._collect(handle, rid, nlp, chat)

    def _head(self, rid: str, chat: bool) -> Dict[str, Any]:
        return {"id": rid, "object": ("chat.completion" if chat else "text_completion"), "created": int(time.time()),
                "model": self.model_name}

    async def _collect(self, handle: RequestHandle, rid: str, nlp: int, chat: bool) -> Dict[str, Any]:
        texts: Dict[int, str] = {}
        reasons: Dict[int, Optional[str]] = {}
        lps: Dict[int, List[Any]] = {}
        counts: Dict[int, int] = {}
        offsets: Dict[int, int] = {}
        try:
            while not handle.finished:
                u = await handle.next()
                for d in u.deltas:
                    counts[d.index] = counts.get(d.index, 0) + len(d.token_ids)
                    if nlp >= 0 and d.token_ids:
                        if chat:
                            lps.setdefault(d.index, []).extend(self.chat_logprobs(d, nlp)["content"])
                        else:
                            part = self.completion_logprobs(d, nlp, offsets.get(d.index, 0))
                            offsets[d.index] = offsets.get(d.index, 0) + sum(len(t) for t in part["tokens"])
                            acc = lps.setdefault(d.index, {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                           "text_offset": []})
                            for k in acc:
                                acc[k].extend(part[k])
                    texts[d.index] = d.full_text if d.full_text is not None else texts.get(d.index, "") + d.text
                    if d.finish_reason is not None:
                        reasons[d.index] = d.finish_reason
        finally:
            if not handle.finished:
                self.engine.abort(handle.request_id)
        choices = []
        for i in sorted(texts):
            lp = (({"content": lps.get(i, [])} if chat else lps.get(i)) if nlp >= 0 else None)
            body = {"message": {"role": "assistant", "content": texts[i]}} if chat else {"text": texts[i]}
            choices.append(dict({"index": i}, **body, logprobs=lp, finish_reason=reasons.get(i)))
        return dict(self._head(rid, chat), choices=choices, usage=usage(handle.num_prompt_tokens, sum(counts.values())))

    async def _stream(self, handle: RequestHandle, rid: str, nlp: int, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        head = dict(self._head(rid, chat), object="chat.completion.chunk" if chat else "text_completion")
        generated = 0
        started: set = set()
        offsets: Dict[int, int] = {}
        try:
            while not handle.finished:
                try:
                    u = await handle.next()
                except Exception as e:  # the engine failed mid-stream: say so, then end the stream
                    yield sse(error_body(f"generation failed: {e}", "internal_error"))
                    break
                for d in u.deltas:
                    generated += len(d.token_ids)
                    if not d.text and not d.token_ids and d.finish_reason is None:
                        continue
                    lp = None
                    if nlp >= 0 and d.token_ids:
                        if chat:
                            lp = self.chat_logprobs(d, nlp)
                        else:
                            lp = self.completion_logprobs(d, nlp, offsets.get(d.index, 0))
                            offsets[d.index] = offsets.get(d.index, 0) + sum(len(t) for t in lp["tokens"])
                    if chat:
                        delta: Dict[str, Any] = {"content": d.text}
                        if d.index not in started:
                            started.add(d.index)
                            delta = {"role": "assistant", "content": d.text}
                        choice = {"index": d.index, "delta": delta}
                    else:
                        choice = {"index": d.index, "text": d.text}
                    choice.update(logprobs=lp, finish_reason=d.finish_reason)
                    yield sse(dict(head, choices=[choice]))
            if include_usage:
                yield sse(dict(head, choices=[], usage=usage(handle.num_prompt_tokens, generated)))
            yield "data: [DONE]\n\n"
        finally:
            if not handle.finished:
                self.engine.abort(handle.request_id)
