"""The sampler's masks, penalties, seeds and logprobs, as unit tests (and against HF's logits processors)."""

from __future__ import annotations

import pytest
import torch

from glake.serve import SamplingParams
from glake.serve.layers.sampler import Sampler, SamplingTensors, apply_penalties, apply_top_k_top_p_min_p

V = 16


def tensors(params, prompts=None, outputs=None, generators=None):
    n = len(params)
    return SamplingTensors.build(params, prompts or [[0]] * n, outputs or [[]] * n, generators or [None] * n, V,
                                 torch.device("cpu"))


def kept(logits_row: torch.Tensor) -> set:
    return set(torch.isfinite(logits_row).nonzero().flatten().tolist())


def probs_logits(probs):
    return torch.tensor(probs, dtype=torch.float32).log()[None, :]


def mask(logits, top_k=V, top_p=1.0, min_p=0.0):
    b = logits.shape[0]
    return apply_top_k_top_p_min_p(logits, torch.full((b,), top_k), torch.full((b,), top_p), torch.full((b,), min_p))


def test_top_k_keeps_the_k_largest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g)
    out = mask(logits, top_k=3)
    for r in range(5):
        assert kept(out[r]) == set(logits[r].topk(3).indices.tolist())
        assert torch.equal(out[r][torch.isfinite(out[r])], logits[r][torch.isfinite(out[r])])


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = probs_logits([0.05, 0.5, 0.15, 0.3])
    assert kept(mask(x, top_p=0.7)[0]) == {1, 3}       # 0.5 < 0.7, 0.8 >= 0.7
    assert kept(mask(x, top_p=0.5)[0]) == {1}          # 0.5 reaches 0.5
    assert kept(mask(x, top_p=0.81)[0]) == {1, 3, 2}
    assert kept(mask(x, top_p=0.01)[0]) == {1}         # the most likely always stays


def test_min_p_and_combinations():
    x = probs_logits([0.05, 0.5, 0.15, 0.3])
    assert kept(mask(x, min_p=0.5)[0]) == {1, 3}       # p >= 0.25
    assert kept(mask(x, min_p=0.2)[0]) == {1, 2, 3}    # p >= 0.1
    # top-p is taken over the top-k set renormalised (as HF's and vLLM's warpers do): 0.625, 0.375
    assert kept(mask(x, top_k=2, top_p=0.7)[0]) == {1, 3}
    assert kept(mask(x, top_k=2, top_p=0.6)[0]) == {1}
    assert kept(mask(x, top_k=1)[0]) == {1}


def test_masks_match_hf_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, V, generator=g) * 2
    ids = torch.zeros(8, 1, dtype=torch.long)
    for k in (1, 4, 9):
        assert torch.equal(torch.isfinite(mask(logits, top_k=k)), torch.isfinite(TopKLogitsWarper(k)(ids, logits)))
    for p in (0.3, 0.75, 0.95):
        assert torch.equal(torch.isfinite(mask(logits, top_p=p)), torch.isfinite(TopPLogitsWarper(p)(ids, logits)))
    for m in (0.05, 0.3):
        assert torch.equal(torch.isfinite(mask(logits, min_p=m)), torch.isfinite(MinPLogitsWarper(m)(ids, logits)))


def test_repetition_penalty_matches_hf_and_presence_frequency_rule():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, V, generator=g)
    prompts, outputs = [[1, 2, 3], [4]], [[3, 5, 5], []]
    t = tensors([SamplingParams(repetition_penalty=1.7)] * 2, prompts, outputs)
    ids = [torch.tensor([p + o]) for p, o in zip(prompts, outputs)]
    want = torch.cat([RepetitionPenaltyLogitsProcessor(1.7)(ids[r], logits[r:r + 1].clone()) for r in range(2)])
    assert torch.allclose(apply_penalties(logits, t), want)
    t = tensors([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [[1, 2]], [[5, 5, 7]])
    got = apply_penalties(logits[:1], t)[0]
    delta = logits[0] - got
    assert delta[5].item() == pytest.approx(0.5 + 2 * 0.25) and delta[7].item() == pytest.approx(0.75)
    assert delta[1].item() == 0 and delta[2].item() == 0  # prompt tokens are not output tokens


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.5, top_k=1)]
    out = Sampler()(logits, tensors(params)).token_ids
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax() and out[3] == logits[3].argmax()


def test_samples_follow_the_masked_distribution():
    probs = [0.05, 0.5, 0.15, 0.3] + [0.0] * (V - 4)
    logits = torch.tensor(probs).clamp_min(1e-12).log().repeat(20000, 1)
    torch.manual_seed(4)
    p = SamplingParams(temperature=1.0, top_p=0.7)
    ids = Sampler()(logits, tensors([p] * 20000)).token_ids
    counts = torch.bincount(ids, minlength=V).float() / 20000
    assert set(ids.unique().tolist()) == {1, 3}
    assert counts[1].item() == pytest.approx(0.5 / 0.8, abs=0.02)
    t = SamplingParams(temperature=0.5)  # p^2 renormalised: 0.25 / (0.0025 + 0.25 + 0.0225 + 0.09)
    ids = Sampler()(logits, tensors([t] * 20000)).token_ids
    assert (ids == 1).float().mean().item() == pytest.approx(0.25 / 0.365, abs=0.02)


def test_a_seeded_row_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, V, generator=g)
    alone, batched = [], []
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(30):
        alone.append(Sampler()(logits[:1], tensors([SamplingParams(seed=9)], generators=[ga])).token_ids[0].item())
        t = tensors([SamplingParams(seed=9)] * 3, generators=[gb, None, None])
        batched.append(Sampler()(logits[[0, 3, 4]], t).token_ids[0].item())
    assert alone == batched
    assert len(set(alone)) > 1  # it does sample


def test_logprobs_are_the_raw_log_softmax():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, V, generator=g)
    params = [SamplingParams(temperature=0, logprobs=4, repetition_penalty=2.0)] * 3
    out = Sampler()(logits, tensors(params, [[int(logits[r].argmax())] for r in range(3)]))
    lp = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, lp.gather(-1, out.token_ids[:, None])[:, 0])
    assert torch.equal(out.top_ids, lp.topk(4).indices)


def test_sampling_params_validate():
    from glake.errors import InvalidArgumentError

    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5), dict(max_tokens=0),
                dict(n=0), dict(stop=[""]), dict(logprobs=-1), dict(repetition_penalty=0)):
        with pytest.raises(InvalidArgumentError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(top_k=-1).top_k == 0


def test_host_output_on_the_cpu_is_the_output_itself():
    out = Sampler()(torch.randn(2, V), tensors([SamplingParams(temperature=0)] * 2))
    assert out.to_host() is out and out.to_host().token_ids.tolist() == out.token_ids.tolist()
