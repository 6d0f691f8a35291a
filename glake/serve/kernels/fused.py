"""Fused elementwise kernels of the Llama layer, in Triton, each beside its torch reference.

- :func:`rms_norm`: ``residual += x`` (optional) then RMSNorm, one pass (HF's LlamaRMSNorm: the norm
  in float32, rounded to the model's dtype, then times the weight).
- :func:`rope_and_cache`: RoPE of q and k (HF's half rotation) and the write of k and v into the KV
  cache at each token's ``[slot, position]``, one pass.
- :func:`silu_mul`: ``silu(gate) * up`` of a fused gate/up projection.

Each public function runs the Triton kernel on CUDA tensors when Triton is importable (and
``use_triton`` is not False) and the reference otherwise (CPU). The kernels round where torch rounds
(every intermediate that torch keeps in the model's dtype is rounded to it here too), so outputs agree
with the references up to float32 ``rsqrt``/``exp`` ulps; the tests compare them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _triton(x: torch.Tensor, use_triton: Optional[bool]) -> bool:
    if use_triton is None:
        return triton is not None and x.is_cuda
    if use_triton and triton is None:
        raise RuntimeError("use_triton=True needs triton")
    return use_triton


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---- RMSNorm (+ residual) ------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``; without ``residual``, ``(norm(x), x)``."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(X, R, W, Out, ROut, sx, sr, so, sro, n, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + row * sx + offs, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * sr + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(ROut + row * sro + offs, x, mask=m)
        h = x.to(tl.float32)
        var = tl.sum(h * h, 0) / n
        h = (h * (1.0 / tl.sqrt(var + eps))).to(x.dtype).to(tl.float32)
        w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Out + row * so + offs, (w * h).to(Out.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
             use_triton: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` for ``x`` ``[T, hidden]``; the Triton kernel writes the sum
    into ``residual`` in place (it is the next layer's residual)."""
    if not _triton(x, use_triton):
        return rms_norm_reference(x, weight, eps, residual)
    t, n = x.shape
    out = torch.empty_like(x)
    if t == 0:
        return out, x if residual is None else residual
    r = residual if residual is not None else x
    _rms_norm_kernel[(t,)](x, r, weight, out, r, x.stride(0), r.stride(0), out.stride(0), r.stride(0), n, eps,
                           HAS_RES=residual is not None, BLOCK=_pow2(n), num_warps=8 if n >= 4096 else 4)
    return out, r


# ---- RoPE + KV cache write -----------------------------------------------------------------------

def rope_and_cache_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                             positions: torch.Tensor) -> torch.Tensor:
    """Rotates ``q`` ``[T, heads, D]`` and ``k`` ``[T, kv_heads, D]`` by ``cos``/``sin`` ``[T, D]``, writes k and
    ``v`` into the caches at ``[slots, positions]``; returns the rotated q."""
    def rot(x):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    k_cache[slots, positions] = rot(k).to(k_cache.dtype)
    v_cache[slots, positions] = v.to(v_cache.dtype)
    return rot(q)


if triton is not None:
    @triton.jit
    def _rotate(x1, x2, c1, c2, s1, s2, dt: tl.constexpr):
        """HF's half rotation of ``[heads, HALF]`` halves, rounded to ``dt`` where torch rounds."""
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit
    def _rope_cache_kernel(Q, K, V, Cos, Sin, KC, VC, Slots, Pos, QOut,
                           sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, skc_s, skc_t, skc_h, svc_s, svc_t, svc_h,
                           sqo_t, sqo_h, HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr,
                           BLOCK_HKV: tl.constexpr, HALF: tl.constexpr):
        t = tl.program_id(0)
        d = tl.arange(0, HALF)
        c1 = tl.load(Cos + t * sc_t + d).to(tl.float32)
        c2 = tl.load(Cos + t * sc_t + HALF + d).to(tl.float32)
        s1 = tl.load(Sin + t * sc_t + d).to(tl.float32)
        s2 = tl.load(Sin + t * sc_t + HALF + d).to(tl.float32)
        dt = Q.dtype.element_ty
        # q: [HQ, HALF] halves, rounded where torch rounds (x*cos, rotated*sin, their sum)
        hq = tl.arange(0, BLOCK_HQ)
        mq = (hq < HQ)[:, None]
        qp = Q + t * sq_t + hq[:, None] * sq_h + d[None, :]
        o1, o2 = _rotate(tl.load(qp, mask=mq, other=0.0), tl.load(qp + HALF, mask=mq, other=0.0), c1, c2, s1, s2, dt)
        op = QOut + t * sqo_t + hq[:, None] * sqo_h + d[None, :]
        tl.store(op, o1, mask=mq)
        tl.store(op + HALF, o2, mask=mq)
        # k (rotated) and v into the cache row [slot, position]
        slot = tl.load(Slots + t).to(tl.int64)
        pos = tl.load(Pos + t).to(tl.int64)
        hk = tl.arange(0, BLOCK_HKV)
        mk = (hk < HKV)[:, None]
        kp = K + t * sk_t + hk[:, None] * sk_h + d[None, :]
        k1, k2 = _rotate(tl.load(kp, mask=mk, other=0.0), tl.load(kp + HALF, mask=mk, other=0.0), c1, c2, s1, s2, dt)
        kc = KC + slot * skc_s + pos * skc_t + hk[:, None] * skc_h + d[None, :]
        tl.store(kc, k1.to(KC.dtype.element_ty), mask=mk)
        tl.store(kc + HALF, k2.to(KC.dtype.element_ty), mask=mk)
        vp = V + t * sv_t + hk[:, None] * sv_h + d[None, :]
        vc = VC + slot * svc_s + pos * svc_t + hk[:, None] * svc_h + d[None, :]
        tl.store(vc, tl.load(vp, mask=mk, other=0.0).to(VC.dtype.element_ty), mask=mk)
        tl.store(vc + HALF, tl.load(vp + HALF, mask=mk, other=0.0).to(VC.dtype.element_ty), mask=mk)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                   use_triton: Optional[bool] = None) -> torch.Tensor:
    """See :func:`rope_and_cache_reference`; the rows ``[slots, positions]`` must be backed."""
    if not _triton(q, use_triton):
        return rope_and_cache_reference(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    t, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    for x in (q, k, v, k_cache, v_cache, cos, sin):
        if x.stride(-1) != 1:
            raise ValueError("rope_and_cache needs the last dimension contiguous")
    _rope_cache_kernel[(t,)](
        q, k, v, cos, sin, k_cache, v_cache, slots, positions, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1),
        HQ=hq, HKV=hkv, BLOCK_HQ=_pow2(hq), BLOCK_HKV=_pow2(hkv), HALF=d // 2, num_warps=4)
    return out


# ---- SiLU * mul ----------------------------------------------------------------------------------

def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[T, 2 * I]`` (gate first) -> ``[T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(X, Out, sx, so, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(X + row * sx + offs, mask=m, other=0.0)
        u = tl.load(X + row * sx + n + offs, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(Out + row * so + offs, (s * u).to(Out.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor, use_triton: Optional[bool] = None) -> torch.Tensor:
    """See :func:`silu_mul_reference`."""
    if not _triton(gate_up, use_triton):
        return silu_mul_reference(gate_up)
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = 1024
        _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block,
                                                     num_warps=4)
    return out


__all__ = ["rms_norm", "rms_norm_reference", "rope_and_cache", "rope_and_cache_reference", "silu_mul",
           "silu_mul_reference"]
