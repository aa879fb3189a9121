"""P56 wide vs deep: with the total head count fixed, a 1-layer x 24-head encoder and a 6-layer x 4-head encoder are
the same config except for `depth` and `heads`, and their parameter counts follow the paper's arithmetic exactly.

P56 "Wide Attention Is The Way Forward For Transformers?": the per-head dimension stays fixed as heads are added, so
attention parameters depend only on the total head count while the wide model has fewer FFN (and norm) blocks, hence
fewer parameters. Here `heads` and `head_dim` are set independently of `dim` (heads * head_dim != dim).
"""

import pytest
import torch

import formers

VOCAB, DIM, HEAD_DIM, MAX_LEN, CLASSES = 256, 64, 16, 32, 2
TOTAL_HEADS = 24



def _config(depth: int, heads: int) -> dict:
    return dict(vocab=VOCAB, dim=DIM, depth=depth, max_len=MAX_LEN, num_classes=CLASSES,
                block={"mixer": {"name": "softmax", "heads": heads, "head_dim": HEAD_DIM}})


def _attention_params(heads: int) -> int:
    # q: D x H*Dh, kv: D x 2*H*Dh, out: H*Dh x D, no biases (the softmax mixer's default)
    return 4 * DIM * heads * HEAD_DIM


FFN = DIM * 4 * DIM + 4 * DIM + 4 * DIM * DIM + DIM  # mlp, hidden 4D, with biases
NORMS = 2 * 2 * DIM  # two LayerNorms (gain + bias) per block
# embeddings, learned positions (max_len + 1 for the cls token), cls token, final norm, classifier
OUTSIDE = VOCAB * DIM + (MAX_LEN + 1) * DIM + DIM + 2 * DIM + DIM * CLASSES + CLASSES


def _expected(depth: int, heads: int) -> int:
    return depth * (_attention_params(heads) + FFN + NORMS) + OUTSIDE


@pytest.mark.parametrize("depth,heads", [(1, 24), (6, 4), (3, 8), (24, 1)])
def test_parameter_count_formula(depth, heads):
    assert depth * heads == TOTAL_HEADS
    model = formers.create_model("encoder", **_config(depth, heads))
    assert model.num_params() == _expected(depth, heads)
    attn = model.stack.blocks[0].attn.fn
    assert (attn.heads, attn.head_dim, attn.q.out_features) == (heads, HEAD_DIM, heads * HEAD_DIM)


def test_wide_is_smaller_by_exactly_the_missing_ffn_blocks():
    wide = formers.create_model("encoder", **_config(1, 24))
    deep = formers.create_model("encoder", **_config(6, 4))
    # same attention parameters in total: 24 heads of the same size either way
    attn = lambda m: sum(p.numel() for b in m.stack.blocks for p in b.attn.fn.parameters())  # noqa: E731
    assert attn(wide) == attn(deep) == _attention_params(TOTAL_HEADS)
    assert deep.num_params() - wide.num_params() == 5 * (FFN + NORMS)
    non_embedding = wide.num_params(exclude_embeddings=True), deep.num_params(exclude_embeddings=True)
    assert non_embedding[0] < non_embedding[1]
    # both run; heads * head_dim (384) differs from dim (64) and the output is still (B, classes)
    idx = torch.randint(0, VOCAB, (2, MAX_LEN))
    mask = torch.ones(2, MAX_LEN, dtype=torch.bool)
    mask[1, 20:] = False
    for model in (wide, deep):
        assert model(idx, mask=mask).shape == (2, CLASSES)
