"""P46 EMoE: splitting a dense FFN into experts (`moefy`) is exact, and balanced k-means finds planted groups.

References computed here, independently of formers/compress/moefy.py: the dense FFN with a per-token mask of
hidden units (the units of the k experts whose centroid score <mean of the expert's W1 rows, x> is largest), the
k-means objective written out, and the dense model's own logits and greedy continuation.
"""

import pytest
import torch
import yaml

import formers
from formers.cli import main
from formers.compress import balanced_kmeans, cluster_neurons, moefy, moefy_model, moefy_run
from formers.nn.ffn import GLU, MLP
from formers.nn.moe import MoE
from formers.registry import FormersError

D, H, E = 16, 64, 8


def _mlp(act="gelu", bias=True, seed=0):
    torch.manual_seed(seed)
    ffn = MLP(D, hidden=H, act=act, bias=bias).double()
    if bias:
        with torch.no_grad():
            ffn.fc1.bias.normal_(0, 0.5)
            ffn.fc2.bias.normal_(0, 0.5)
    return ffn


def _x(seed=1):
    return torch.randn(3, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _groups(ffn, moe):
    """Which hidden units each expert holds, recovered from the weights: W1 row h == a column of expert e."""
    w1 = ffn.fc1.weight  # (H, D)
    out = []
    for e in range(moe.num_experts):
        cols = moe.experts.w1[e].t()  # (s, D)
        match = (cols[:, None, :] == w1[None, :, :]).all(-1)  # (s, H)
        assert (match.sum(1) == 1).all()  # every expert unit is exactly one dense unit
        out.append(match.float().argmax(1))
    return out


def _kmeans_cost(x, labels):
    return sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in labels.unique())


@pytest.mark.parametrize("clustering", ["balanced_kmeans", "random", "contiguous"])
@pytest.mark.parametrize("act,bias", [("gelu", True), ("relu", False)])
def test_all_experts_reproduce_dense(clustering, act, bias):
    ffn = _mlp(act, bias)
    moe = moefy(ffn, E, E, clustering=clustering)
    assert isinstance(moe, MoE) and moe.combine == "unit" and moe.aux == "none"
    assert moe.eval_capacity_factor is None and moe.capacity_factor is None
    assert not any(p.requires_grad for p in moe.router.parameters())  # the centroid gate is fixed
    x = _x()
    ref = ffn(x)
    assert (moe(x) - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert moe.last_dropped == 0
    assert sum(p.numel() for p in moe.experts.parameters()) == \
        sum(p.numel() for p in ffn.parameters()) + (E - 1) * D * bias  # b2 is repeated per expert (as b2 / k)


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_equals_dense_restricted_to_chosen_units(k):
    ffn = _mlp()
    moe = moefy(ffn, E, k, seed=3)
    labels = cluster_neurons(ffn.fc1.weight, E, seed=3)  # (H,)
    groups = _groups(ffn, moe)
    for g in groups:  # the MoE's experts are the clusters
        assert (labels[g] == labels[g[0]]).all() and len(g) == H // E
    expert_of = torch.empty(H, dtype=torch.long)
    for e, g in enumerate(groups):
        expert_of[g] = e
    x = _x().reshape(-1, D)  # (T, D)
    w1, b1, w2, b2 = ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias
    centroids = torch.stack([w1[g].mean(0) for g in groups])  # (E, D) unnormalised key means
    chosen = (x @ centroids.t()).topk(k, dim=-1).indices  # (T, k)
    mask = (expert_of[None, None, :] == chosen[:, :, None]).any(1).to(x.dtype)  # (T, H) units switched on
    ref = (torch.nn.functional.gelu(x @ w1.t() + b1) * mask) @ w2.t() + b2
    out = moe(x[None])[0]
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert (out - ffn(x)).abs().max() > 1e-3  # with k < E the restriction really changes the output


def test_output_bias_is_added_once_for_any_k():
    ffn = _mlp()
    with torch.no_grad():
        ffn.fc2.weight.zero_()  # the FFN's output is then its bias b2 for every token
    x = _x()
    for k in (1, 3, E):
        for learn in (False, True):
            y = moefy(ffn, E, k, learn_gate=learn)(x)
            tol = 1e-6 if learn else 1e-12  # `route` takes the softmax gates in float32: they sum to 1 to ~1e-7
            assert (y - ffn.fc2.bias).abs().max() <= tol


def test_learned_gate_trains_the_router():
    moe = moefy(_mlp(), E, 2, learn_gate=True)
    assert moe.combine == "softmax"
    moe(_x()).pow(2).sum().backward()
    assert moe.router.net.weight.grad is not None and moe.router.net.weight.grad.abs().max() > 0


@pytest.mark.parametrize("clustering", ["balanced_kmeans", "random", "contiguous"])
def test_clusters_are_an_equal_size_partition(clustering):
    ffn = _mlp()
    labels = cluster_neurons(ffn.fc1.weight, E, clustering, seed=5)
    assert labels.shape == (H,) and torch.equal(torch.bincount(labels, minlength=E), torch.full((E,), H // E))
    assert torch.equal(labels, cluster_neurons(ffn.fc1.weight, E, clustering, seed=5))  # deterministic
    units = torch.cat(_groups(ffn, moefy(ffn, E, 2, clustering=clustering, seed=5)))
    assert torch.equal(units.sort().values, torch.arange(H))  # every hidden unit in exactly one expert


def test_balanced_kmeans_beats_random_grouping_on_planted_clusters():
    g = torch.Generator().manual_seed(0)
    n, size, dim = 8, 16, 24
    centres = torch.nn.functional.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    truth = torch.arange(n).repeat_interleave(size)[torch.randperm(n * size, generator=g)]
    w1 = (centres[truth] + 0.15 * torch.randn(n * size, dim, generator=g, dtype=torch.float64)) * \
        torch.empty(n * size, 1, dtype=torch.float64).uniform_(0.2, 3.0, generator=g)  # row norms vary
    x = torch.nn.functional.normalize(w1, dim=1)  # what the clustering sees
    found = cluster_neurons(w1, n, "balanced_kmeans")
    cost = _kmeans_cost(x, found)
    for seed in range(5):
        assert cost < 0.5 * _kmeans_cost(x, cluster_neurons(w1, n, "random", seed=seed))
    assert cost <= _kmeans_cost(x, truth) + 1e-9  # at least as good as the planted partition
    pairs = (found[:, None] == found[None, :]) == (truth[:, None] == truth[None, :])
    assert pairs.all()  # the planted groups are recovered exactly (up to renaming)


def test_balanced_kmeans_rejects_unequal_split():
    with pytest.raises(FormersError, match="equal"):
        balanced_kmeans(torch.randn(10, 3), 3)


def test_bad_inputs_raise():
    with pytest.raises(FormersError, match="divides 64"):
        moefy(_mlp(), 5, 2)
    with pytest.raises(FormersError, match="k must be"):
        moefy(_mlp(), E, E + 1)
    with pytest.raises(FormersError, match="only the `mlp`"):
        moefy(GLU(D), 2, 1)
    with pytest.raises(FormersError, match="clustering"):
        moefy(_mlp(), E, 2, clustering="kmeans")


def test_encoder_all_experts_exact():
    torch.manual_seed(0)
    model = formers.create_model("encoder", vocab=50, dim=D, depth=2, max_len=16, num_classes=3).double()
    idx = torch.randint(0, 50, (2, 10))
    ref = model(idx)
    moefy_model(model, E, E, layers=[1])
    assert isinstance(model.stack.blocks[1].ffn.fn, MoE) and isinstance(model.stack.blocks[0].ffn.fn, MLP)
    assert (model(idx) - ref).abs().max() <= 1e-10 * ref.abs().max()
    with pytest.raises(FormersError, match="layers must be"):
        moefy_model(model, E, E, layers=[2])


def test_trained_run_moefy_round_trip_and_cli(tiny_recipe, tmp_path, capsys):
    fast = ["train.steps=6", "train.eval_every=6", "train.ckpt_every=6", "task.eval_limit=256", "task.sample_tokens=0"]
    run = formers.fit(tiny_recipe, fast, out=tmp_path / "run")["run_dir"]
    dense = formers.load_run(run)
    hidden = dense.stack.blocks[0].ffn.fn.fc1.out_features
    out = moefy_run(run, tmp_path / "moe", n_experts=8, k=8)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["block"]["ffn"]["name"] == "moe" and cfg["model"]["block"]["ffn"]["hidden"] == hidden // 8
    moe = formers.load_run(out)
    assert all(isinstance(b.ffn.fn, MoE) for b in moe.stack.blocks)
    idx = torch.randint(0, 256, (2, 24))
    y = dense(idx)
    assert (moe(idx) - y).abs().max() <= 1e-5 * y.abs().max()
    prompt = idx[:1, :8]
    assert torch.equal(dense.double().generate(prompt, 20, greedy=True), moe.double().generate(prompt, 20, greedy=True))

    # one layer, k < experts: the saved run equals the in-memory conversion
    part = moefy_run(run, tmp_path / "part", n_experts=4, k=2, layers=[1])
    cfg = yaml.safe_load((part / "config.yaml").read_text())
    assert cfg["model"]["layers"]["1"]["ffn"]["name"] == "moe" and "0" not in cfg["model"]["layers"]
    loaded = formers.load_run(part)
    ref = moefy_model(formers.load_run(run), 4, 2, layers=[1])
    assert isinstance(loaded.stack.blocks[0].ffn.fn, MLP)
    assert torch.equal(loaded(idx), ref(idx))
    with pytest.raises(FormersError, match="already exists"):
        moefy_run(run, tmp_path / "part", n_experts=4, k=2)

    capsys.readouterr()
    assert main(["moefy", str(run), "--experts", "4", "--k", "1", "--layers", "0", "--out", str(tmp_path / "c")]) == 0
    assert "moefied" in capsys.readouterr().out
    assert isinstance(formers.load_run(tmp_path / "c").stack.blocks[0].ffn.fn, MoE)
    assert main(["moefy", str(run), "--experts", "5", "--k", "2", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "divides" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
