"""The batched sampler on hand-made logits."""

from __future__ import annotations

import pytest
import torch

from scalellm.protocol.errors import InvalidParameterError
from scalellm.protocol.sampling_params import SamplingParams
from scalellm.worker.sampler import SamplingRow, sample

V = 8


def row(prompt=(1,), output=(), seed=None, **kw) -> SamplingRow:
    p = SamplingParams(**kw)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(p, list(prompt) + list(output), len(prompt), frozenset({0}), gen)


def logits_of(*rows_values) -> torch.Tensor:
    return torch.tensor(rows_values, dtype=torch.float32)


def test_greedy_and_top_k_one():
    lg = logits_of([0, 1, 5, 2, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 9, 0])
    toks, _ = sample(lg.clone(), [row(temperature=0.0), row(temperature=1.0, top_k=1)])
    assert toks == [2, 6]


def test_top_p_keeps_the_nucleus():
    # probs ~ [0.6, 0.3, 0.1, ...]: top_p=0.5 keeps only token 0; top_p=0.8 keeps 0 and 1
    base = torch.log(torch.tensor([0.6, 0.3, 0.1, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    g = torch.Generator().manual_seed(0)
    seen_small, seen_mid = set(), set()
    for _ in range(200):
        t, _ = sample(torch.stack([base, base]), [row(top_p=0.5), row(top_p=0.8)], g)
        seen_small.add(t[0])
        seen_mid.add(t[1])
    assert seen_small == {0}
    assert seen_mid == {0, 1}


def test_min_p_filters_relative_to_max():
    base = torch.log(torch.tensor([0.5, 0.3, 0.04, 0.16, 1e-9, 1e-9, 1e-9, 1e-9]))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        t, _ = sample(base.unsqueeze(0).clone(), [row(min_p=0.2)], g)
        seen.add(t[0])
    assert seen == {0, 1, 3}  # 0.04 < 0.2 * 0.5


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0])
    base = torch.log(probs.clamp_min(1e-12))
    g = torch.Generator().manual_seed(123)
    n = 4000
    counts = torch.zeros(V)
    for _ in range(n // 100):
        toks, _ = sample(base.repeat(100, 1), [row() for _ in range(100)], g)
        counts += torch.bincount(torch.tensor(toks), minlength=V)
    freq = counts / n
    assert torch.allclose(freq[:4], probs[:4], atol=0.03)
    assert counts[4:].sum() == 0


def test_large_vocab_mixed_batch_follows_the_distribution():
    """Unseeded rows (inverse CDF) beside seeded ones (exponential race), at a real
    vocab size with the mass at its far end, where float32 running sums would blur."""
    vocab = 49152
    probs = torch.zeros(vocab)
    probs[[vocab - 1, vocab - 2, vocab - 3, 7]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    probs += 1e-7  # a floor spread over the whole vocab: ~0.5% of the mass
    probs /= probs.sum()
    base = torch.log(probs)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(vocab)
    n = 0
    for i in range(40):
        rows = [row(seed=i * 100 + j) if j % 4 == 0 else row() for j in range(64)]
        toks, _ = sample(base.repeat(64, 1), rows, g)
        counts += torch.bincount(torch.tensor(toks), minlength=vocab)
        n += 64
    freq = counts / n
    for t, p in ((vocab - 1, 0.4), (vocab - 2, 0.3), (vocab - 3, 0.2), (7, 0.1)):
        assert abs(float(freq[t]) - p) < 0.03, (t, float(freq[t]))


def test_temperature_sharpens():
    base = torch.tensor([[1.0, 0.0, 0, 0, 0, 0, 0, 0]])
    g = torch.Generator().manual_seed(5)
    hot = sum(sample(base.clone(), [row(temperature=5.0)], g)[0][0] == 0 for _ in range(400))
    cold = sum(sample(base.clone(), [row(temperature=0.05)], g)[0][0] == 0 for _ in range(400))
    assert cold == 400 and hot < 200


def test_penalties():
    lg = logits_of([5.0, 4.5, 0, 0, 0, 0, 0, 0])
    assert sample(lg.clone(), [row(temperature=0, output=[0], presence_penalty=1.0)])[0] == [1]
    assert sample(lg.clone(), [row(temperature=0, output=[0], presence_penalty=0.4)])[0] == [0]
    assert sample(lg.clone(), [row(temperature=0, output=[0, 0], frequency_penalty=0.3)])[0] == [1]
    # repetition: 5/1.2 = 4.17 < 4.5 ; applies to prompt tokens too
    assert sample(lg.clone(), [row(temperature=0, prompt=[0], repetition_penalty=1.2)])[0] == [1]
    neg = logits_of([-1.0, -1.1, -9, -9, -9, -9, -9, -9])
    assert sample(neg.clone(), [row(temperature=0, prompt=[0], repetition_penalty=1.2)])[0] == [1]


def test_min_tokens_masks_eos_and_stop_tokens():
    lg = logits_of([9.0, 1.0, 8.0, 0, 0, 0, 0, 0])
    assert sample(lg.clone(), [row(temperature=0, min_tokens=2, stop_token_ids=[2])])[0] == [1]
    assert sample(lg.clone(), [row(temperature=0, min_tokens=1, output=[5])])[0] == [0]


def test_seeded_rows_do_not_depend_on_the_batch():
    base = torch.randn(V, generator=torch.Generator().manual_seed(3))
    alone = [sample(base.unsqueeze(0).clone(), [row(seed=42)])[0][0] for _ in range(1)]
    seq_a, seq_b = [], []
    r_a, r_b = row(seed=42), row(seed=42)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        seq_a.append(sample(base.unsqueeze(0).clone(), [r_a], g)[0][0])
        mix = [row(), r_b, row(temperature=0.0), row(top_k=3)]
        seq_b.append(sample(base.repeat(4, 1), mix, g)[0][1])
    assert seq_a == seq_b
    assert seq_a[0] == alone[0]


def test_logprobs_are_raw_model_logprobs():
    lg = torch.randn(2, V, generator=torch.Generator().manual_seed(9))
    expected = lg.log_softmax(-1)
    toks, lps = sample(lg.clone(), [row(temperature=0, logprobs=2, presence_penalty=1.0, output=[1]), row()])
    assert lps[1] is None
    lp = lps[0]
    assert lp.sampled_logprob == pytest.approx(float(expected[0, toks[0]]), abs=1e-6)
    top = expected[0].topk(2)
    assert lp.top_token_ids == top.indices.tolist()
    assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field
    assert field in str(e.value)


def test_device_path_greedy_and_temperature_rows():
    """The GPU path's sampler (`_sample_on_device`, device-agnostic torch ops) run on CPU
    tensors: greedy rows are the argmax, temperature rows follow softmax(logits / T) and
    repeat for a repeated engine generator; rows needing more go to the host path."""
    from scalellm.worker.sampler import _needs_host, _sample_on_device

    logits = torch.tensor([[0.0, 3.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]]).repeat(2000, 1)
    rows = [row(temperature=0.0), row(temperature=1.0)] * 2000
    assert not any(_needs_host(r) for r in rows)
    a = _sample_on_device(logits, rows, torch.Generator().manual_seed(5))
    assert a == _sample_on_device(logits, rows, torch.Generator().manual_seed(5))
    assert all(t == 1 for t in a[0::2])
    counts = torch.bincount(torch.tensor(a[1::2]), minlength=4).float() / 2000
    assert (counts - 0.25).abs().max() < 0.05, counts
    assert _needs_host(row(temperature=1.0, logprobs=2)) and _needs_host(row(temperature=1.0, top_k=3))
    assert _needs_host(row(temperature=0.0, min_tokens=2)) and not _needs_host(row(temperature=0.0, min_tokens=2, ignore_eos=True))
