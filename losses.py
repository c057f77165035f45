"""The Hungarian matcher (METHOD (1)), whose cost also gives GRQO its rewards, and the SFT
losses (METHOD section 3), in DETR's division: HungarianMatcher pairs queries with ground
truths, SetCriterion computes the losses of a DetectorOutput.
"""

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from model import DenoisingTargets, DetectorOutput, pad_targets



# ------------------------------------------------------------------------------ matching

def paired_giou(boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """GIoU between every prediction and every ground truth of the same image:
    boxes (B, Q, 4), gt_boxes (B, M, 4) cxcywh -> (B, Q, M)."""
    batch, num_queries, num_gt = boxes.shape[0], boxes.shape[1], gt_boxes.shape[1]
    all_pairs = generalized_box_iou(box_convert(boxes.flatten(0, 1), "cxcywh", "xyxy"),
                                    box_convert(gt_boxes.flatten(0, 1), "cxcywh", "xyxy"))
    all_pairs = all_pairs.view(batch, num_queries, batch, num_gt)
    same_image = torch.arange(batch, device=boxes.device)
    return all_pairs[same_image, :, same_image]


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

    def layer_costs(self, output: "DetectorOutput", targets: list
                    ) -> tuple[list[Tensor], Tensor]:
        """`pairwise_cost` of every decoder layer's predictions (METHOD (2), one per layer):
        ([(B, Q, M)] * layers, gt_mask (B, M) True = a real ground truth)."""
        costs, gt_mask = [], None
        for logits, boxes in zip(output.logits, output.boxes):
            cost, gt_mask = self.pairwise_cost(logits, boxes, targets, output.prompt_mask)
            costs.append(cost)
        return costs, gt_mask

    def pairwise_cost(self, logits: Tensor, boxes: Tensor, targets: list,
                      prompt_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The full cost matrices, differentiable (GRQO builds its rewards from them).

        logits (B, Q, K), boxes (B, Q, 4) cxcywh, targets with labels in 0..K-1;
        prompt_mask (B, K) True = padding prompt, left out of the binary focal sum
        (None = every prompt real; the focal cost never reads a padding prompt).
        Returns cost (B, Q, M) and gt_mask (B, M), True = real ground truth; the cost of a
        padding column is meaningless and must be masked by the caller.
        """
        labels, gt_boxes, gt_mask = pad_targets(targets, logits.device)
        batch, num_queries = logits.shape[:2]
        if labels.shape[1] == 0:
            return logits.new_zeros(batch, num_queries, 0), gt_mask
        probability = logits.float().sigmoid()                                   # (B, Q, K)
        alpha, gamma = self.focal_alpha, self.focal_gamma
        positive = alpha * (1 - probability) ** gamma * -(probability + 1e-8).log()
        negative = (1 - alpha) * probability ** gamma * -(1 - probability + 1e-8).log()
        prompt_of_gt = labels[:, None, :].expand(-1, num_queries, -1)            # (B, Q, M)
        positive_j, negative_j = positive.gather(2, prompt_of_gt), negative.gather(2, prompt_of_gt)
        if self.class_cost == "focal":
            class_cost = positive_j - negative_j
        else:
            # sum_k (1 - y_jk) neg(p_ik) = (sum over real prompts) - neg(p_ik_j): a gather and
            # a sum instead of a (B, Q, K) x (B, K, M) product that autocast would run in bf16.
            if prompt_mask is not None:
                negative = negative.masked_fill(prompt_mask[:, None, :], 0.0)
            class_cost = positive_j + negative.sum(2, keepdim=True) - negative_j
        boxes = boxes.float()
        l1 = torch.cdist(boxes, gt_boxes, p=1)
        cost = (self.class_weight * class_cost + self.l1_weight * l1
                - self.giou_weight * paired_giou(boxes, gt_boxes))
        return cost, gt_mask

    @torch.no_grad()
    def __call__(self, logits: Tensor, boxes: Tensor, targets: list,
                 prompt_mask: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per image (query indices, ground-truth indices), each (min(Q, M),) long.
        Arguments as for `pairwise_cost`."""
        cost, gt_mask = self.pairwise_cost(logits, boxes, targets, prompt_mask)
        cost = cost.cpu()
        matches = []
        for b, count in enumerate(gt_mask.sum(1).tolist()):
            rows, cols = linear_sum_assignment(cost[b, :, :count].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                            torch.as_tensor(cols, dtype=torch.long, device=logits.device)))
        return matches


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

    def box_losses(self, boxes: Tensor, gt_boxes: Tensor, num_boxes: float) -> Tensor:
        """boxes, gt_boxes (P, 4) cxcywh, P matched pairs -> weighted L1 + GIoU."""
        l1 = (boxes - gt_boxes).abs().sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                              box_convert(gt_boxes, "cxcywh", "xyxy")))
        return self.l1_weight * l1 + self.giou_weight * (1 - giou).sum() / num_boxes

    def set_loss(self, logits: Tensor, boxes: Tensor, targets: list, prompt_mask: Tensor,
                 num_boxes: float) -> Tensor:
        """Hungarian-matched loss of one prediction set (METHOD section 3, matched with the
        cost of METHOD (1)): logits (B, Q, K), boxes (B, Q, 4) cxcywh; prompt_mask (B, K)
        True = padding prompt (no loss)."""
        matches = self.matcher(logits, boxes, targets, prompt_mask)
        target_classes = torch.zeros_like(logits)
        matched_boxes, gt_boxes = [], []
        for b, (rows, cols) in enumerate(matches):
            target_classes[b, rows, targets[b].labels[cols]] = 1
            matched_boxes.append(boxes[b, rows])
            gt_boxes.append(targets[b].boxes[cols])
        keep = (~prompt_mask)[:, None, :].float()
        loss = self.class_weight * self.focal(logits, target_classes, keep, num_boxes)
        return loss + self.box_losses(torch.cat(matched_boxes), torch.cat(gt_boxes), num_boxes)

    def denoising_loss(self, logits: Tensor, boxes: Tensor, dn: DenoisingTargets,
                       prompt_mask: Tensor, num_boxes: float) -> Tensor:
        """DN queries know their targets (no matching): positives recover class and box,
        negatives must predict no class. logits (B, N_dn, K), boxes (B, N_dn, 4) cxcywh; the
        focal and box losses of the matched sets, normalised per group."""
        normaliser = num_boxes * dn.num_groups
        positive = dn.positive & dn.valid
        target_classes = torch.zeros_like(logits)
        target_classes[positive] = F.one_hot(dn.labels[positive],
                                             logits.shape[-1]).to(logits.dtype)
        keep = (dn.valid[..., None] & ~prompt_mask[:, None, :]).float()
        loss = self.class_weight * self.focal(logits, target_classes, keep, normaliser)
        return loss + self.box_losses(boxes[positive], dn.boxes[positive], normaliser)

    def contrastive_loss(self, logits: Tensor) -> Tensor:
        """Symmetric InfoNCE between class-mean visual and text embeddings (METHOD 2.4)."""
        classes = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, classes) + F.cross_entropy(logits.T, classes)) / 2

    def __call__(self, output: DetectorOutput, targets: list,
                 num_boxes: float) -> dict[str, Tensor]:
        """targets: per image `boxes` (M, 4) cxcywh and `labels` (M,) prompt indices.
        Returns named loss terms (each already weighted) and their sum under "sft"."""
        mask = output.prompt_mask
        terms = {"decoder": sum(self.set_loss(logits, boxes, targets, mask, num_boxes)
                                for logits, boxes in zip(output.logits, output.boxes)),
                 "encoder": self.set_loss(output.encoder_logits, output.encoder_boxes, targets,
                                          mask, num_boxes)}
        if output.dn_targets is not None:
            terms["denoising"] = sum(
                self.denoising_loss(logits, boxes, output.dn_targets, mask, num_boxes)
                for logits, boxes in zip(output.dn_logits, output.dn_boxes))
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
