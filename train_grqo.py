"""GRQO training (METHOD.md section 4): the project's main job.

    python train_grqo.py               # tiny preset, shapes data: 1 SFT + 11 GRQO epochs
    python train_grqo.py --data coco --model swin_t --amp bf16 --sft-epochs 1 --grqo-epochs 5
    python train_grqo.py --init runs/sft/last.pt --grqo-epochs 5     # GRQO on top of an SFT run

The loop, data, checkpoints and evaluation are train_sft.py's; this file adds the GRQO
objective: L_all = L_SFT + L_contra + L_GRQO (METHOD (6)), with a reference model that is
a frozen copy of the detector taken at the start of every GRQO epoch (Algorithm 1, line 3;
`--reference anchored` takes it at the first GRQO epoch only). The reference scores the
*same* images, with the *same* sampled prompts (visual instructions or class names), at
the *same* selected tokens as the policy, using the light objectness path (no decoder, no
gradient, eval mode).
"""

import copy

import torch

from grqo import FORMS, grqo_loss
from losses import HungarianMatcher
from model import DINOR1
from train_sft import (SFTObjective, detector_prompts, finish_args, fraction, make_parser,
                       train)


class GRQOObjective(SFTObjective):
    """SFT for the first `sft_epochs` epochs, then SFT + GRQO."""

    def __init__(self, args):
        super().__init__(args.match_cost, args.contrastive_weight)
        self.sft_epochs = args.sft_epochs
        self.anchored = args.reference == "anchored"
        self.settings = dict(alpha=args.alpha, beta=args.beta, mute_fraction=args.mute_fraction,
                             form=args.grqo_form)
        # The rewards' cost, METHOD (2)-(3), may differ from the one the matching uses.
        self.reward_matcher = HungarianMatcher(class_cost=args.reward_cost)
        self.shared_costs = args.reward_cost == args.match_cost
        self.reference: DINOR1 | None = None

    def start_epoch(self, model: DINOR1, epoch: int) -> None:
        """Algorithm 1, line 3: M_ref <- a frozen copy of M, at every GRQO epoch; anchored,
        only at the first (a resumed run keeps the one its checkpoint holds)."""
        if epoch >= self.sft_epochs and not (self.anchored and self.reference is not None):
            self.reference = frozen_copy(model)

    def state_dict(self) -> dict:
        # A mid-epoch checkpoint must bring back the reference taken at the epoch's start.
        return {} if self.reference is None else {"reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict, model: DINOR1) -> None:
        if "reference" in state:
            self.reference = frozen_copy(model)
            self.reference.load_state_dict(state["reference"])

    def __call__(self, network, batch, prompts, targets, num_boxes, generator=None):
        if self.reference is None:
            return super().__call__(network, batch, prompts, targets, num_boxes, generator)
        output = network(batch.images, batch.mask, detector_prompts(prompts),
                         dn_targets=targets, generator=generator)
        if self.shared_costs:
            # One cost for both (the default): the decoder layers' with gradient for the
            # rewards (METHOD (1)-(2)), the encoder's proposals' without; the matching reads
            # them detached.
            costs, gt_mask = self.criterion.matcher.layer_costs(output, targets)
            with torch.no_grad():
                proposals, _ = self.criterion.matcher.pairwise_cost(
                    output.encoder_logits[None], output.encoder_boxes[None], targets,
                    output.prompt_mask)
            terms = self.criterion(output, targets, num_boxes,
                                   costs=torch.cat([costs, proposals]))
        else:
            terms = self.criterion(output, targets, num_boxes)
            costs, gt_mask = self.reward_matcher.layer_costs(output, targets)
        with torch.no_grad():
            reference_logits = self.reference.selected_objectness(
                batch.images, batch.mask, detector_prompts(prompts), output.selection.indices)
        loss_grqo, stats = grqo_loss(costs, output.selection.objectness_logits,
                                     reference_logits, gt_mask=gt_mask, **self.settings)
        terms["grqo"] = loss_grqo
        terms.update({f"grqo_{name}": value for name, value in stats.items()})
        return terms["sft"] + loss_grqo, terms


def frozen_copy(model: DINOR1) -> DINOR1:
    """A copy in eval mode with no gradient: the GRQO reference model."""
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def make_grqo_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--sft-epochs", type=int, default=None,
                        help="SFT epochs before GRQO starts (the '1' of '1+5'; default 1, or "
                             "0 with --init, whose run may have been the SFT stage)")
    parser.add_argument("--grqo-epochs", type=int, default=None,
                        help="GRQO epochs (default: the preset's epochs minus --sft-epochs)")
    parser.add_argument("--alpha", type=float, default=0.01, help="advantage weight, METHOD (6)")
    parser.add_argument("--beta", type=float, default=0.24,
                        help="KL weight, counted once (the release's 6 layers x 0.04)")
    parser.add_argument("--mute-fraction", type=fraction, default=1 / 3,
                        help="lowest-ranked fraction of queries without advantage term")
    parser.add_argument("--grqo-form", default="paper", choices=FORMS,
                        help="paper: differentiable cost; pg: -A.detach() * log O; "
                             "detached_stats: the group's mean and std detached; "
                             "advantage_pull: -max(A, 0).detach() * r (see grqo.py)")
    parser.add_argument("--reference", default="refreshed", choices=["refreshed", "anchored"],
                        help="refreshed: the reference is the model at the start of every "
                             "GRQO epoch (Algorithm 1); anchored: the model at the start of "
                             "the first GRQO epoch, held (a guard against drift)")
    parser.add_argument("--reward-cost", default=None, choices=HungarianMatcher.CLASS_COSTS,
                        help="class part of the cost behind the GRQO rewards "
                             "(default: the same as --match-cost)")
    return parser


def parse_grqo_args(argv=None):
    """The command line with every default filled in, as config.json records it."""
    parser = make_grqo_parser()
    args = parser.parse_args(argv)
    if args.epochs is not None:
        parser.error("train_grqo.py counts epochs as --sft-epochs + --grqo-epochs; "
                     "drop --epochs")
    args = finish_args(args, "grqo")          # fills epochs with the preset's (equal compute)
    if args.reward_cost is None:
        args.reward_cost = args.match_cost
    if args.sft_epochs is None:
        args.sft_epochs = 0 if args.init else 1
    if args.grqo_epochs is None:
        args.grqo_epochs = max(args.epochs - args.sft_epochs, 0)
    args.epochs = args.sft_epochs + args.grqo_epochs
    return args


def main(argv=None):
    args = parse_grqo_args(argv)
    return train(args, GRQOObjective(args))


if __name__ == "__main__":
    main()
