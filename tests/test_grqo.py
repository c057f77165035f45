"""GRQO objective (grqo.py) against values worked out by hand, its edge cases and gradient
paths. Every documented argument and promise of grqo.py's public functions has a test here
that fails when the code ignores it (train_grqo.py's reference model is tested in
test_train.py)."""

import inspect
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grqo import FORMS, group_advantages, grqo_loss, mute_mask, objectness_kl, query_rewards

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


def gradient_or_zeros(tensor):
    """The gradient a backward pass left on a leaf; zeros where none reached it."""
    return torch.zeros_like(tensor) if tensor.grad is None else tensor.grad


def test_query_rewards_by_hand():
    """(2)-(3): r_i = -min_j C_ij; gt_mask None means every column is a real ground truth."""
    rewards, has_gt = query_rewards(COST)
    torch.testing.assert_close(rewards, REWARDS)
    assert has_gt.tolist() == [True]


def test_query_rewards_ignore_padding_columns():
    """gt_mask: a padding column (False) never counts as a query's nearest ground truth."""
    padded = torch.cat([COST, torch.full((1, 3, 1), -100.0)], dim=2)   # a padding column
    rewards, _ = query_rewards(padded, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(rewards, REWARDS)


def test_query_rewards_shapes_and_gradient_reach_only_the_nearest_real_ground_truth():
    """query_rewards returns rewards (B, Q) and has_gt (B,) bool, and the gradient of r_i
    flows into the cost entry of query i's nearest real ground truth only (d r_i / d C = -1
    there, 0 elsewhere, padding included)."""
    padded = torch.cat([COST, torch.full((1, 3, 1), -100.0)], dim=2).requires_grad_(True)
    rewards, has_gt = query_rewards(padded, torch.tensor([[True, True, False]]))
    assert rewards.shape == (1, 3) and rewards.dtype == torch.float32
    assert has_gt.shape == (1,) and has_gt.dtype == torch.bool
    rewards[0, :2].sum().backward()               # query 2's tied minima are left out
    expected = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]])
    assert torch.equal(padded.grad, expected)


def test_query_rewards_are_zero_without_ground_truth():
    """An image whose ground-truth slots are all padding, or a batch with M = 0 slots, gets
    r = 0 and has_gt False (not -inf), and its costs get no gradient."""
    cost = torch.tensor([[[1.0, 5.0], [3.0, 2.0], [6.0, 4.0]]] * 2, requires_grad=True)
    rewards, has_gt = query_rewards(cost, torch.tensor([[True, True], [False, False]]))
    assert has_gt.tolist() == [True, False]
    assert rewards.tolist() == [[-1.0, -2.0, -4.0], [0.0, 0.0, 0.0]]
    rewards.sum().backward()
    assert torch.equal(cost.grad[1], torch.zeros(3, 2))
    rewards, has_gt = query_rewards(torch.zeros(2, 3, 0))
    assert rewards.tolist() == [[0.0] * 3] * 2 and has_gt.tolist() == [False, False]


def test_group_advantages_by_hand():
    """(4) with the unbiased standard deviation."""
    torch.testing.assert_close(group_advantages(REWARDS), ADVANTAGES, atol=1e-5, rtol=1e-5)


def test_group_advantages_are_standardised_per_image():
    """(4) is per image: each row gets its own mean and std, so a row shifted and scaled
    (3 r + 10) has the same advantages as r, whatever the other rows hold."""
    rewards = torch.cat([REWARDS, 3 * REWARDS + 10])
    torch.testing.assert_close(group_advantages(rewards), torch.cat([ADVANTAGES, ADVANTAGES]),
                               atol=1e-5, rtol=1e-5)


def test_group_advantages_honour_eps():
    """eps is added to the std: with eps = 1, A = (r - mean) / (1.892969 + 1)
    = [0.833333, 1.333333, -2.166667] / 2.892969; with the default 2e-9 and a tiny spread,
    r = [0, 0, -6e-9]: r - mean = [2, 2, -4] x 1e-9, std = sqrt(12) x 1e-9, so
    A = [2, 2, -4] / (sqrt(12) + 2) = [0.366025, 0.366025, -0.732051] (not +-0.577, +-1.155)."""
    torch.testing.assert_close(group_advantages(REWARDS, eps=1.0),
                               torch.tensor([[0.288055, 0.460887, -0.748942]]),
                               atol=1e-5, rtol=1e-5)
    tiny = torch.tensor([[0.0, 0.0, -6e-9]])
    torch.testing.assert_close(group_advantages(tiny),
                               torch.tensor([[0.366025, 0.366025, -0.732051]]),
                               atol=1e-4, rtol=1e-4)


def test_group_advantages_are_zero_for_an_invalid_image():
    """valid: an image marked False (no ground truth) gets zero advantages even when its
    rewards vary; a valid image keeps its own."""
    rewards = torch.cat([REWARDS, REWARDS])
    advantages = group_advantages(rewards, torch.tensor([True, False]))
    torch.testing.assert_close(advantages[0], ADVANTAGES[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(advantages[1], torch.zeros(3))


def test_group_advantages_are_zero_for_an_equal_group_even_after_rounding():
    """Zero variance gives zeros: in float32 the mean of [-7.3, -7.3, -7.3] is not exactly
    -7.3, so r - mean is 4.8e-7 with std 0, and (r - mean) / (std + eps) would give A = 238
    for every query; the contract says 0, with a zero gradient."""
    rewards = torch.full((1, 3), -7.3, requires_grad=True)
    advantages = group_advantages(rewards)
    assert torch.equal(advantages, torch.zeros(1, 3))
    advantages.sum().backward()
    assert torch.equal(rewards.grad, torch.zeros(1, 3))


def test_group_advantages_are_zero_for_a_group_of_one_query():
    """A group of one query (no std) gives zeros, never NaN, and so does grqo_loss with
    Q = 1 in every form, value and gradient (beta > 0 with equal logits keeps a graph)."""
    rewards = torch.tensor([[-3.0], [-1.0]], requires_grad=True)
    assert torch.equal(group_advantages(rewards), torch.zeros(2, 1))
    cost = torch.tensor([[[1.0, 2.0]]], requires_grad=True)
    logits = torch.zeros(1, 1, requires_grad=True)
    for form in FORMS:
        loss, _ = grqo_loss([cost], logits, torch.zeros(1, 1), alpha=1.0, form=form)
        loss.backward()
        assert loss.item() == 0.0, form
        assert torch.equal(gradient_or_zeros(cost), torch.zeros(1, 1, 2)), form
        assert torch.equal(gradient_or_zeros(logits), torch.zeros(1, 1)), form


def test_objectness_kl_by_hand_and_zero_when_equal():
    """(5): the k3 estimator O_ref/O - log(O_ref/O) - 1, exactly 0 when policy == reference."""
    torch.testing.assert_close(objectness_kl(LOGITS, REF_LOGITS), KL, atol=1e-6, rtol=1e-5)
    same = torch.randn(4, 7)
    assert torch.equal(objectness_kl(same, same.clone()), torch.zeros(4, 7))


def test_objectness_kl_is_computed_in_log_space():
    """Stability: with logits -120 and -121 the probabilities underflow in float32 (a ratio
    of sigmoids would be 0/0), but log O_ref - log O = -1, so KL = e^-1 + 1 - 1 = 0.367879."""
    kl = objectness_kl(torch.tensor([-120.0]), torch.tensor([-121.0]))
    torch.testing.assert_close(kl, torch.tensor([math.exp(-1.0)]))


def test_objectness_kl_is_never_negative():
    """objectness_kl promises KL >= 0 everywhere, including nearly equal logits, where
    exp(x) - x - 1 cancels in float32 (logits 2.2 against 2.201 gave -5.96e-8)."""
    logits = torch.tensor([2.2, 3.1, 4.2])
    assert (objectness_kl(logits, logits + torch.tensor([0.001, 0.001, 0.01])) >= 0).all()
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(100_000, generator=generator)
    ref_logits = logits + 0.01 * torch.randn(100_000, generator=generator)
    assert (objectness_kl(logits, ref_logits) >= 0).all()


def test_grqo_loss_by_hand():
    """(6) on the worked example, and the "reward" and "kl" statistics."""
    # m = [1, 1, 0] (one third muted); mean of -0.01 * m * A = -0.01 * 1.144586 / 3
    # KL term = 0.24 * mean(KL) = 0.24 * 0.166667 / 3
    expected = -0.01 * (0.440225 + 0.704361) / 3 + 0.24 * (0.094535 + 0.072132) / 3
    loss, stats = grqo_loss([COST], LOGITS, REF_LOGITS, alpha=0.01, beta=0.24)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["reward"].item() == pytest.approx(-5.5 / 3, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(0.166667 / 3, abs=1e-6)


def test_grqo_loss_sums_over_layers_stacked_or_list():
    """costs: a list and a stacked (L, B, Q, M) tensor give the same sum over layers."""
    stacked = torch.stack([COST, 2 * COST])
    loss_list, _ = grqo_loss([COST, 2 * COST], LOGITS, REF_LOGITS, beta=0.0)
    loss_stacked, _ = grqo_loss(stacked, LOGITS, REF_LOGITS, beta=0.0)
    single, _ = grqo_loss([COST], LOGITS, REF_LOGITS, beta=0.0)
    # Advantages are scale-invariant, so the doubled cost gives the same term again.
    torch.testing.assert_close(loss_list, loss_stacked)
    torch.testing.assert_close(loss_list, 2 * single)


def test_zero_variance_and_no_ground_truth_give_zeros_and_finite_gradients():
    """A flat group and an image without ground truth give zero advantages, finite gradients."""
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
    """m_i: the last mute_fraction of the queries (in score order) are muted, the rest are not."""
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


def test_mute_mask_dtype_device_and_ends():
    """mute_mask returns (Q,) float on the given device; mute_fraction 1 mutes everything,
    0.5 of 4 the last two (the meta device needs no data, so a CPU run sees whether the
    device argument is honoured)."""
    mask = mute_mask(4, 0.5)
    assert mask.dtype == torch.float32 and mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert mute_mask(3, 1.0).tolist() == [0.0, 0.0, 0.0]
    assert mute_mask(3, 1 / 3).tolist() == [1.0, 1.0, 0.0]
    on_meta = mute_mask(6, 1 / 3, device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (6,)


def test_kl_term_is_counted_once_whatever_the_number_of_layers():
    """Beta convention: beta * mean KL once, not once per layer; the kl_term statistic."""
    loss, stats = grqo_loss([COST, 2 * COST, 3 * COST], LOGITS, REF_LOGITS, alpha=0.0,
                            beta=0.24)
    assert loss.item() == pytest.approx(0.24 * KL.mean().item(), abs=1e-6)
    assert stats["kl_term"].item() == pytest.approx(loss.item())
    assert stats["policy_term"].item() == 0.0


def test_paper_form_differentiates_through_the_cost_not_objectness():
    """form="paper": gradient into the cost, through the mean and std; none into objectness."""
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
    """form="pg": -alpha m A.detach() log O, gradient into the objectness logits only."""
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
    """form="detached_stats": the mean and std are constants; muted queries get no gradient."""
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
    """form="advantage_pull": -alpha m max(A, 0).detach() r, value and gradient."""
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
    """form: a name outside FORMS raises ValueError."""
    with pytest.raises(ValueError):
        grqo_loss([COST], LOGITS, REF_LOGITS, form="reinforce")


def test_reward_statistic_is_the_mean_over_images_with_ground_truth():
    """"reward": the mean of r_i over layers, queries and the images with ground truth."""
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
    """No host sync on CUDA (see also the meta-device test that runs on CPU)."""
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
    """grqo.py depends on torch alone: a copy runs in an empty folder."""
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


def test_grqo_loss_defaults_are_the_documented_ones():
    """Defaults: alpha = 0.01, beta = 0.24 (6 x the release's 0.04), mute_fraction = 1/3,
    form "paper", eps = 2e-9 (METHOD section 4), checked by value and in the signature."""
    expected = -0.01 * (0.440225 + 0.704361) / 3 + 0.24 * (0.094535 + 0.072132) / 3
    loss, _ = grqo_loss([COST], LOGITS, REF_LOGITS)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(grqo_loss).parameters.items()}
    assert defaults["alpha"] == 0.01 and defaults["beta"] == 0.24
    assert defaults["mute_fraction"] == pytest.approx(1 / 3) and defaults["form"] == "paper"
    assert defaults["eps"] == 2e-9
    assert inspect.signature(group_advantages).parameters["eps"].default == 2e-9


def test_grqo_loss_passes_eps_on():
    """grqo_loss's eps reaches (4): with alpha = 1, beta = 0 and eps = 1 the loss is
    -(0.288055 + 0.460887) / 3 (the advantages of test_group_advantages_honour_eps)."""
    loss, _ = grqo_loss([COST], LOGITS, LOGITS, alpha=1.0, beta=0.0, eps=1.0)
    assert loss.item() == pytest.approx(-(0.288055 + 0.460887) / 3, abs=1e-6)


# The advantage term of each form on the worked example with alpha = 1 (m = [1, 1, 0],
# log O = [ln 0.5, ln 0.75, ln 0.5] for LOGITS):
#   paper, detached_stats: -(0.440225 + 0.704361) / 3                             = -0.381529
#   pg:                    -(0.440225 ln 0.5 + 0.704361 ln 0.75) / 3               =  0.169258
#   advantage_pull:        -(0.440225 x -1 + 0.704361 x -0.5) / 3                  =  0.264135
FORM_VALUES = {"paper": -0.381529, "detached_stats": -0.381529, "pg": 0.169258,
               "advantage_pull": 0.264135}


def test_forms_are_the_documented_four():
    """FORMS lists exactly the four documented forms, each with its hand value below."""
    assert FORMS == ("paper", "pg", "detached_stats", "advantage_pull")
    assert set(FORMS) == set(FORM_VALUES)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("form", FORMS)
def test_every_form_by_hand_and_linear_in_alpha(form, alpha):
    """Each form's value (6) on the worked example, scaled by alpha, and reported as the
    "policy_term" statistic."""
    loss, stats = grqo_loss([COST], LOGITS, LOGITS, alpha=alpha, beta=0.0, form=form)
    assert loss.item() == pytest.approx(alpha * FORM_VALUES[form], abs=1e-6)
    assert stats["policy_term"].item() == pytest.approx(alpha * FORM_VALUES[form], abs=1e-6)


def test_grqo_loss_sums_layers_that_differ():
    """The advantage term is summed over layers, each with its own advantages: layer 2
    reverses the queries (r = [-4, -0.5, -1], A = [-1.144586, 0.704361, 0.440225]), so with
    alpha = 1: -(0.440225 + 0.704361) / 3 - (-1.144586 + 0.704361) / 3 = -0.234787. A single
    (B, Q, M) tensor counts as one layer."""
    layers = [COST, COST.flip(1)]
    for costs in (layers, torch.stack(layers)):
        loss, stats = grqo_loss(costs, LOGITS, LOGITS, alpha=1.0, beta=0.0)
        assert loss.item() == pytest.approx(-0.234787, abs=1e-6)
        assert stats["policy_term"].item() == pytest.approx(-0.234787, abs=1e-6)
    single, _ = grqo_loss(COST, LOGITS, LOGITS, alpha=1.0, beta=0.0)
    assert single.item() == pytest.approx(FORM_VALUES["paper"], abs=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_images_without_signal_contribute_zero_in_every_form(form):
    """An image without ground truth and an image whose group is flat contribute zero (the
    mean over b just counts them), never NaN, and get no gradient, in every form. Image 0
    is the worked example, so the loss is its value / 3."""
    cost = torch.tensor([[[1.0, 3.0], [2.0, 0.5], [4.0, 4.0]],
                         [[7.3, 9.0], [7.3, 8.0], [7.3, 7.3]],     # flat: r = -7.3 each
                         [[1.0, 5.0], [3.0, 2.0], [6.0, 4.0]]],    # padding only
                        requires_grad=True)
    gt_mask = torch.tensor([[True, True], [True, True], [False, False]])
    logits = torch.cat([LOGITS, torch.zeros(2, 3)]).requires_grad_(True)
    loss, _ = grqo_loss([cost], logits, logits.detach(), alpha=1.0, beta=0.0, form=form,
                        gt_mask=gt_mask)
    assert loss.item() == pytest.approx(FORM_VALUES[form] / 3, abs=1e-6)
    loss.backward()
    cost_gradient, logits_gradient = gradient_or_zeros(cost), gradient_or_zeros(logits)
    assert torch.isfinite(cost_gradient).all() and torch.isfinite(logits_gradient).all()
    assert torch.equal(cost_gradient[1:], torch.zeros(2, 3, 2))
    assert torch.equal(logits_gradient[1:], torch.zeros(2, 3))


def test_grqo_loss_with_no_ground_truth_slots():
    """Empty targets (M = 0): the advantage term is 0, the loss is beta * mean KL, the reward
    statistic is 0, nothing is NaN."""
    cost = torch.zeros(1, 3, 0)
    for form in FORMS:
        loss, stats = grqo_loss([cost], LOGITS, REF_LOGITS, beta=0.24, form=form)
        assert loss.item() == pytest.approx(0.24 * (0.094535 + 0.072132) / 3, abs=1e-6)
        assert stats["reward"].item() == 0.0 and stats["policy_term"].item() == 0.0


def test_paper_form_gradient_by_hand():
    """form="paper" differentiates through the group's std as well as its mean. With
    alpha = 1 and m = [1, 1, 0], L = -(1/Q) sum_i m_i c_i / s with c = r - mean r and
    s^2 = sum c^2 / (Q - 1), so
        dL/dr_k = -(1/Q) [(m_k - 2/3) / s - S c_k / (2 s^3)],  S = sum m_i c_i = 13/6,
    c = [5/6, 4/3, -13/6], s = 1.892969, and dL/dC at the nearest entry is -dL/dr_k:
        [0.0143329, -0.0122854, -0.0020476]
    (detaching the std would give [0.0586967, 0.0586967, -0.1173935])."""
    s, total = 1.892969, 13 / 6
    centred, muted = [5 / 6, 4 / 3, -13 / 6], [1.0, 1.0, 0.0]
    pull = [((muted[k] - 2 / 3) / s - total * centred[k] / (2 * s ** 3)) / 3 for k in range(3)]
    cost = COST.clone().requires_grad_(True)
    loss, _ = grqo_loss([cost], LOGITS, LOGITS, alpha=1.0, beta=0.0, form="paper")
    loss.backward()
    assert cost.grad[0, 0].tolist() == pytest.approx([pull[0], 0.0], abs=1e-6)
    assert cost.grad[0, 1].tolist() == pytest.approx([0.0, pull[1]], abs=1e-6)
    assert cost.grad[0, 2].sum().item() == pytest.approx(pull[2], abs=1e-6)
    assert pull[0] == pytest.approx(0.0143329, abs=1e-6)


def test_kl_gradient_reaches_the_policy_but_not_the_reference():
    """The reference logits get no gradient (detached), the policy's do, by hand:
    d/ds [beta mean KL] = (beta / Q) (1 - O_ref / O) (1 - O)
        = 0.08 x [(1 - 1.5) x 0.5, (1 - 2/3) x 0.25, 0] = [-0.02, 0.0066667, 0]."""
    logits = LOGITS.clone().requires_grad_(True)
    ref_logits = REF_LOGITS.clone().requires_grad_(True)
    loss, _ = grqo_loss([COST], logits, ref_logits, alpha=0.0, beta=0.24)
    loss.backward()
    assert ref_logits.grad is None
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.02, 0.08 / 12, 0.0]]),
                               atol=1e-7, rtol=1e-5)


def test_statistics_are_detached_scalars():
    """The statistics are detached scalar tensors: "reward", "kl", "policy_term",
    "kl_term"."""
    cost = COST.clone().requires_grad_(True)
    logits = LOGITS.clone().requires_grad_(True)
    for form in FORMS:
        _, stats = grqo_loss([cost], logits, REF_LOGITS, form=form)
        assert set(stats) == {"reward", "kl", "policy_term", "kl_term"}
        for name, value in stats.items():
            assert value.shape == () and not value.requires_grad, (form, name)


def test_grqo_loss_needs_no_data_on_the_host():
    """No host sync, checked on CPU: on the meta device tensors have no data, so an .item()
    or a boolean index raises; the loss, its gradient and the statistics must still come
    out, on that device, in every form."""
    cost = torch.rand(2, 3, 5, 4, device="meta", requires_grad=True)
    logits = torch.randn(3, 5, device="meta", requires_grad=True)
    gt_mask = torch.ones(3, 4, dtype=torch.bool, device="meta")
    for form in FORMS:
        loss, stats = grqo_loss(cost, logits, torch.randn(3, 5, device="meta"),
                                gt_mask=gt_mask, form=form)
        loss.backward()
        assert loss.device.type == "meta" and cost.grad.device.type == "meta"
        assert all(value.device.type == "meta" for value in stats.values())
