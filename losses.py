"""The Hungarian matcher (METHOD (1)), whose cost also gives GRQO its rewards, and the SFT
losses (METHOD section 3), in DETR's division: HungarianMatcher pairs queries with ground
truths, SetCriterion computes the losses of a DetectorOutput.
"""

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, sigmoid_focal_loss

from model import DenoisingTargets, DetectorOutput, pad_targets



# ------------------------------------------------------------------------------ matching

def elementwise_giou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """GIoU of boxes and gt_boxes (..., 4) cxcywh, broadcast against each other -> (...):
    torchvision.ops.generalized_box_iou's arithmetic, for pairs instead of every pair of two
    lists, so that a batch of sets needs no (N, N) matrix. Pairwise within each image:
    elementwise_giou(boxes[..., :, None, :], gt_boxes[..., None, :, :]) -> (..., Q, M)."""
    first = box_convert(boxes.float(), "cxcywh", "xyxy")          # as torchvision upcasts
    second = box_convert(gt_boxes.float(), "cxcywh", "xyxy")
    area_first = (first[..., 2] - first[..., 0]) * (first[..., 3] - first[..., 1])
    area_second = (second[..., 2] - second[..., 0]) * (second[..., 3] - second[..., 1])
    overlap = (torch.min(first[..., 2:], second[..., 2:])
               - torch.max(first[..., :2], second[..., :2])).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    union = area_first + area_second - intersection
    hull = (torch.max(first[..., 2:], second[..., 2:])
            - torch.min(first[..., :2], second[..., :2])).clamp(min=0)
    hull_area = hull[..., 0] * hull[..., 1]
    return intersection / union - (hull_area - union) / hull_area


class Matches(NamedTuple):
    """The Hungarian assignment of several prediction sets at once: pair p matches query
    `query[p]` of set `set[p]` and image `image[p]` with that image's ground truth
    `ground_truth[p]`. Each (P,) long, on the predictions' device."""
    set: Tensor
    image: Tensor
    query: Tensor
    ground_truth: Tensor


class HungarianMatcher:
    """One-to-one matching of predictions to ground truth with the cost of METHOD (1):

        C_ij = 2.0 * C_class(i, j) + 5.0 * |b_i - b_j|_1 + 2.0 * (-GIoU(b_i, b_j))

    With p_ik = sigmoid(logit of query i for prompt k), k_j the prompt of ground truth j,
    pos(p) = alpha (1 - p)^gamma (-log p) and neg(p) = (1 - alpha) p^gamma (-log(1 - p)),
    `class_cost` picks C_class (METHOD section 4, "the release's cost C"):
    - "focal" (DINO-style, the default): pos(p_ik_j) - neg(p_ik_j), j's prompt only;
      unbounded below as p -> 1.
    - "binary_focal" (the release's, mmdetection's BinaryFocalLossCost): the sum over every
      real prompt k of y_jk pos(p_ik) + (1 - y_jk) neg(p_ik), y_j the one-hot of k_j, so a
      query is also charged for scoring the other prompts; bounded below by 0.
    Every decoder layer and the encoder's proposals are matched in one go (`assign`): one
    transfer of their costs to the host, the assignments, one transfer back.
    """

    CLASS_COSTS = ("focal", "binary_focal")

    def __init__(self, class_weight: float = 2.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 class_cost: str = "focal"):
        if class_cost not in self.CLASS_COSTS:
            raise ValueError(f"class_cost must be one of {self.CLASS_COSTS}, got {class_cost!r}")
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.class_cost = class_cost

    def layer_costs(self, output: "DetectorOutput", targets: list) -> tuple[Tensor, Tensor]:
        """`pairwise_cost` of every decoder layer's predictions at once (METHOD (2), one per
        layer): cost (layers, B, Q, M) and gt_mask (B, M) True = a real ground truth."""
        return self.pairwise_cost(output.logits, output.boxes, targets, output.prompt_mask)

    def pairwise_cost(self, logits: Tensor, boxes: Tensor, targets: list | tuple,
                      prompt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The full cost matrices, differentiable (GRQO builds its rewards from them).

        logits (..., B, Q, K), boxes (..., B, Q, 4) cxcywh: one prediction set or several
        stacked in front (decoder layers); targets with labels in 0..K-1, or them padded
        already (pad_targets); prompt_mask (B, K) True = padding prompt, left out of the
        binary focal sum (None = every prompt real; the focal cost never reads a padding
        prompt). Returns cost (..., B, Q, M) and gt_mask (B, M), True = real ground truth;
        the cost of a padding column is meaningless and must be masked by the caller.
        """
        labels, gt_boxes, gt_mask = (targets if isinstance(targets, tuple)
                                     else pad_targets(targets, logits.device))
        num_queries = logits.shape[-2]
        if labels.shape[1] == 0:
            return logits.new_zeros(*logits.shape[:-1], 0), gt_mask
        probability = logits.float().sigmoid()                              # (..., B, Q, K)
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - probability) ** gamma * -(probability + 1e-8).log()
        negative = (1 - alpha) * probability ** gamma * -(1 - probability + 1e-8).log()
        prompt_of_gt = labels[:, None, :].expand(*logits.shape[:-2], num_queries, -1)
        positive_j = positive.gather(-1, prompt_of_gt)                      # (..., B, Q, M)
        negative_j = negative.gather(-1, prompt_of_gt)
        if self.class_cost == "focal":
            class_cost = positive_j - negative_j
        else:
            # sum_k (1 - y_jk) neg(p_ik) = (sum over real prompts) - neg(p_ik_j): a gather and
            # a sum instead of a (B, Q, K) x (B, K, M) product that autocast would run in bf16.
            if prompt_mask is not None:
                negative = negative.masked_fill(prompt_mask[:, None, :], 0.0)
            class_cost = positive_j + negative.sum(-1, keepdim=True) - negative_j
        boxes = boxes.float()
        l1 = torch.cdist(boxes, gt_boxes.expand(*boxes.shape[:-2], -1, -1), p=1)
        giou = elementwise_giou(boxes[..., :, None, :], gt_boxes[:, None, :, :])
        cost = self.class_weight * class_cost + self.l1_weight * l1 - self.giou_weight * giou
        return cost, gt_mask

    @staticmethod
    def assign(cost: Tensor, counts: list[int]) -> Matches:
        """The Hungarian assignment (scipy's linear_sum_assignment) of every set and image of
        cost (S, B, Q, M); counts: each image's number of ground truths (the rest of its
        columns are padding). Reads the costs detached, in one transfer to the host."""
        host = cost.detach().float().cpu().numpy()
        found = [(s, b, *linear_sum_assignment(host[s, b, :, :count]))
                 for s in range(host.shape[0]) for b, count in enumerate(counts) if count]
        if not found:
            empty = torch.zeros(0, dtype=torch.long, device=cost.device)
            return Matches(empty, empty, empty, empty)
        columns = [np.concatenate([np.full(len(rows), s), np.full(len(rows), b), rows, cols])
                   .reshape(4, -1) for s, b, rows, cols in found]
        index = torch.from_numpy(np.concatenate(columns, axis=1).astype(np.int64))
        return Matches(*index.to(cost.device, non_blocking=True))

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list,
                 prompt_mask: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per image (query indices, ground-truth indices), each (min(Q, M_b),) long, M_b the
        image's ground truths, for one prediction set. Arguments as for `pairwise_cost`."""
        cost, _ = self.pairwise_cost(logits, boxes, targets, prompt_mask)
        matches = self.assign(cost[None], [len(target.labels) for target in targets])
        return [(matches.query[matches.image == b], matches.ground_truth[matches.image == b])
                for b in range(len(targets))]


# ---------------------------------------------------------------------------- SFT losses

class SetCriterion:
    """The SFT losses (METHOD section 3): per decoder layer, on the selected encoder proposals
    and on the DN queries, sigmoid focal loss over the prompt logits (unmatched queries: an
    all-zero target), L1 x 5 and GIoU x 2 on matched boxes; with a caption in training, the
    focal loss of its tokens of no class as negatives; plus L_contra (METHOD 2.4).
    Losses are normalised by `num_boxes`, the number of ground truths per process (averaged
    over processes under DDP)."""

    def __init__(self, matcher: HungarianMatcher | None = None, class_weight: float = 1.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0,
                 contrastive_weight: float = 1.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        self.matcher = matcher or HungarianMatcher()
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.contrastive_weight = contrastive_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def focal(self, logits: Tensor, target: Tensor, keep: Tensor, num_boxes: float) -> Tensor:
        loss = sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, "none")
        return (loss * keep).sum() / num_boxes

    def box_losses(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """boxes, gt_boxes (..., 4) cxcywh, paired -> weighted L1 + (1 - GIoU) of each (...)."""
        l1 = (boxes - gt_boxes).abs().sum(-1)
        return self.l1_weight * l1 + self.giou_weight * (1 - elementwise_giou(boxes, gt_boxes))

    def set_losses(self, logits: Tensor, boxes: Tensor, padded: tuple, matches: Matches,
                   prompt_mask: Tensor, num_boxes: float) -> Tensor:
        """The Hungarian-matched loss of S prediction sets at once (METHOD section 3, matched
        with the cost of METHOD (1)): logits (S, B, Q, K), boxes (S, B, Q, 4) cxcywh, padded
        targets (pad_targets), their assignment; prompt_mask (B, K) True = padding prompt (no
        loss). Returns each set's loss (S,)."""
        labels, gt_boxes, _ = padded
        target_classes = torch.zeros_like(logits)
        target_classes[matches.set, matches.image, matches.query,
                       labels[matches.image, matches.ground_truth]] = 1
        focal = sigmoid_focal_loss(logits, target_classes, self.focal_alpha, self.focal_gamma,
                                   "none")
        keep = (~prompt_mask)[:, None, :].to(focal.dtype)
        per_set = self.class_weight * (focal * keep).sum((1, 2, 3))
        pairs = self.box_losses(boxes[matches.set, matches.image, matches.query],
                                gt_boxes[matches.image, matches.ground_truth])
        return (per_set + torch.zeros_like(per_set).index_add(0, matches.set, pairs)) / num_boxes

    def denoising_loss(self, logits: Tensor, boxes: Tensor, dn: DenoisingTargets,
                       prompt_mask: Tensor, num_boxes: float) -> Tensor:
        """DN queries know their targets (no matching): positives recover class and box,
        negatives must predict no class. logits (..., B, N_dn, K), boxes (..., B, N_dn, 4)
        cxcywh, every decoder layer at once; the focal loss and (positives only) the box
        losses, normalised per group. Masks select, so nothing waits for the values."""
        normaliser = num_boxes * dn.num_groups
        positive = dn.positive & dn.valid                                       # (B, N_dn)
        prompts = torch.arange(logits.shape[-1], device=logits.device)
        target_classes = ((dn.labels[..., None] == prompts) & positive[..., None]).to(logits.dtype)
        keep = (dn.valid[..., None] & ~prompt_mask[:, None, :]).to(logits.dtype)
        loss = self.class_weight * self.focal(logits, target_classes.expand_as(logits), keep,
                                              normaliser)
        pairs = self.box_losses(boxes, dn.boxes.expand_as(boxes))              # (..., B, N_dn)
        return loss + (pairs * positive.to(pairs.dtype)).sum() / normaliser

    def contrastive_loss(self, logits: Tensor) -> Tensor:
        """Symmetric InfoNCE between class-mean visual and text embeddings (METHOD 2.4)."""
        classes = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, classes) + F.cross_entropy(logits.T, classes)) / 2

    def __call__(self, output: DetectorOutput, targets: list, num_boxes: float,
                 costs: Tensor | None = None) -> dict[str, Tensor]:
        """targets: per image `boxes` (M, 4) cxcywh and `labels` (M,) prompt indices.
        Returns named loss terms (each already weighted) and their sum under "sft". costs:
        the matching costs of every decoder layer and then the encoder's proposals
        (layers + 1, B, Q, M) when the caller has them (GRQO's rewards read the decoder
        layers', with gradient); else computed here, without."""
        mask = output.prompt_mask
        logits = torch.cat([output.logits, output.encoder_logits[None]])      # (L + 1, B, Q, K)
        boxes = torch.cat([output.boxes, output.encoder_boxes[None]])
        padded = pad_targets(targets, logits.device)
        if costs is None:
            with torch.no_grad():
                costs, _ = self.matcher.pairwise_cost(logits, boxes, padded, mask)
        matches = self.matcher.assign(costs, [len(target.labels) for target in targets])
        per_set = self.set_losses(logits, boxes.float(), padded, matches, mask, num_boxes)
        terms = {"decoder": per_set[:-1].sum(), "encoder": per_set[-1]}
        if output.dn_targets is not None:
            terms["denoising"] = self.denoising_loss(output.dn_logits, output.dn_boxes,
                                                     output.dn_targets, mask, num_boxes)
        if output.outside_logits is not None:
            # Grounding DINO's per-token loss: a caption's [CLS], [SEP] and "." are negatives
            # for every matching and encoder query (no class score reads them, but
            # objectness does, METHOD 2.7); the DN queries learn classes only.
            keep = output.outside_mask[None, :, None, :].expand_as(output.outside_logits)
            terms["outside_tokens"] = self.class_weight * self.focal(
                output.outside_logits, torch.zeros_like(output.outside_logits), keep.float(),
                num_boxes)
        if output.contrastive_logits is not None and output.contrastive_logits.shape[0] > 0:
            terms["contrastive"] = self.contrastive_weight * self.contrastive_loss(
                output.contrastive_logits.float())
        terms["sft"] = sum(terms.values())
        return terms
