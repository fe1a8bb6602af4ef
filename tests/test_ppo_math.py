"""PPO math against straightforward reference loops on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import functional as ppo_math


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    shape = mask.shape
    return {
        "mask": mask,
        "values": torch.randn(shape),
        "rewards": torch.randn(shape),
        "logp": -torch.rand(shape) * 3,
        "ref": -torch.rand(shape) * 3,
        "adv": torch.randn(shape),
        "score": torch.tensor([1.0, -2.0, 0.5]),
    }


def test_kl_shaped_rewards_put_the_score_at_the_last_valid_token(batch) -> None:
    kl = ppo_math.kl_penalty(batch["logp"], batch["ref"], "k1")
    rewards = ppo_math.shaped_rewards(batch["score"], kl, batch["mask"], kl_coef=0.1)
    for i, row in enumerate(batch["mask"]):
        last = int(row.sum()) - 1
        for t in range(row.numel()):
            expected = -0.1 * float(kl[i, t]) if row[t] else 0.0
            if t == last:
                expected += float(batch["score"][i])
            assert rewards[i, t].item() == pytest.approx(expected, abs=1e-6)


def test_k3_is_non_negative_and_matches_its_formula(batch) -> None:
    k3 = ppo_math.kl_penalty(batch["logp"], batch["ref"], "k3")
    ratio = torch.exp(batch["ref"] - batch["logp"])
    torch.testing.assert_close(k3, ratio - 1 - torch.log(ratio))
    assert (k3 >= -1e-7).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ppo_math.kl_penalty(batch["logp"], batch["ref"], "k2")


def test_gae_matches_a_reference_loop(batch) -> None:
    gamma, lam = 0.99, 0.95
    advantages, returns = ppo_math.gae(batch["rewards"], batch["values"], batch["mask"], gamma, lam)
    for i, row in enumerate(batch["mask"]):
        n = int(row.sum())
        r, v = batch["rewards"][i, :n].tolist(), batch["values"][i, :n].tolist()
        expected, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_value - v[t] + gamma * lam * running
            expected[t] = running
        assert advantages[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert returns[i, :n].tolist() == pytest.approx([a + b for a, b in zip(expected, v, strict=True)], abs=1e-5)
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_whitening_over_valid_entries(batch) -> None:
    out = ppo_math.whiten(batch["adv"], batch["mask"])
    valid = out[batch["mask"].bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-3)
    assert out[~batch["mask"].bool()].abs().sum() == 0


@pytest.mark.parametrize(("clip_high", "aggregation"), [(0.0, "token-mean"), (0.28, "token-mean"), (0.0, "seq-mean")])
def test_policy_loss_and_clipping_against_a_loop(batch, clip_high: float, aggregation: str) -> None:
    clip = 0.2
    high = clip_high or clip
    new = batch["logp"] + torch.randn_like(batch["logp"]) * 0.3
    loss, low_frac, high_frac, approx_kl = ppo_math.policy_loss(
        new, batch["logp"], batch["adv"], batch["mask"], clip, clip_high, aggregation
    )
    rows, low_count, high_count, kls = [], 0, 0, []
    for i, row in enumerate(batch["mask"]):
        terms = []
        for t in range(int(row.sum())):
            ratio = math.exp(new[i, t] - batch["logp"][i, t])
            a = float(batch["adv"][i, t])
            plain, cut = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + high)
            terms.append(max(plain, cut))
            low_count += cut > plain and ratio < 1
            high_count += cut > plain and ratio > 1
            kls.append(ratio - 1 - math.log(ratio))
        rows.append(terms)
    tokens = [term for terms in rows for term in terms]
    if aggregation == "token-mean":
        expected = sum(tokens) / len(tokens)
    else:  # each response's mean, then the mean over responses
        expected = sum(sum(terms) / len(terms) for terms in rows) / len(rows)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert low_frac.item() == pytest.approx(low_count / len(tokens)) and low_count > 0
    assert high_frac.item() == pytest.approx(high_count / len(tokens)) and high_count > 0
    assert approx_kl.item() == pytest.approx(sum(kls) / len(kls), abs=1e-6)
    same, no_low, no_high, _ = ppo_math.policy_loss(batch["logp"], batch["logp"], batch["adv"], batch["mask"], clip)
    assert no_low.item() == no_high.item() == 0 and same.item() == pytest.approx(
        -ppo_math.masked_mean(batch["adv"], batch["mask"]).item()
    )


def test_clip_higher_lets_the_ratio_of_a_good_token_rise_further() -> None:
    mask, adv, old = torch.ones(1, 1), torch.ones(1, 1), torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(1.25), requires_grad=True)  # ratio 1.25: past 1.2, within 1.28
    symmetric, *_ = ppo_math.policy_loss(new, old, adv, mask, 0.2)
    higher, *_ = ppo_math.policy_loss(new, old, adv, mask, 0.2, clip_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2) and higher.item() == pytest.approx(-1.25)
    (grad,) = torch.autograd.grad(higher, new)
    assert grad.item() != 0  # still learning where the symmetric clip has stopped


def test_value_loss_and_clipping_against_a_loop(batch) -> None:
    clip = 0.2
    old = batch["values"]
    new = old + torch.randn_like(old) * 0.5
    returns = batch["rewards"]
    loss, clipfrac = ppo_math.value_loss(new, old, returns, batch["mask"], clip)
    terms, bits = [], 0
    for i, row in enumerate(batch["mask"]):
        for t in range(int(row.sum())):
            v, o, r = float(new[i, t]), float(old[i, t]), float(returns[i, t])
            vc = o + min(max(v - o, -clip), clip)
            terms.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
            bits += (vc - r) ** 2 > (v - r) ** 2
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-5)
    assert clipfrac.item() == pytest.approx(bits / len(terms))


def test_logprobs_entropy_and_explained_variance() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1)[torch.arange(2)[:, None], torch.arange(3)[None, :], labels]
    torch.testing.assert_close(ppo_math.logprobs_of(logits, labels), expected)
    uniform = torch.zeros(1, 1, 8)
    assert ppo_math.entropy_of(uniform).item() == pytest.approx(math.log(8))
    mask = torch.ones(2, 3)
    returns = torch.randn(2, 3)
    assert ppo_math.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo_math.explained_variance(torch.full_like(returns, returns.mean()), returns, mask) == pytest.approx(
        0.0, abs=1e-6
    )


def test_kl_controller() -> None:
    fixed = ppo_math.KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = ppo_math.KLController(0.1, target=6.0, horizon=1000)
    adaptive.update(12.0, 100)  # KL above target: the coefficient grows (error capped at +20%)
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    adaptive.update(0.0, 100)
    assert adaptive.value < 0.1 * (1 + 0.2 * 0.1)


def test_whitening_and_explained_variance_over_ranks_equal_those_of_the_whole_batch(batch) -> None:
    x, mask = batch["adv"], batch["mask"]
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]  # two ranks' shares of one global batch

    def sum_over_ranks(rank: int):
        other = halves[1 - rank]

        def all_reduce(values: list[float]) -> list[float]:
            theirs = [
                other[1].sum().item(),
                (other[0] * other[1]).sum().item(),
                (other[0] ** 2 * other[1]).sum().item(),
            ]
            return [a + b for a, b in zip(values, theirs, strict=True)]

        return all_reduce

    whole = ppo_math.whiten(x, mask)
    for rank, (part, part_mask) in enumerate(halves):
        alone = ppo_math.whiten(part, part_mask)
        shared = ppo_math.whiten(part, part_mask, all_reduce=sum_over_ranks(rank))
        torch.testing.assert_close(shared, whole[:2] if rank == 0 else whole[2:], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(alone, shared)  # one rank's statistics are not the batch's
    values = x + 0.3 * torch.randn_like(x)
    returns = x
    global_ev = ppo_math.explained_variance(values, returns, mask)
    part_ev = ppo_math.explained_variance(values[:2], returns[:2], mask[:2], all_reduce=None)
    assert part_ev != pytest.approx(global_ev)


def test_logprobs_and_entropy_take_one_log_softmax_and_the_entropy_no_graph(monkeypatch) -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    calls = []
    log_softmax = ppo_math.F.log_softmax
    monkeypatch.setattr(ppo_math.F, "log_softmax", lambda *a, **k: calls.append(1) or log_softmax(*a, **k))
    logprobs, entropy = ppo_math.logprobs_and_entropy(logits, labels)
    assert len(calls) == 1
    assert logprobs.requires_grad and not entropy.requires_grad
    monkeypatch.undo()
    torch.testing.assert_close(logprobs, ppo_math.logprobs_of(logits, labels))
    torch.testing.assert_close(entropy, ppo_math.entropy_of(logits))


def test_full_kl_is_the_kl_of_the_whole_distributions() -> None:
    torch.manual_seed(0)
    p, q = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p), torch.distributions.Categorical(logits=q)
    )
    torch.testing.assert_close(ppo_math.full_kl(p, q), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(ppo_math.full_kl(p, q) > 0) and torch.allclose(
        ppo_math.full_kl(p, p), torch.zeros(2, 3), atol=1e-6
    )


def test_ptx_blocks_never_repeat_across_ranks_epochs_and_iterations_before_the_corpus_is_used() -> None:
    world, per_rank, micro, epochs, iterations = 2, 8, 4, 2, 3
    n_blocks = world * per_rank * epochs * iterations
    seen = []
    for iteration in range(iterations):
        for epoch in range(epochs):
            for rank in range(world):
                for row in range(0, per_rank, micro):
                    seen += ppo_math.ptx_block_indices(
                        iteration * epochs + epoch, rank, world, per_rank, row, micro, n_blocks
                    )
    assert sorted(seen) == list(range(n_blocks))
    assert ppo_math.ptx_block_indices(iterations * epochs, 0, world, per_rank, 0, 2, n_blocks) == [
        0,
        1,
    ]  # then it wraps


def test_group_advantages_against_hand_computed_values() -> None:
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # two prompts of 4 samples
    # rloo: r_i minus the mean of the other three
    rloo = ppo_math.group_advantages(returns, 4, "rloo")
    assert rloo.tolist() == pytest.approx([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 0, 0, 0, 0])
    # grpo: (r - 0.5) / unbiased std of [1, 0, 0, 1] (= sqrt(1/3)); a group that agrees gets 0, not a division by 0
    grpo = ppo_math.group_advantages(returns, 4, "grpo")
    std = math.sqrt(1 / 3)
    assert grpo.tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0, 0, 0], rel=1e-3)
    # dr_grpo: r - the group's mean, no division
    assert ppo_math.group_advantages(returns, 4, "dr_grpo").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown group estimator"):
        ppo_math.group_advantages(returns, 4, "gae")


def test_reinforce_returns_and_group_baseline_against_hand_computed_values() -> None:
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 0.0], [0.3, -0.1, 0.0, 0.0]])  # KL-shaped; row 1 ends at token 1
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    returns = ppo_math.reinforce_returns(rewards, mask)
    torch.testing.assert_close(returns, torch.tensor([[0.7, 0.8, 1.0, 0.0], [0.2, -0.1, 0.0, 0.0]]))
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])  # two prompts of 3 samples
    assert ppo_math.subtract_group_mean(scores, 3).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -2, 0, 2])
