"""How much does each GRQO term move the model? Gradient norms and reward statistics.

    python benchmarks/grqo_gradients.py --ckpt runs/grqo/last.pt --batches 8

On a few training batches of a checkpoint, computes separately the gradient of L_SFT
(+ L_contra) and of the GRQO advantage term -alpha * m * A (METHOD (6)); prints their norms,
the cosine between them, and reward statistics: the spread of rewards within a group, and
the mean reward and advantage of the top-ranked, unmuted queries against the muted,
bottom-ranked ones. (The KL term's size is in the training log, `grqo_kl`.)

The GRQO settings (alpha, form, mute fraction, reward cost) are the checkpoint's own when it
comes from train_grqo.py; --alpha and --form override them.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoints import load_checkpoint, model_from_checkpoint  # noqa: E402
from data import build_dataset, collate, sample_prompts  # noqa: E402
from grqo import group_advantages, grqo_loss, mute_mask, query_rewards  # noqa: E402
from losses import HungarianMatcher, SetCriterion  # noqa: E402


def flat_gradient(model, loss) -> torch.Tensor:
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                      for g, p in zip(grads, parameters)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alpha", type=float, help="default: the checkpoint's, else 0.01")
    parser.add_argument("--form", help="default: the checkpoint's --grqo-form, else paper")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint(args.ckpt)
    trained = checkpoint["args"]
    alpha = args.alpha if args.alpha is not None else trained.get("alpha", 0.01)
    form = args.form or trained.get("grqo_form", "paper")
    mute_fraction = trained.get("mute_fraction", 1 / 3)
    match_cost = trained.get("match_cost", "focal")
    reward_matcher = HungarianMatcher(class_cost=trained.get("reward_cost") or match_cost)
    model = model_from_checkpoint(checkpoint, kernel="torch").train()
    config = model.config
    dataset = build_dataset(checkpoint["args"]["data"], "train", train=True,
                            image_size=config.image_size, max_size=config.max_size)
    criterion = SetCriterion(HungarianMatcher(class_cost=match_cost),
                             contrastive_weight=trained.get("contrastive_weight", 1.0))
    rows = []
    for index in range(args.batches):          # every draw from generators seeded by index
        batch = collate([dataset.sample(index * args.batch_size + j,
                                        torch.Generator().manual_seed(index * args.batch_size + j))
                         for j in range(args.batch_size)])
        instructions, targets = sample_prompts(batch, dataset.class_names,
                                               torch.Generator().manual_seed(index))
        output = model(batch.images, batch.mask, instructions, dn_targets=targets,
                       generator=torch.Generator().manual_seed(index))
        sft = criterion(output, targets, float(sum(len(t.labels) for t in targets)))["sft"]
        costs, gt_mask = reward_matcher.layer_costs(output, targets)
        objectness = output.selection.objectness_logits
        policy, _ = grqo_loss(costs, objectness, objectness.detach(), alpha=alpha, beta=0.0,
                              mute_fraction=mute_fraction, form=form, gt_mask=gt_mask)
        g_sft, g_policy = flat_gradient(model, sft), flat_gradient(model, policy)
        rewards, has_gt = query_rewards(costs[-1].detach(), gt_mask)
        advantages = group_advantages(rewards, has_gt)
        unmuted = mute_mask(rewards.shape[1], mute_fraction or 1 / 3).bool()
        rows.append({
            "sft_grad": g_sft.norm().item(), "policy_grad": g_policy.norm().item(),
            "ratio": (g_policy.norm() / g_sft.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(g_sft, g_policy, dim=0).item(),
            "reward_std": rewards[has_gt].std(dim=1).mean().item(),
            "reward_top": rewards[has_gt][:, unmuted].mean().item(),
            "reward_muted": rewards[has_gt][:, ~unmuted].mean().item(),
            "advantage_top": advantages[has_gt][:, unmuted].mean().item()})
        model.zero_grad(set_to_none=True)
    print(f"alpha {alpha}, form {form}, mute fraction {mute_fraction:.3g}, reward cost "
          f"{reward_matcher.class_cost}; {len(rows)} batches")
    medians = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        medians[key] = statistics.median(values)
        print(f"{key:15s} median {medians[key]: .4g}   "
              f"min {min(values): .4g}   max {max(values): .4g}")
    if args.json:
        args.json.write_text(json.dumps({"alpha": alpha, "form": form, "medians": medians,
                                         "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
