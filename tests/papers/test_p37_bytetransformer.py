"""P37 ByteTransformer (Zhai et al., IPDPS 2023): padding-free execution of variable-length batches.

Claims checked (facts sheet P37): a BERT-style encoder run packed gives the padded encoder's outputs on the valid
tokens; the position-wise work (every linear layer) scales with sum_i len_i / (B L_max), exactly; attention runs
per sequence, so the score entries computed are sum_i len_i^2, never a dense mask over the pack. The fused CUDA
kernels' speed-ups are not checkable on CPU; the CPU speed-up is measured in `formers bench speed` (packed_encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import formers
from formers.nn.packed import pack

LENGTHS = [5, 17, 64, 30, 1, 48]


def _bert(pool="mean", position="learned"):
    torch.manual_seed(0)  # BERT's layout: post-LN, GELU MLP, learned positions, biases
    return formers.create_model("encoder", vocab=100, dim=64, depth=2, max_len=128, pool=pool, position=position,
                                block={"placement": "post", "mixer": {"name": "softmax", "heads": 4, "bias": True},
                                       "ffn": {"name": "mlp", "act": "gelu", "mult": 4}}).eval()


def _batch(lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    idx = torch.randint(0, 100, (len(lengths), L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    return idx, mask


def test_packed_bert_equals_padded_on_valid_tokens_fp32():
    model = _bert()
    idx, mask = _batch()
    ids, seqlens = pack(idx, mask)
    assert seqlens.tolist() == [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    with torch.no_grad():
        padded = model.forward_features(idx, mask=mask)  # (B, L, D)
        packed = model.forward_features_packed(ids, seqlens)  # (1, T, D)
        torch.testing.assert_close(packed[0], padded[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_packed(ids, seqlens), model(idx, mask=mask), rtol=0, atol=1e-5)


def _mm_flops(fn) -> int:
    with FlopCounterMode(display=False) as c:
        fn()
    counts = c.get_flop_counts()["Global"]
    return sum(v for k, v in counts.items() if str(k) in ("aten.mm", "aten.addmm", "aten.bmm"))


def test_linear_work_scales_with_the_valid_tokens_exactly():
    model = _bert()
    idx, mask = _batch()
    ids, seqlens = pack(idx, mask)
    with torch.no_grad():
        padded = _mm_flops(lambda: model.forward_features(idx, mask=mask))
        packed = _mm_flops(lambda: model.forward_features_packed(ids, seqlens))
    # every matmul outside attention is position-wise: 2 * tokens * (sum of weight sizes), per token
    weights = sum(m.weight.numel() for m in model.stack.modules() if isinstance(m, torch.nn.Linear))
    assert packed == 2 * sum(LENGTHS) * weights
    assert padded == 2 * len(LENGTHS) * max(LENGTHS) * weights
    assert packed / padded == sum(LENGTHS) / (len(LENGTHS) * max(LENGTHS))


def test_attention_computes_per_sequence_score_blocks_only(monkeypatch):
    model = _bert()
    idx, mask = _batch()
    ids, seqlens = pack(idx, mask)
    entries = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        entries.append(q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] // 4)  # per head: heads = 4
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.forward_features_packed(ids, seqlens)
    per_layer = sum(entries) // 2  # depth 2
    assert per_layer == sum(n * n for n in LENGTHS)  # block-diagonal: sum_i len_i^2, not T^2 or B L_max^2
    entries.clear()
    with torch.no_grad():
        model.forward_features(idx, mask=mask)
    assert sum(entries) // 2 == len(LENGTHS) * max(LENGTHS) ** 2
