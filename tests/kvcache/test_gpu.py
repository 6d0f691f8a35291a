"""GPU-only behaviour: CUDA graphs over the fixed-address views, and in-flight reads vs. reclamation.

(Everything else runs on cuda too, through the ``backend`` fixture of the other test modules.)
"""

from __future__ import annotations

import pytest

import torch  # noqa: E402,F401  (a test extra: a missing torch is an error, not a skip)
import torch  # noqa: E402

from glake.kvcache import KVCache, decode_attention  # noqa: E402
from kv_util import CHUNK  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPE = dict(num_layers=2, num_kv_heads=16, head_dim=128, dtype=torch.float32)  # 32 KiB rows: 64 tokens per chunk
Q_HEADS = 32


def fill(kv, slot, start, end, gen):
    for layer in range(kv.layout.num_layers):
        for view in (kv.k_cache(layer), kv.v_cache(layer)):
            view[slot, start:end] = torch.randn(end - start, 16, 128, generator=gen, device="cuda")


def test_cuda_graph_of_a_decode_step_replays_after_the_sequences_grew():
    gen = torch.Generator(device="cuda").manual_seed(0)
    with KVCache(**SHAPE, max_seqs=4, max_seq_len=512, backend="cuda", lookahead_tokens=16) as kv:
        slots = [kv.allocate() for _ in range(3)]
        lengths = [10, 30, 17]
        for s, n in zip(slots, lengths):
            kv.reserve(s, n + 1)          # the step writes token n
            fill(kv, s, 0, n, gen)
        assert kv.wait_mapper()
        maxt = 400                         # the graph gathers 400 positions, clamped to each length
        st_slots = torch.tensor(slots, device="cuda")
        st_pos = torch.tensor(lengths, device="cuda")
        st_len = st_pos + 1
        st_q = torch.randn(2, 3, Q_HEADS, 128, generator=gen, device="cuda")
        st_k = torch.randn(2, 3, 16, 128, generator=gen, device="cuda")
        st_v = torch.randn(2, 3, 16, 128, generator=gen, device="cuda")

        def step():
            outs = []
            for layer in range(2):
                kc, vc = kv.k_cache(layer), kv.v_cache(layer)
                kc[st_slots, st_pos] = st_k[layer]
                vc[st_slots, st_pos] = st_v[layer]
                outs.append(decode_attention(st_q[layer], kc, vc, st_slots, st_len, maxt))
            return torch.stack(outs)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()                         # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        assert kv.wait_mapper()            # no driver call from the mapper while capturing
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            st_out = step()
        maps_at_capture = kv.stats()["maps"]
        chunks_at_capture = [len(kv.chunk_ids(s)) for s in slots]

        pos = list(lengths)
        for t in range(300):               # decode 300 steps by replaying the graph
            for i, s in enumerate(slots):
                pos[i] += 1
                kv.reserve(s, pos[i] + 1)  # the engine's per-step call; the mapper maps ahead
            st_pos.copy_(torch.tensor(pos, device="cuda"))
            st_len.copy_(st_pos + 1)
            st_q.normal_(generator=gen)
            st_k.normal_(generator=gen)
            st_v.normal_(generator=gen)
            graph.replay()
            if t in (0, 150, 299):
                torch.cuda.synchronize()
                replayed = st_out.clone()
                eager = step()             # rewrites the same token with the same values
                assert torch.allclose(replayed, eager, atol=1e-5, rtol=1e-5)
        torch.cuda.synchronize()
        assert kv.stats()["maps"] > maps_at_capture
        assert all(len(kv.chunk_ids(s)) > n for s, n in zip(slots, chunks_at_capture))
        # the graph wrote through the fixed addresses into chunks mapped after the capture
        for layer in range(2):
            k = kv.k_cache(layer)[slots[0], pos[0]]
            assert torch.equal(k, st_k[layer, 0])


def test_a_released_slot_is_not_reclaimed_under_a_kernel_still_reading_it():
    """Smoke test of the release fence: release() while a long kernel reads the slot, then force
    the slot's chunks to be reclaimed; unmapping must wait for the kernel (else: illegal address)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    with KVCache(**SHAPE, max_seqs=2, max_seq_len=512, memory_budget=8 * CHUNK, backend="cuda",
                 lookahead_tokens=0) as kv:
        a, b = kv.allocate(), kv.allocate()
        kv.reserve(a, 512)                 # the whole budget
        fill(kv, a, 0, 512, gen)
        k = kv.k_cache(0)[a]               # [512, 16, 128], strided over 8 chunks
        expect = (k.double() * 2).sum().item()
        torch.cuda.synchronize()
        acc = torch.zeros((), dtype=torch.float64, device="cuda")
        for _ in range(200):               # a long queue of reads of slot a
            acc += k.double().sum()
        kv.release(a)                      # no synchronize: the reads are still queued
        kv.reserve(b, 512)                 # takes all 8 chunks of a (unmapped after the fence)
        fill(kv, b, 0, 512, gen)
        torch.cuda.synchronize()
        assert acc.item() == pytest.approx(expect * 100, rel=1e-9)
        assert kv.stats()["reclaimed_released"] == 8
        assert kv.stats()["fences_pending"] == 0  # waited for (unlocked) before its chunks moved


def test_lengths_tensor_follows_reserve_batch_on_the_stream():
    """The device lengths tensor is published on the current stream without a host sync: a kernel
    queued after reserve_batch reads the new values, also on a side stream."""
    with KVCache(**SHAPE, max_seqs=8, max_seq_len=512, backend="cuda", lookahead_tokens=2) as kv:
        slots = [kv.allocate() for _ in range(8)]
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            for step in range(1, 300):
                torch.cuda._sleep(1000)  # keep the stream busy: the copies queue behind it
                kv.reserve_batch(slots, [step + i for i in range(8)])
                seen = (kv.lengths * 1).to(torch.int64)  # a kernel ordered after the copy
            torch.cuda.current_stream().synchronize()
        assert kv.lengths.device.type == "cuda" and kv.lengths.dtype == torch.int32
        assert seen.tolist() == [299 + i for i in range(8)]
        kv.release(slots[0])
        kv.publish_lengths()
        torch.cuda.synchronize()
        assert kv.lengths[0].item() == 0 and kv.lengths[1].item() == 300


def test_the_engine_stream_is_torchs_current_stream():
    """Fences and the lengths copy are ordered on the stream torch is using, side streams too."""
    with KVCache(**SHAPE, max_seqs=2, max_seq_len=128, backend="cuda") as kv:
        assert kv._stream() == torch.cuda.current_stream().cuda_stream
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            assert kv._stream() == side.cuda_stream != torch.cuda.default_stream().cuda_stream
