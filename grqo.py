"""GRQO, Group Relative Query Optimization (DINO-R1, arXiv 2505.24025; METHOD.md section 4).

This file depends on torch alone: copy it into any DETR-like project.

The idea. A DETR-style detector proposes Q queries per image. GRQO treats those Q queries as
a *group* of candidate answers, as GRPO treats a group of sampled answers to one prompt:

    (2)  gamma_i = min_j C_ij                 how well query i fits its nearest ground truth
    (3)  r_i     = -gamma_i                   its reward
    (4)  A_i     = (r_i - mean r) / (std r + eps)    its advantage within the image's group
    (5)  KL_i    = O_ref,i / O_i - log(O_ref,i / O_i) - 1
                                              k3 estimate of KL(O || O_ref) per query, where
                                              O = sigmoid(objectness logit) of the query's
                                              token and O_ref the frozen reference model's
    (6)  L_GRQO  = sum_l mean_{b,i} [ -alpha * m_i * A_i^l ]  +  beta * mean_{b,i} KL_i

C is the pairwise matching cost of the Hungarian matcher (class + L1 + GIoU), one (B, Q, M)
matrix per decoder layer l. m_i is 0 for the lowest-ranked `mute_fraction` of the queries
(they arrive in selection-score order) and 1 otherwise.

What each term does.
- The advantage term rewards every unmuted query for being closer to some ground truth than
  its group's average: dense supervision for all queries, not only the Hungarian-matched
  ones. Since sum_i A_i = 0 over a full group, its gradient would vanish without muting;
  with muting, it pushes the top-ranked queries to be better aligned than the bottom ones.
- The KL term holds the objectness distribution near a reference model (a frozen copy of the
  detector, refreshed every epoch), which keeps query selection from drifting.

Gradient path. `form="paper"` (the default, as in the paper's release) keeps the cost C
differentiable: -alpha * A moves each query's class score and box (through C), and the
objectness logits get gradient from the KL term only. `form="pg"` is the GRPO-style
policy-gradient alternative, -A.detach() * log O: the query selection is the policy, and
gradient reaches only the objectness logits.

Two further forms are this project's variants, not the paper's; both keep the gradient in C,
like "paper", but treat part of the advantage as a constant, as GRPO does:
- `form="detached_stats"`: A_i = (r_i - mean r) / (std r + eps) with the group's mean and
  std detached. Every unmuted query is pulled toward its nearest ground truth with weight
  alpha / (std r + eps); the muted queries get no gradient (nothing pushes them away).
- `form="advantage_pull"`: -alpha * m_i * max(A_i, 0).detach() * r_i. Queries better than
  their group's average are pulled toward their nearest ground truth in proportion to
  their advantage; the others get no gradient. Its value scales with the cost, not with
  the standardised advantage.

Beta convention. The release adds the same KL tensor to each of its 6 per-layer losses with
beta = 0.04, an effective weight of 6 x 0.04 = 0.24. Here the KL term is counted once, with
`beta` as its total weight, so the default beta = 0.24 keeps the release's effective value
whatever the number of decoder layers.

Shapes: B images, Q queries per image, M ground-truth slots per image (padding allowed,
marked by gt_mask), one cost per decoder layer.

Example, inside a DETR-style loss (matcher.pairwise_cost returns the differentiable (B, Q, M)
cost of every prediction against every ground truth, and gt_mask (B, M)):

    from grqo import grqo_loss

    costs = []
    for logits, boxes in zip(layer_logits, layer_boxes):       # one entry per decoder layer
        cost, gt_mask = matcher.pairwise_cost(logits, boxes, targets, prompt_mask)
        costs.append(cost)
    with torch.no_grad():
        # your reference model's objectness logits at the tokens the policy selected
        ref_logits = reference_model.selected_objectness(images, mask, prompts,
                                                         selected_token_indices)
    loss_grqo, stats = grqo_loss(costs, objectness_logits, ref_logits, gt_mask=gt_mask)
    loss = loss_sft + loss_grqo
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def query_rewards(cost: Tensor, gt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """METHOD (2)-(3): r_i = -min_j C_ij over the real ground truths of the image.

    cost (B, Q, M); gt_mask (B, M) bool, True = a real ground truth (None = all real).
    Returns rewards (B, Q) (0 for an image without ground truth) and has_gt (B,) bool.
    Gradient flows into the cost entry of each query's nearest ground truth.
    """
    batch, num_queries, num_gt = cost.shape
    if gt_mask is None:
        gt_mask = torch.ones(batch, num_gt, dtype=torch.bool, device=cost.device)
    has_gt = gt_mask.any(dim=1)
    if num_gt == 0:
        return cost.new_zeros(batch, num_queries), has_gt
    nearest = cost.masked_fill(~gt_mask[:, None, :], float("inf")).min(dim=2).values  # (2)
    nearest = torch.where(has_gt[:, None], nearest, torch.zeros_like(nearest))
    return -nearest, has_gt                                                          # (3)


def group_advantages(rewards: Tensor, valid: Tensor | None = None, eps: float = 2e-9,
                     detach_statistics: bool = False) -> Tensor:
    """METHOD (4): A_i = (r_i - mean r) / (std r + eps) within each image's group of Q queries.

    rewards (B, Q); valid (B,) bool, False for an image without ground truth.
    The standard deviation is the unbiased one (as in GRPO implementations). A group whose
    rewards are all equal (zero variance), an invalid image, or a group of one query gives
    zeros, never NaN. Differentiable through the mean and the std, or, with
    `detach_statistics`, through r_i only (the mean and std are constants).
    """
    batch, num_queries = rewards.shape
    if num_queries < 2:
        return torch.zeros_like(rewards)
    keep = (rewards.amax(dim=1) > rewards.amin(dim=1))                   # zero variance -> 0
    if valid is not None:
        keep = keep & valid
    mean = rewards.mean(dim=1, keepdim=True)
    centred = rewards - (mean.detach() if detach_statistics else mean)
    # Compute the std on safe values only, so that a flat group cannot produce 0/0 gradients.
    safe = torch.where(keep[:, None], centred, torch.ones_like(centred))
    std = safe.std(dim=1, keepdim=True)
    advantages = safe / ((std.detach() if detach_statistics else std) + eps)
    return torch.where(keep[:, None], advantages, torch.zeros_like(advantages))


def objectness_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """METHOD (5): KL_i = O_ref/O - log(O_ref/O) - 1 with O = sigmoid(logits), per query.

    logits, ref_logits: the same shape (e.g. (B, Q)). Computed in log space for stability;
    exactly 0 where the logits are equal, >= 0 everywhere.
    """
    log_ratio = F.logsigmoid(ref_logits.float()) - F.logsigmoid(logits.float())
    # expm1 keeps small values accurate (exp(x) - 1 - x rounds to -6e-8 near x = 0 in
    # float32); the clamp keeps the last rounding from going below 0.
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0)


def mute_mask(num_queries: int, mute_fraction: float, device=None) -> Tensor:
    """m_i of (6): 1 for the top-ranked queries, 0 for the last `mute_fraction` of them
    (the release mutes 300 of 900). Returns (Q,) float."""
    num_muted = int(round(num_queries * mute_fraction))
    mask = torch.ones(num_queries, device=device)
    mask[num_queries - num_muted:] = 0
    return mask


FORMS = ("paper", "pg", "detached_stats", "advantage_pull")


def grqo_loss(costs, objectness_logits: Tensor, ref_objectness_logits: Tensor, *,
              alpha: float = 0.01, beta: float = 0.24, mute_fraction: float = 1 / 3,
              form: str = "paper", gt_mask: Tensor | None = None,
              eps: float = 2e-9) -> tuple[Tensor, dict[str, Tensor]]:
    """METHOD (6): L_GRQO = sum_l mean_{b,i}[-alpha m_i A_i^l] + beta mean_{b,i} KL_i.

    costs: one (B, Q, M) pairwise matching cost per decoder layer, a list or a stacked
        (layers, B, Q, M) tensor (a single (B, Q, M) tensor counts as one layer); queries in
        descending selection-score order.
    objectness_logits (B, Q): the policy's selection logits s_i of the same queries.
    ref_objectness_logits (B, Q): the reference model's logits at the same tokens (no grad).
    form: the advantage term per query, summed over layers and averaged over (b, i):
        "paper"           -alpha m_i A_i, differentiable through the cost (mean, std included);
        "pg"              -alpha m_i A_i.detach() log O_i, gradient into the objectness only;
        "detached_stats"  -alpha m_i A_i with the group's mean and std detached (this
                          project's variant);
        "advantage_pull"  -alpha m_i max(A_i, 0).detach() r_i (this project's variant).
    gt_mask (B, M): True = real ground truth.
    Returns (loss, statistics): detached scalar tensors for logging, computed on the
    tensors' device without a host sync (no boolean indexing, no .item()). "reward" is the
    mean of r_i over layers, queries and the images that have ground truth (0 if none has).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if isinstance(costs, torch.Tensor) and costs.dim() == 3:
        costs = costs[None]
    num_queries = objectness_logits.shape[1]
    muted = mute_mask(num_queries, mute_fraction, objectness_logits.device)
    policy_term = objectness_logits.new_zeros((), dtype=torch.float32)
    reward_sum = objectness_logits.new_zeros((), dtype=torch.float32)
    reward_count = objectness_logits.new_zeros((), dtype=torch.float32)
    for cost in costs:
        rewards, has_gt = query_rewards(cost.float(), gt_mask)
        advantages = group_advantages(rewards, has_gt, eps,
                                      detach_statistics=form == "detached_stats")
        if form in ("paper", "detached_stats"):
            per_query = -alpha * muted * advantages
        elif form == "pg":
            log_objectness = F.logsigmoid(objectness_logits.float())
            per_query = -alpha * muted * advantages.detach() * log_objectness
        else:                                                           # "advantage_pull"
            per_query = -alpha * muted * advantages.detach().clamp(min=0) * rewards
        policy_term = policy_term + per_query.mean()
        with_gt = has_gt.float()[:, None]                                # (B, 1)
        reward_sum = reward_sum + (rewards.detach() * with_gt).sum()
        reward_count = reward_count + with_gt.sum() * num_queries
    kl = objectness_kl(objectness_logits, ref_objectness_logits.detach())
    kl_term = beta * kl.mean()
    stats = {"reward": reward_sum / reward_count.clamp(min=1),
             "kl": kl.detach().mean(),
             "policy_term": policy_term.detach(),
             "kl_term": kl_term.detach()}
    return policy_term + kl_term, stats
