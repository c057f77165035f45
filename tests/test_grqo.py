"""GRQO objective (grqo.py) against values worked out by hand, its edge cases and gradient
paths, and train_grqo.py's reference model."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grqo import group_advantages, grqo_loss, mute_mask, objectness_kl, query_rewards

ROOT = Path(__file__).resolve().parents[1]

# The worked example: one image, 3 queries x 2 ground truths.
#   cost = [[1, 3], [2, 0.5], [4, 4]]
#   (2) gamma = row minima = [1, 0.5, 4];  (3) r = [-1, -0.5, -4]
#   mean r = -5.5 / 3 = -1.833333;  r - mean = [0.833333, 1.333333, -2.166667]
#   unbiased std = sqrt((0.694444 + 1.777778 + 4.694444) / 2) = sqrt(3.583333) = 1.892969
#   (4) A = [0.440225, 0.704361, -1.144586]
COST = torch.tensor([[[1.0, 3.0], [2.0, 0.5], [4.0, 4.0]]])
REWARDS = torch.tensor([[-1.0, -0.5, -4.0]])
ADVANTAGES = torch.tensor([[0.440225, 0.704361, -1.144586]])
# (5) with logits [0, ln 3, 0] (O = 0.5, 0.75, 0.5) and reference [ln 3, 0, 0]:
#   query 1: O_ref/O = 1.5      -> 1.5 - ln 1.5 - 1 = 0.094535
#   query 2: O_ref/O = 2/3      -> 2/3 - ln(2/3) - 1 = 0.072132
#   query 3: equal              -> 0
LOGITS = torch.tensor([[0.0, math.log(3.0), 0.0]])
REF_LOGITS = torch.tensor([[math.log(3.0), 0.0, 0.0]])
KL = torch.tensor([[0.094535, 0.072132, 0.0]])


def test_query_rewards_by_hand():
    rewards, has_gt = query_rewards(COST)
    torch.testing.assert_close(rewards, REWARDS)
    assert has_gt.tolist() == [True]


def test_query_rewards_ignore_padding_columns():
    padded = torch.cat([COST, torch.full((1, 3, 1), -100.0)], dim=2)   # a padding column
    rewards, _ = query_rewards(padded, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(rewards, REWARDS)


def test_group_advantages_by_hand():
    torch.testing.assert_close(group_advantages(REWARDS), ADVANTAGES, atol=1e-5, rtol=1e-5)


def test_objectness_kl_by_hand_and_zero_when_equal():
    torch.testing.assert_close(objectness_kl(LOGITS, REF_LOGITS), KL, atol=1e-6, rtol=1e-5)
    same = torch.randn(4, 7)
    assert torch.equal(objectness_kl(same, same.clone()), torch.zeros(4, 7))


def test_grqo_loss_by_hand():
    # m = [1, 1, 0] (one third muted); mean of -0.01 * m * A = -0.01 * 1.144586 / 3
    # KL term = 0.24 * mean(KL) = 0.24 * 0.166667 / 3
    expected = -0.01 * (0.440225 + 0.704361) / 3 + 0.24 * (0.094535 + 0.072132) / 3
    loss, stats = grqo_loss([COST], LOGITS, REF_LOGITS, alpha=0.01, beta=0.24)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["reward"].item() == pytest.approx(-5.5 / 3, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.166667 / 3, abs=1e-6)


def test_grqo_loss_sums_over_layers_stacked_or_list():
    stacked = torch.stack([COST, 2 * COST])
    loss_list, _ = grqo_loss([COST, 2 * COST], LOGITS, REF_LOGITS, beta=0.0)
    loss_stacked, _ = grqo_loss(stacked, LOGITS, REF_LOGITS, beta=0.0)
    single, _ = grqo_loss([COST], LOGITS, REF_LOGITS, beta=0.0)
    # Advantages are scale-invariant, so the doubled cost gives the same term again.
    torch.testing.assert_close(loss_list, loss_stacked)
    torch.testing.assert_close(loss_list, 2 * single)


def test_zero_variance_and_no_ground_truth_give_zeros_and_finite_gradients():
    cost = torch.tensor([[[2.0, 5.0], [2.0, 7.0], [2.0, 9.0]],      # flat group: all rewards -2
                         [[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]]],     # no real ground truth
                        requires_grad=True)
    gt_mask = torch.tensor([[True, True], [False, False]])
    rewards, has_gt = query_rewards(cost, gt_mask)
    assert has_gt.tolist() == [True, False]
    advantages = group_advantages(rewards, has_gt)
    assert torch.equal(advantages, torch.zeros(2, 3))
    logits = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grqo_loss(cost, logits, torch.zeros(2, 3), gt_mask=gt_mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cost.grad).all()
    assert torch.isfinite(logits.grad).all()


def test_muting_drops_exactly_the_lowest_ranked_queries():
    assert mute_mask(900, 1 / 3).tolist() == [1.0] * 600 + [0.0] * 300
    assert mute_mask(6, 0.0).tolist() == [1.0] * 6
    cost = torch.rand(2, 6, 3, generator=torch.Generator().manual_seed(0))
    rewards = -cost.min(2).values
    advantages = (rewards - rewards.mean(1, keepdim=True)) / rewards.std(1, keepdim=True)
    unmuted = torch.tensor([1.0] * 4 + [0.0] * 2)                    # written out
    loss, _ = grqo_loss([cost], torch.zeros(2, 6), torch.zeros(2, 6), beta=0.0)
    assert loss.item() == pytest.approx(-(0.01 * unmuted * advantages).mean().item(), abs=1e-7)
    # With the statistics detached, only the unmuted queries' costs get gradient; with the
    # policy-gradient form, only the unmuted queries' objectness logits.
    for form, tensor in (("detached_stats", "cost"), ("pg", "logits")):
        leaves = {"cost": cost.clone().requires_grad_(), "logits": torch.zeros(2, 6).requires_grad_()}
        loss, _ = grqo_loss([leaves["cost"]], leaves["logits"], torch.zeros(2, 6), beta=0.0,
                            form=form)
        loss.backward()
        grad = leaves[tensor].grad.reshape(2, 6, -1)
        assert (grad[:, 4:] == 0).all() and (grad[:, :4] != 0).any(-1).all(), form


def test_kl_term_is_counted_once_whatever_the_number_of_layers():
    loss, stats = grqo_loss([COST, 2 * COST, 3 * COST], LOGITS, REF_LOGITS, alpha=0.0,
                            beta=0.24)
    assert loss.item() == pytest.approx(0.24 * KL.mean().item(), abs=1e-6)
    assert stats["kl_term"].item() == pytest.approx(loss.item())
    assert stats["policy_term"].item() == 0.0


def test_paper_form_differentiates_through_the_cost_not_objectness():
    cost = COST.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    loss, _ = grqo_loss([cost], logits, LOGITS.clone(), beta=0.0, form="paper")
    loss.backward()
    assert cost.grad is not None and cost.grad.abs().sum() > 0
    assert logits.grad is None or torch.equal(logits.grad, torch.zeros_like(logits))
    # Differentiated through the group's mean and std, a term over the whole group (nothing
    # muted) sums to zero for any cost: no gradient at all (detaching them would give some).
    cost = COST.clone().requires_grad_(True)
    loss, _ = grqo_loss([cost], LOGITS, LOGITS, beta=0.0, mute_fraction=0.0, form="paper")
    loss.backward()
    assert cost.grad.abs().max() < 1e-9


def test_pg_form_differentiates_only_into_objectness():
    cost = COST.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    loss, _ = grqo_loss([cost], logits, LOGITS.clone(), beta=0.0, form="pg")
    loss.backward()
    assert cost.grad is None
    assert logits.grad.abs().sum() > 0
    # d/ds of -alpha * m * A * log sigmoid(s) = -alpha * m * A * (1 - sigmoid(s)) / Q
    expected = -0.01 * mute_mask(3, 1 / 3) * ADVANTAGES * (1 - LOGITS.sigmoid()) / 3
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-4)


STD = 1.892969     # the unbiased std of REWARDS, worked out above


@pytest.mark.parametrize("mute_fraction", [1 / 3, 0.0])
def test_detached_stats_form_by_hand(mute_fraction):
    # Same value as "paper": -0.01 * mean(m * A). Gradient: with the mean and std constant,
    # dL/dr_i = -alpha * m_i / (Q * std), and r_i = -C_i,nearest, so each unmuted query's
    # nearest entry gets +0.01 / (3 * 1.892969) = 0.0017609 (query 0: column 0, query 1:
    # column 1, query 2: one of its tied columns); nothing else, muted queries included.
    muted = mute_mask(3, mute_fraction)
    cost = COST.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    loss, _ = grqo_loss([cost], logits, LOGITS.clone(), beta=0.0, form="detached_stats",
                        mute_fraction=mute_fraction)
    assert loss.item() == pytest.approx((-0.01 * muted * ADVANTAGES).mean().item(), abs=1e-7)
    loss.backward()
    pull = 0.01 / (3 * STD)
    assert cost.grad[0, 0].tolist() == pytest.approx([pull, 0.0], abs=1e-8)
    assert cost.grad[0, 1].tolist() == pytest.approx([0.0, pull], abs=1e-8)
    assert cost.grad[0, 2].sum().item() == pytest.approx(pull * muted[2].item(), abs=1e-8)
    assert logits.grad is None or torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("mute_fraction", [1 / 3, 0.0])
def test_advantage_pull_form_by_hand(mute_fraction):
    # -0.01 * m * max(A, 0) * r, averaged over 3 queries; A_2 < 0, so query 2 adds nothing
    # muted or not: -0.01 * (0.440225 * -1 + 0.704361 * -0.5) / 3 = 0.0026413533.
    # Gradient: dL/dC_i,nearest = +0.01 * m_i * max(A_i, 0) / 3:
    #   query 0, column 0: 0.0014674167; query 1, column 1: 0.0023478700; query 2: 0.
    cost = COST.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    loss, _ = grqo_loss([cost], logits, LOGITS.clone(), beta=0.0, form="advantage_pull",
                        mute_fraction=mute_fraction)
    assert loss.item() == pytest.approx(0.01 * (0.440225 + 0.704361 * 0.5) / 3, abs=1e-8)
    loss.backward()
    expected = torch.tensor([[[0.01 * 0.440225 / 3, 0.0], [0.0, 0.01 * 0.704361 / 3],
                              [0.0, 0.0]]])
    torch.testing.assert_close(cost.grad, expected, atol=1e-8, rtol=1e-5)
    assert logits.grad is None or torch.equal(logits.grad, torch.zeros_like(logits))


def test_unknown_form_is_refused():
    with pytest.raises(ValueError):
        grqo_loss([COST], LOGITS, REF_LOGITS, form="reinforce")


def test_reward_statistic_is_the_mean_over_images_with_ground_truth():
    # Image 0 is the worked example (r = [-1, -0.5, -4]); image 1 has no ground truth, and its
    # zero rewards must not dilute the mean. Layer 2 doubles the cost (r = [-2, -1, -8]).
    # Mean over layers, queries and image 0: (-5.5 - 11) / 6 = -2.75.
    cost = torch.cat([COST, torch.full((1, 3, 2), 7.0)])                    # (2, 3, 2)
    gt_mask = torch.tensor([[True, True], [False, False]])
    logits = torch.zeros(2, 3)
    _, stats = grqo_loss([cost, 2 * cost], logits, logits, gt_mask=gt_mask)
    assert stats["reward"].item() == pytest.approx(-2.75, abs=1e-6)
    _, stats = grqo_loss([cost], logits, logits, gt_mask=torch.zeros(2, 2, dtype=torch.bool))
    assert stats["reward"].item() == 0.0                                    # no ground truth


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grqo_loss_does_not_synchronise_with_the_host():
    device = torch.device("cuda")
    costs = torch.rand(2, 3, 5, 4, device=device, requires_grad=True)
    gt_mask = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4], device=device)
    logits, ref_logits = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for form in ("paper", "pg", "detached_stats", "advantage_pull"):
            loss, stats = grqo_loss(costs, logits, ref_logits, gt_mask=gt_mask, form=form)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(stats["reward"])


def test_grqo_py_alone_runs_in_an_empty_folder(tmp_path):
    shutil.copy(ROOT / "grqo.py", tmp_path / "grqo.py")
    # -I: no PYTHONPATH, no user site, not even the current folder; add only that folder.
    # The worked example with alpha = 1, beta = 0: the last of 3 queries is muted, so the
    # loss is -(A_1 + A_2 + 0) / 3 = -(0.440225 + 0.704361) / 3 (0 without the muting).
    script = ("import sys; sys.path.insert(0, '.'); import torch, grqo; "
              "cost = torch.tensor([[[1.0, 3.0], [2.0, 0.5], [4.0, 4.0]]]); "
              "logits = torch.zeros(1, 3); "
              "loss, stats = grqo.grqo_loss(cost, logits, logits, alpha=1.0, beta=0.0); "
              "print(f'{loss.item():.6f} {stats[\"reward\"].item():.6f}')")
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loss, reward = map(float, result.stdout.split())
    assert loss == pytest.approx(-(0.440225 + 0.704361) / 3, abs=1e-5)
    assert reward == pytest.approx(-5.5 / 3, abs=1e-5)
