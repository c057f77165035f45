"""The detector (model.py) and its losses (losses.py): shapes, matcher invariants, losses,
DN isolation, gradients, learning on a fixed batch, and the light objectness path."""

import math
from dataclasses import replace

import pytest
import torch
import torchvision
from scipy.optimize import linear_sum_assignment

from data import Target, VisualInstructions, collate, sample_prompts
from losses import HungarianMatcher, SetCriterion
from model import (DetectorOutput, build_denoising_queries, build_model, expand_prompts,
                   one_token_per_class, postprocess, visual_phrases)


def make_target(boxes, labels, size=(96, 128)):
    return Target(boxes=torch.tensor(boxes, dtype=torch.float).reshape(-1, 4),
                  labels=torch.tensor(labels, dtype=torch.long), image_id=1,
                  orig_size=torch.tensor(size), size=torch.tensor(size))


def tiny_batch(seed=0):
    """Two images, the second with padding on the right; 3 + 1 instances of 2 classes."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 96, 128, generator=generator), torch.randn(3, 96, 96, generator=generator)]
    targets = [make_target([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0.7, 0.3, 0.1, 0.15]],
                           [0, 1, 1]),
               make_target([[0.5, 0.5, 0.3, 0.3]], [1], size=(96, 96))]
    batch = collate(list(zip(images, targets)))
    instructions = VisualInstructions(
        boxes=torch.cat([t.boxes for t in targets]), image_index=torch.tensor([0, 0, 0, 1]),
        labels=torch.tensor([0, 1, 1, 1]), selected=torch.tensor([0, 3]),
        class_names=["red circle", "blue star"])
    return batch, instructions, batch.targets


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", kernel="torch")


def test_tiny_forward_shapes(tiny):
    batch, instructions, targets = tiny_batch()
    tiny.train()
    out = tiny(batch.images, batch.mask, instructions, dn_targets=targets)
    layers, queries = tiny.config.num_decoder_layers, tiny.config.num_queries
    assert isinstance(out, DetectorOutput)
    assert out.logits.shape == (layers, 2, queries, 2)
    assert out.boxes.shape == (layers, 2, queries, 4)
    assert out.encoder_logits.shape == (2, queries, 2)
    assert out.selection.indices.shape == out.selection.objectness_logits.shape == (2, queries)
    # selection in descending score order
    assert (out.selection.objectness_logits.diff(dim=1) <= 0).all()
    assert out.dn_logits.shape[:2] == (layers, 2) and out.dn_boxes.shape[-1] == 4
    assert out.contrastive_logits.shape == (2, 2)
    # 3 ground truths at most: 40 DN queries make 6 groups of 3 positives and 3 negatives
    assert out.dn_logits.shape[2] == 36 and out.dn_targets.num_groups == 6
    dn = out.dn_targets
    assert (dn.positive & dn.valid).sum() == 6 * 4 and dn.valid.sum() == 6 * 2 * 4
    # Padding slots (image 1 has 1 of 3) get no loss; negatives get no box loss.
    logits = out.dn_logits[-1].detach().requires_grad_()
    boxes = out.dn_boxes[-1].detach().requires_grad_()
    SetCriterion().denoising_loss(logits, boxes, dn, out.prompt_mask, 4.0).backward()
    assert (logits.grad[~dn.valid] == 0).all() and (logits.grad[dn.valid] != 0).any()
    assert (boxes.grad[~(dn.positive & dn.valid)] == 0).all()
    # DN groups see neither each other nor are seen by the matching queries.
    queries = build_denoising_queries(targets, torch.randn(2, 2, 64), 100, tiny.config)
    group = torch.arange(36) // 6
    assert torch.equal(queries.attn_mask[:36, :36], group[:, None] != group[None, :])
    assert queries.attn_mask[36:, :36].all() and not queries.attn_mask[:, 36:].any()


@pytest.mark.parametrize("num_levels, strides", [(1, [32]), (3, [8, 16, 32]),
                                                 (5, [8, 16, 32, 64, 128])])
def test_num_levels_is_honoured(num_levels, strides):
    torch.manual_seed(0)
    model = build_model("tiny", kernel="torch", num_levels=num_levels).eval()
    batch, _, _ = tiny_batch()
    features = model.backbone(batch.images, batch.mask)
    height, width = batch.images.shape[-2:]
    assert features.spatial_shapes.tolist() == [[-(-height // s), -(-width // s)]
                                                for s in strides]
    output = model(batch.images, batch.mask, one_token_per_class(torch.randn(2, 3, 64)))
    num_queries = min(100, int(features.spatial_shapes.prod(1).sum()))
    assert output.logits.shape == (3, 2, num_queries, 3) and torch.isfinite(output.logits).all()


def test_every_parameter_gets_a_gradient_from_one_step(tiny):
    batch, instructions, targets = tiny_batch()
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    out = tiny(batch.images, batch.mask, instructions, dn_targets=targets)
    terms = SetCriterion()(out, targets, num_boxes=4.0)
    for name, value in terms.items():
        assert torch.isfinite(value) and value > 0, name
    terms["sft"].backward()
    missing = [n for n, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_image_without_ground_truth_does_not_crash(tiny):
    batch, instructions, targets = tiny_batch()
    empty = make_target([], [], size=(96, 96))
    targets = [targets[0], empty]
    instructions = VisualInstructions(
        boxes=targets[0].boxes, image_index=torch.tensor([0, 0, 0]),
        labels=torch.tensor([0, 1, 1]), selected=torch.tensor([0, 1]),
        class_names=["red circle", "blue star"])
    tiny.train()
    out = tiny(batch.images, batch.mask, instructions, dn_targets=targets)
    terms = SetCriterion()(out, targets, num_boxes=3.0)
    assert torch.isfinite(terms["sft"])
    terms["sft"].backward()


def test_denoising_queries_do_not_leak_into_matching_queries(tiny):
    batch, instructions, targets = tiny_batch()
    tiny.train()

    def forward(seed):
        return tiny(batch.images, batch.mask, instructions, dn_targets=targets,
                    generator=torch.Generator().manual_seed(seed))
    first, second = forward(1), forward(2)           # other DN noise: other DN queries
    assert not torch.allclose(first.dn_boxes, second.dn_boxes)
    torch.manual_seed(3)                             # the noise comes from the generator alone
    torch.testing.assert_close(forward(1).dn_boxes, first.dn_boxes, rtol=0, atol=0)
    torch.testing.assert_close(first.logits, second.logits)
    torch.testing.assert_close(first.boxes, second.boxes)
    without = tiny(batch.images, batch.mask, instructions)
    torch.testing.assert_close(first.logits, without.logits, atol=1e-5, rtol=1e-5)


def test_objectness_is_the_max_prompt_logit_and_selection_takes_its_top_tokens(tiny):
    """METHOD 2.7 worked out from the encoder's parts: s_n = max_k (I'_n . v'_k) / sqrt(d)
    + bias over the proposal features I' and the enhanced prompts v'; the selection is the
    top N_q tokens by s, in descending order; the light path (the GRQO reference's) gives s
    at any given tokens."""
    batch, instructions, _ = tiny_batch()
    tiny.eval()
    with torch.no_grad():
        encoded = tiny.encode(batch.images, batch.mask, instructions)
        out = tiny(batch.images, batch.mask, instructions)
        shuffled = out.selection.indices.flip(1)
        light = tiny.selected_objectness(batch.images, batch.mask, instructions, shuffled)
    d = tiny.config.hidden_dim
    by_hand = torch.einsum("bsd,bkd->bsk", encoded.proposal_features, encoded.enhanced)
    by_hand = (by_hand / d ** 0.5 + tiny.encoder_class_head.bias).max(-1).values
    valid = encoded.anchors.isfinite().all(-1)
    assert not valid[1].all()     # the padded image has tokens that are not proposals
    _, indices = by_hand.masked_fill(~valid, -math.inf).topk(tiny.config.num_queries, dim=1)
    torch.testing.assert_close(out.selection.objectness_logits, by_hand.gather(1, indices))
    assert torch.equal(out.selection.indices, indices)
    torch.testing.assert_close(light, by_hand.gather(1, shuffled))


@pytest.mark.parametrize("select_invalid", [False, True])
def test_tokens_without_a_valid_anchor_are_selected_only_as_in_grounding_dino(tiny, select_invalid,
                                                                              monkeypatch):
    """Padding and edge tokens score a constant (their features enter as zeros). Grounding
    DINO ranks them with the rest (select_invalid_tokens, swin_t's setting); the tiny preset
    takes them only after every valid token, as they would otherwise crowd out its 100
    queries."""
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 8.0, 1.0, 2.0]])
    valid = torch.tensor([[False, True, True, True, True], [True, False, True, False, True]])
    monkeypatch.setattr(tiny.config, "select_invalid_tokens", select_invalid)
    monkeypatch.setattr(tiny.config, "num_queries", 3)
    selection = tiny.select_queries(logits, valid)
    expected = [[0, 2, 3], [1, 2, 4]] if select_invalid else [[2, 3, 4], [2, 4, 0]]
    assert selection.indices.tolist() == expected
    assert torch.equal(selection.objectness_logits, logits.gather(1, selection.indices))


# ----------------------------------------------------------------------------- matcher

def random_predictions(batch=3, queries=7, prompts=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, prompts, generator=generator)
    boxes = torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.25
    return logits, boxes


def random_targets(counts, prompts=4, seed=0):
    generator = torch.Generator().manual_seed(seed + 100)
    return [make_target((torch.rand(n, 4, generator=generator) * 0.5 + 0.2).tolist(),
                        torch.randint(0, prompts, (n,), generator=generator).tolist())
            for n in counts]


def test_matcher_batched_equals_per_image():
    logits, boxes = random_predictions()
    targets = random_targets([2, 5, 3])
    matcher = HungarianMatcher()
    batched = matcher(logits, boxes, targets)
    for b in range(3):
        (rows, cols), = matcher(logits[b:b + 1], boxes[b:b + 1], targets[b:b + 1])
        assert torch.equal(rows, batched[b][0]) and torch.equal(cols, batched[b][1])


def test_matcher_empty_targets():
    logits, boxes = random_predictions()
    targets = random_targets([0, 2, 0])
    matches = HungarianMatcher()(logits, boxes, targets)
    assert [len(rows) for rows, _ in matches] == [0, 2, 0]
    cost, gt_mask = HungarianMatcher().pairwise_cost(logits, boxes, random_targets([0, 0, 0]))
    assert cost.shape == (3, 7, 0) and gt_mask.shape == (3, 0)


def test_matched_total_cost_is_the_assignment_optimum():
    logits, boxes = random_predictions(batch=1, queries=6)
    targets = random_targets([4])
    matcher = HungarianMatcher()
    (rows, cols), = matcher(logits, boxes, targets)
    cost, _ = matcher.pairwise_cost(logits, boxes, targets)
    matched = cost[0, rows, cols].sum()
    # brute force over every injective assignment of 4 ground truths to 6 queries
    import itertools
    best = min(sum(cost[0, q, j].item() for j, q in enumerate(perm))
               for perm in itertools.permutations(range(6), 4))
    assert matched.item() == pytest.approx(best, abs=1e-5)
    optimal_rows, optimal_cols = linear_sum_assignment(cost[0].detach().numpy())
    assert matched.item() == pytest.approx(cost[0, optimal_rows, optimal_cols].sum().item())


def test_pairwise_cost_is_differentiable_and_follows_method_1():
    logits, boxes = random_predictions(batch=1, queries=2, prompts=3)
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    targets = random_targets([1], prompts=3)
    cost, _ = HungarianMatcher().pairwise_cost(logits, boxes, targets)
    cost.sum().backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad.abs().sum() > 0
    # METHOD (1) for query 0 against the single ground truth, written out:
    from torchvision.ops import box_convert, generalized_box_iou
    p = logits[0, 0, targets[0].labels[0]].sigmoid()
    focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p ** 2 * -(1 - p + 1e-8).log()
    l1 = (boxes[0, 0] - targets[0].boxes[0]).abs().sum()
    giou = generalized_box_iou(box_convert(boxes[0, :1], "cxcywh", "xyxy"),
                               box_convert(targets[0].boxes, "cxcywh", "xyxy"))[0, 0]
    assert cost[0, 0, 0].item() == pytest.approx((2 * focal + 5 * l1 - 2 * giou).item(), abs=1e-5)


# The class costs by hand: 2 queries x 3 prompts x 2 ground truths (prompts 0 and 2).
# With alpha 0.25, gamma 2: pos(p) = 0.25 (1 - p)^2 (-ln p), neg(p) = 0.75 p^2 (-ln(1 - p)):
#   p = 0.5:  pos 0.043322, neg 0.129965
#   p = 0.25: pos 0.194948, neg 0.013485
#   p = 0.75: pos 0.004495, neg 0.584843
# query 0: p = [0.5, 0.25, 0.75], query 1: p = [0.75, 0.5, 0.25].
# focal = pos - neg at j's prompt:
#   q0: [0.043322 - 0.129965, 0.004495 - 0.584843] = [-0.086643, -0.580348]
#   q1: [0.004495 - 0.584843, 0.194948 - 0.013485] = [-0.580348, 0.181463]
# binary_focal = pos at j's prompt + neg at every other prompt:
#   q0: [0.043322 + 0.013485 + 0.584843, 0.129965 + 0.013485 + 0.004495] = [0.641650, 0.147945]
#   q1: [0.004495 + 0.129965 + 0.013485, 0.584843 + 0.129965 + 0.194948] = [0.147945, 0.909756]
# prompt 1 padding: binary_focal drops neg at prompt 1 (q0: 0.013485, q1: 0.129965):
#   q0: [0.628165, 0.134460], q1: [0.017980, 0.779791]; focal does not change.
CLASS_LOGITS = torch.tensor([[[0.0, -math.log(3.0), math.log(3.0)],
                              [math.log(3.0), 0.0, -math.log(3.0)]]])
CLASS_TARGETS = [make_target([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]], [0, 2])]
FOCAL_COST = torch.tensor([[[-0.086643, -0.580348], [-0.580348, 0.181463]]])
BINARY_FOCAL_COST = torch.tensor([[[0.641650, 0.147945], [0.147945, 0.909756]]])
BINARY_FOCAL_COST_PADDED = torch.tensor([[[0.628165, 0.134460], [0.017980, 0.779791]]])


@pytest.mark.parametrize("padding", [False, True])
def test_class_costs_by_hand(padding):
    boxes = torch.rand(1, 2, 4) * 0.2 + 0.4
    prompt_mask = torch.tensor([[False, padding, False]])
    class_only = dict(class_weight=1.0, l1_weight=0.0, giou_weight=0.0)
    focal, _ = HungarianMatcher(**class_only, class_cost="focal").pairwise_cost(
        CLASS_LOGITS, boxes, CLASS_TARGETS, prompt_mask)
    torch.testing.assert_close(focal, FOCAL_COST, atol=2e-6, rtol=0)
    logits = CLASS_LOGITS.clone().requires_grad_(True)
    binary, gt_mask = HungarianMatcher(**class_only, class_cost="binary_focal").pairwise_cost(
        logits, boxes, CLASS_TARGETS, prompt_mask)
    expected = BINARY_FOCAL_COST_PADDED if padding else BINARY_FOCAL_COST
    torch.testing.assert_close(binary, expected, atol=2e-6, rtol=0)
    assert gt_mask.tolist() == [[True, True]]
    binary.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, :, 1] == 0).all() if padding else (logits.grad != 0).all()


def test_binary_focal_matching_passes_the_prompt_mask_through():
    logits, boxes = random_predictions(batch=2, queries=6, prompts=4)
    targets = random_targets([3, 2], prompts=3)
    prompt_mask = torch.tensor([[False, False, False, True], [False, False, False, True]])
    matcher = HungarianMatcher(class_cost="binary_focal")
    cost, _ = matcher.pairwise_cost(logits, boxes, targets, prompt_mask)
    for b, (rows, cols) in enumerate(matcher(logits, boxes, targets, prompt_mask)):
        optimal_rows, optimal_cols = linear_sum_assignment(
            cost[b, :, :len(targets[b].labels)].numpy())
        assert torch.equal(rows, torch.as_tensor(optimal_rows))
        assert torch.equal(cols, torch.as_tensor(optimal_cols))
    with pytest.raises(ValueError):
        HungarianMatcher(class_cost="softmax")


def test_postprocess_scales_to_original_image():
    logits = torch.full((1, 2, 1), -10.0)
    logits[0, 1, 0] = 10.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.5, 1.0]]])
    found = postprocess(logits, boxes, torch.tensor([[200, 100]]), top_k=1)[0]
    torch.testing.assert_close(found.boxes, torch.tensor([[25.0, 0.0, 75.0, 200.0]]))
    assert found.labels.tolist() == [0]
    # 3 queries x 2 prompts: the flat top-k index must split as (query, prompt) = (i // K, i % K)
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 0], logits[0, 0, 1] = 10.0, 9.0
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    found = postprocess(logits, boxes, torch.tensor([[100, 100]]), top_k=2)[0]
    assert found.labels.tolist() == [0, 1]
    torch.testing.assert_close(found.boxes[:, 0], torch.tensor([75.0, 5.0]))


# ----------------------------------------------------------------------------- scales

def test_swin_t_builds_and_runs_at_a_small_size():
    torch.manual_seed(0)
    model = build_model("swin_t", kernel="torch", num_queries=50).eval()
    images = torch.randn(1, 3, 128, 160)
    mask = torch.zeros(1, 128, 160, dtype=torch.bool)
    with torch.no_grad():
        prompts = model.text_encoder(["cat", "dog"])[None]
        out = model(images, mask, one_token_per_class(prompts))
    assert out.logits.shape == (6, 1, 50, 2)
    detector = sum(p.numel() for n, p in model.named_parameters()
                   if not n.startswith("text_encoder."))
    assert 40e6 < detector < 70e6


def test_tiny_learns_a_fixed_batch():
    """Loss on one fixed batch of 2 shapes images halves within 150 steps."""
    from data import build_dataset
    from shapes import generate_shapes
    import tempfile
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        generate_shapes(folder, seed=3, image_size=128, train_images=4, support_images=4,
                        dev_images=2, val_images=2)
        dataset = build_dataset(folder, "train", train=False, image_size=128, max_size=171)
        batch = collate([dataset[0], dataset[1]])
    from data import sample_prompts
    model = build_model("tiny", kernel="torch")
    model.train()
    criterion = SetCriterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(150):
        torch.manual_seed(step)
        instructions, targets = sample_prompts(batch, dataset.class_names,
                                               torch.Generator().manual_seed(step))
        out = model(batch.images, batch.mask, instructions, dn_targets=targets)
        loss = criterion(out, targets, float(sum(len(t.labels) for t in targets)))["sft"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)


def test_r50_batchnorm_is_frozen():
    """As in DETR: at 2 images per GPU batch statistics are noise, so the ResNet-50's
    BatchNorm layers hold fixed statistics and have nothing to train."""
    from torchvision.ops import FrozenBatchNorm2d
    body = build_model("r50", num_queries=10).backbone.body.train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 53
    before = {name: value.clone() for name, value in body.state_dict().items()}
    body(torch.randn(2, 3, 64, 64))
    for name, value in body.state_dict().items():
        assert torch.equal(value, before[name]), name          # no running statistics
    trainable = {name.rsplit(".", 1)[0] for name, p in body.named_parameters()}
    assert all(isinstance(body.get_submodule(name), torch.nn.Conv2d) for name in trainable)


# ----------------------------------------------------------------------------- tiny text side

NEVER_SEEN = ["purple pentagon", "猫", "кошка", "собака", "Café au lait", "🐱", "R2-D2"]


def test_the_generated_vocabulary_composes_any_name_without_unk():
    """The tiny preset's tokenizer needs no file and spells every name, in any script: letters
    and letter pairs, then the UTF-8 bytes of what they do not cover (never [UNK])."""
    from bert import WordPieceTokenizer, generated_vocabulary
    from model import BertTextEncoder

    tokenizer = WordPieceTokenizer(generated_vocabulary(), byte_fallback=True)
    token = {index: name for name, index in tokenizer.ids.items()}
    spelled = [tokenizer.pieces(name) for name in NEVER_SEEN]
    assert all(pieces and tokenizer.unk_id not in pieces for pieces in spelled)
    assert len({tuple(pieces) for pieces in spelled}) == len(NEVER_SEEN)
    assert [token[i] for i in spelled[0]] == ["pu", "##rp", "##le", "pe", "##nt", "##ag", "##on"]
    assert bytes(int(token[i][3:5], 16) for i in spelled[1]).decode("utf-8") == "猫"
    assert [token[i] for i in spelled[4]] == ["ca", "##fe", "au", "la", "##it"]
    # Bytes within a word are continuations, so words stay apart; a long word is spelled too.
    assert tokenizer.pieces("кошка собака") != tokenizer.pieces("кошкасобака")
    assert len(tokenizer.pieces("x" * 150)) == 75
    # What a name costs in a caption is what the caption spends on it.
    encoder = BertTextEncoder.generated(8, num_layers=1, num_heads=2)
    ids, _ = encoder.caption_ids(NEVER_SEEN)
    assert len(ids) == 2 + sum(map(encoder.name_tokens, NEVER_SEEN))
    # Without the fallback, the same vocabulary loses the name, as BERT's does.
    assert WordPieceTokenizer(generated_vocabulary()).pieces("猫") == [tokenizer.unk_id]


def test_the_tiny_preset_reads_names_as_a_caption_of_tokens(tiny):
    """The tiny preset's text encoder is Grounding DINO's text side at a small size: one
    caption "[CLS] purple pentagon . 猫 . [SEP]", a prompt per token, each class the mean of
    its tokens."""
    names = NEVER_SEEN[:2]
    with torch.no_grad():
        prompts = expand_prompts(tiny.text_encoder.caption(names), 2)
    assert prompts.tokens.shape == (2, 1 + 7 + 1 + 3 + 1 + 1, tiny.config.hidden_dim)
    assert prompts.class_tokens[0, 0].tolist() == list(range(1, 8))
    assert prompts.class_tokens[0, 1, :3].tolist() == [9, 10, 11]
    assert prompts.class_token_padding[0].tolist() == [[False] * 7, [False] * 3 + [True] * 4]
    torch.testing.assert_close(prompts.classes[0, 1], prompts.tokens[0, 9:12].mean(0))
    assert prompts.phrases.position_ids[0].tolist() == [0, *range(8), *range(4), 0]


def test_a_caption_s_tokens_of_no_class_are_negatives_for_every_query(tiny):
    """[CLS], "." and [SEP] belong to no class, so no class score reads them; but objectness
    is the max over every token (METHOD 2.7), so training holds them down for every query, as
    Grounding DINO's per-token loss does: the encoder's and each decoder layer's logits at
    those tokens, focal loss with target 0. Visual prompts have no such tokens."""
    from model import outside_tokens

    batch, instructions, targets = tiny_batch()
    names = NEVER_SEEN[:2]          # [CLS] pu ##rp ##le pe ##nt ##ag ##on . 3 bytes . [SEP]
    prompts = expand_prompts(tiny.text_encoder.caption(names), 2)
    assert outside_tokens(prompts).nonzero()[:, 1].tolist() == [0, 8, 12, 13] * 2
    tiny.train()
    with torch.no_grad():
        encoded = tiny.encode(batch.images, batch.mask, names)
        output = tiny(batch.images, batch.mask, names)
    layers = tiny.config.num_decoder_layers
    assert output.outside_logits.shape == (layers + 1, 2, tiny.config.num_queries, 4)
    selected = encoded.token_logits.gather(
        1, output.selection.indices[..., None].expand(-1, -1, encoded.token_logits.shape[-1]))
    torch.testing.assert_close(output.outside_logits[-1], selected[..., [0, 8, 12, 13]])
    criterion = SetCriterion()
    terms = criterion(output, [replace(t, labels=t.labels % 2) for t in targets], num_boxes=4)
    expected = sum(torchvision.ops.sigmoid_focal_loss(
        logits, torch.zeros_like(logits), reduction="sum") for logits in output.outside_logits) / 4
    torch.testing.assert_close(terms["outside_tokens"], expected)
    assert terms["sft"] > sum(v for k, v in terms.items() if k not in ("sft", "outside_tokens"))
    with torch.no_grad():
        visual = tiny(batch.images, batch.mask, instructions)
        tiny.eval()
        evaluated = tiny(batch.images, batch.mask, names)
    assert visual.outside_logits is None and "outside_tokens" not in criterion(visual, targets, 4)
    assert evaluated.outside_logits is None            # only training reads them


def test_visual_prompts_see_each_other_in_the_enhancer_and_padding_is_unseen(tiny):
    """Visual prompts (and ready-made class vectors) form one set: changing one prompt changes
    what the others become in the enhancer, while a padding prompt changes nothing."""
    batch, _, _ = tiny_batch()
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randn(2, 4, tiny.config.hidden_dim, generator=generator)
    padding = torch.tensor([[False, False, False, True]] * 2)
    changed_real, changed_padding = prompts.clone(), prompts.clone()
    changed_real[:, 2] = torch.randn(2, tiny.config.hidden_dim, generator=generator)
    changed_padding[:, 3] = torch.randn(2, tiny.config.hidden_dim, generator=generator)
    tiny.eval()
    with torch.no_grad():
        enhanced = [tiny.encode(batch.images, batch.mask, one_token_per_class(p, padding)).enhanced
                    for p in (prompts, changed_real, changed_padding)]
    assert (enhanced[1][:, 0] - enhanced[0][:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(enhanced[2][:, :3], enhanced[0][:, :3])
    nothing = torch.tensor([[False, False, False, True], [True] * 4])    # image 2: no prompt
    with torch.no_grad():
        output = tiny(batch.images, batch.mask, one_token_per_class(prompts, nothing))
    assert output.boxes.isfinite().all() and output.logits[:, 0, :, :3].isfinite().all()
    # Each token attends to every real prompt and to itself, so that no row of the enhancer's
    # attention is empty, not even where an image has no prompt (an empty row is NaN in some
    # attention kernels).
    attention = visual_phrases(nothing, 8).attention.long()
    torch.testing.assert_close(attention[0], torch.tensor([[1, 1, 1, 0]] * 3 + [[1, 1, 1, 1]]))
    torch.testing.assert_close(attention[1], torch.eye(4, dtype=torch.long))


def test_the_detector_names_the_prompt_forms_it_takes(tiny):
    """One prompts argument of three forms; anything else is refused by name, and the
    training-only arguments after it are keywords."""
    batch, _, _ = tiny_batch()
    with pytest.raises(TypeError, match="VisualInstructions or a list of class names, not "
                                        "Tensor"):
        tiny(batch.images, batch.mask, torch.randn(2, 3, 64))
    with pytest.raises(TypeError, match="positional"):
        tiny(batch.images, batch.mask, ["red circle"], batch.targets)


def test_decoder_sizes_left_unset_compare_as_the_encoders_in_a_checkpoint():
    """A checkpoint from before the decoder's own sizes (no such keys) fits a config that sets
    them to the encoder's; a different decoder FFN width is named."""
    from dataclasses import asdict

    from checkpoints import checkpoint_config_differences
    from model import PRESETS

    config = PRESETS["swin_t"]
    saved = {k: v for k, v in asdict(config).items() if not k.startswith("decoder_")}
    assert checkpoint_config_differences(saved, replace(
        config, decoder_heads=8, decoder_points=4, decoder_ffn_dim=2048)) == ""
    assert checkpoint_config_differences(saved, replace(config, decoder_ffn_dim=1024)) == (
        "decoder_ffn_dim: 2048 there, 1024 here")


def test_the_set_losses_of_every_layer_at_once_equal_detrs_loop_over_sets_and_images():
    """SetCriterion matches and scores every decoder layer and the encoder's proposals in
    one go; its terms equal DETR's loop (one set at a time, the matched pairs image by image,
    torchvision's GIoU matrix and its diagonal), with an image without ground truth, more
    ground truths than queries in another, and a padding prompt."""
    layers, queries = 3, 4
    sets = [random_predictions(batch=3, queries=queries, prompts=4, seed=s)
            for s in range(layers + 1)]
    targets = random_targets([3, 0, 6], prompts=3)             # 6 > 4 queries
    prompt_mask = torch.tensor([[False, False, False, True]] * 3)
    output = DetectorOutput(
        logits=torch.stack([s[0] for s in sets[:layers]]),
        boxes=torch.stack([s[1] for s in sets[:layers]]),
        encoder_logits=sets[-1][0], encoder_boxes=sets[-1][1], selection=None,
        prompt_mask=prompt_mask)
    criterion = SetCriterion()
    terms = criterion(output, targets, num_boxes=9.0)

    def reference(logits, boxes):
        loss = 0.0
        target_classes = torch.zeros_like(logits)
        for b, (rows, cols) in enumerate(criterion.matcher(logits, boxes, targets, prompt_mask)):
            target_classes[b, rows, targets[b].labels[cols]] = 1
            matched, truth = boxes[b, rows], targets[b].boxes[cols]
            giou = torchvision.ops.generalized_box_iou(
                torchvision.ops.box_convert(matched, "cxcywh", "xyxy"),
                torchvision.ops.box_convert(truth, "cxcywh", "xyxy")).diagonal()
            loss = loss + 5 * (matched - truth).abs().sum() + 2 * (1 - giou).sum()
        focal = torchvision.ops.sigmoid_focal_loss(logits, target_classes, 0.25, 2.0, "none")
        return (focal * (~prompt_mask)[:, None, :]).sum() / 9.0 + loss / 9.0

    torch.testing.assert_close(terms["decoder"], sum(reference(*s) for s in sets[:layers]))
    torch.testing.assert_close(terms["encoder"], reference(*sets[-1]))


class DeviceReads:
    """Counts what would make the host wait for a CUDA device, on the CPU where none of it
    waits: the operators nonzero, masked_select, bincount, item (`_local_scalar_dense`) and
    boolean indexing, through a dispatch mode, and the host reads `.cpu()`, `.tolist()` and
    `.numpy()`, intercepted. Use: `with DeviceReads(monkeypatch) as reads: ...`."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.names = monkeypatch.context(), []   # undone on exit, alone

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        names = self.names

        class CountReads(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
                if name in ("nonzero", "masked_select", "bincount", "_local_scalar_dense") or any(
                        isinstance(index, torch.Tensor) and index.dtype == torch.bool
                        for index in indices):
                    names.append(name)
                return func(*args, **(kwargs or {}))

        patch = self.monkeypatch.__enter__()
        for method in ("cpu", "tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            patch.setattr(torch.Tensor, method, lambda tensor, *a, _name=method, _f=original,
                          **k: names.append(_name) or _f(tensor, *a, **k))
        self.mode = CountReads()
        self.mode.__enter__()
        return names

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.monkeypatch.__exit__(*exc)


def test_the_losses_wait_for_the_device_once(tiny, monkeypatch):
    """On CUDA every read of a device value blocks the host. The SFT losses of a training
    step (every set matched, denoising, L_contra) read one: the matching's transfer of every
    set's costs (`.cpu()`, then `.numpy()` of that host copy)."""
    batch, instructions, targets = tiny_batch()
    tiny.train()
    output = tiny(batch.images, batch.mask, instructions, dn_targets=targets,
                  generator=torch.Generator().manual_seed(0))
    with DeviceReads(monkeypatch) as reads:
        terms = SetCriterion()(output, targets, num_boxes=4.0)
    assert {"decoder", "encoder", "denoising", "contrastive"} <= set(terms)
    assert reads == ["cpu", "numpy"]


def test_the_training_forward_reads_nothing_from_the_device(tiny, monkeypatch):
    """The forward of a training step (backbone, visual instructions as sampled for
    training, enhancer, query selection, denoising queries, decoder) never waits for the
    device: the level shapes come from the host, and so does the exemplars' layout."""
    batch, _, targets = tiny_batch()
    instructions, targets = sample_prompts(batch, ["a", "b"], torch.Generator().manual_seed(0))
    assert instructions.max_per_image == 3
    tiny.train()
    with DeviceReads(monkeypatch) as reads:
        output = tiny(batch.images, batch.mask, instructions, dn_targets=targets,
                      generator=torch.Generator().manual_seed(0))
    assert output.logits.shape[-1] == 2
    assert reads == []
    instructions.max_per_image = None                 # without the host's count: one read
    with DeviceReads(monkeypatch) as reads:
        tiny(batch.images, batch.mask, instructions, dn_targets=targets,
             generator=torch.Generator().manual_seed(0))
    assert reads == ["_local_scalar_dense"]


def test_exemplars_in_any_order_and_spare_slots_give_the_same_embeddings(tiny):
    """The visual prompt encoder lays exemplars out by image without sorting them: a
    permuted image_index gives the permuted embeddings, and more slots than needed (the
    export's E) change nothing."""
    batch, _, _ = tiny_batch()
    tiny.eval()
    features = tiny.backbone(batch.images, batch.mask)
    image_index = torch.tensor([0, 1, 0, 0])
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.6, 0.6, 0.3, 0.2],
                          [0.7, 0.3, 0.1, 0.15]])
    with torch.no_grad():
        embeddings = tiny.prompt_encoder(features, image_index, boxes)
        order = torch.tensor([3, 1, 0, 2])
        permuted = tiny.prompt_encoder(features, image_index[order], boxes[order])
        spare = tiny.prompt_encoder(features, image_index, boxes, max_per_image=len(boxes))
    torch.testing.assert_close(permuted, embeddings[order])
    torch.testing.assert_close(spare, embeddings)

