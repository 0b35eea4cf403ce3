"""The loss terms against hand-computed values."""

import math

import pytest
import torch
from torch.testing import assert_close

from delta_trl.core.losses import (
    alpha_bounds,
    completion_logps,
    delta_objective,
    dpo_loss,
    hidden_distillation_loss,
    sample_alpha,
    supervised_mask,
    token_cross_entropy,
)


def test_curriculum_bounds_widen_from_one_to_the_range():
    assert alpha_bounds(0.0, sampling="curriculum", alpha_min=0.5, alpha_max=2.0) == (1.0, 1.0)
    # p = 0.25 -> u = 0.5 -> [1 - 0.5*0.5, 1 + 1*0.5]
    assert alpha_bounds(0.25, sampling="curriculum", alpha_min=0.5, alpha_max=2.0) == (0.75, 1.5)
    assert alpha_bounds(1.0, sampling="curriculum", alpha_min=0.5, alpha_max=2.0) == (0.5, 2.0)
    assert alpha_bounds(0.3, sampling="uniform", alpha_min=0.2, alpha_max=3.0) == (0.2, 3.0)
    assert alpha_bounds(0.7, sampling="fixed", alpha_min=0.2, alpha_max=3.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="Unknown alpha sampling"):
        alpha_bounds(0.5, sampling="cosine", alpha_min=0.5, alpha_max=2.0)


def test_sample_alpha_is_a_function_of_seed_and_step():
    draws = [sample_alpha(s, 100, sampling="uniform", alpha_min=0.5, alpha_max=2.0, seed=3) for s in range(50)]
    assert draws == [sample_alpha(s, 100, sampling="uniform", alpha_min=0.5, alpha_max=2.0, seed=3) for s in range(50)]
    assert all(0.5 <= a <= 2.0 for a in draws)
    assert len(set(draws)) == 50
    assert draws != [sample_alpha(s, 100, sampling="uniform", alpha_min=0.5, alpha_max=2.0, seed=4) for s in range(50)]
    assert sample_alpha(0, 100, sampling="curriculum", alpha_min=0.5, alpha_max=2.0) == 1.0
    late = sample_alpha(81, 100, sampling="curriculum", alpha_min=0.5, alpha_max=2.0)
    assert 1 - 0.5 * 0.9 <= late <= 1 + 0.9


def test_supervised_mask_shifts_for_causal_lms():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    assert supervised_mask(labels, shift=False).tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    # position t predicts labels[t+1]
    assert supervised_mask(labels, shift=True).tolist() == [[0, 1, 1, 0], [1, 1, 0, 0]]


def test_hidden_distillation_loss_by_hand():
    """h_S - h_T at the two supervised positions: (1, 2) and (0, 3) -> (1 + 4 + 0 + 9) / 2 = 7."""
    student = torch.tensor([[[1.0, 2.0], [5.0, 5.0], [0.0, 3.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    loss = hidden_distillation_loss(student, teacher, mask, normalization="sum")
    assert_close(loss, torch.tensor(7.0))
    assert_close(hidden_distillation_loss(student, teacher, mask, num_items=7, normalization="sum"), torch.tensor(2.0))
    loss.backward()
    # d/dh_S of sum ||h_S - h_T||^2 / 2 = (h_S - h_T) at supervised positions, 0 elsewhere
    assert_close(student.grad, torch.tensor([[[1.0, 2.0], [0.0, 0.0], [0.0, 3.0]]]))


def test_scale_free_distillation_by_hand():
    """h_T = (3, 4) and (0, 2) (‖h_T‖² = 25 and 4), errors (1, 2) and (0, 3) (‖·‖² = 5 and 9), H = 2.

    relative: (5/25 + 9/4) / 2 = 1.225; mean: (5/2 + 9/2) / 2 = 3.5. Scaling both states by 10 leaves `relative`
    unchanged and multiplies `mean` and `sum` by 100.
    """
    teacher = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [0.0, 2.0]]])
    student = teacher + torch.tensor([[[1.0, 2.0], [7.0, 7.0], [0.0, 3.0]]])
    mask = torch.tensor([[True, False, True]])
    assert_close(hidden_distillation_loss(student, teacher, mask), torch.tensor(1.225))
    assert_close(hidden_distillation_loss(student, teacher, mask, normalization="mean"), torch.tensor(3.5))
    for normalization, factor in (("relative", 1.0), ("mean", 100.0), ("sum", 100.0)):
        small = hidden_distillation_loss(student, teacher, mask, normalization=normalization)
        large = hidden_distillation_loss(10 * student, 10 * teacher, mask, normalization=normalization)
        assert_close(large, factor * small)
    with pytest.raises(ValueError, match="normalization must be one of"):
        hidden_distillation_loss(student, teacher, mask, normalization="max")
    assert teacher.grad is None  # stop-gradient on the teacher


def test_token_cross_entropy_by_hand_and_against_torch():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    # causal: position 0 predicts label 0 (uniform: log 2), position 1 predicts label 1 (p = 1/4: log 4)
    assert_close(token_cross_entropy(logits, labels, shift=True), torch.tensor((math.log(2) + math.log(4)) / 2))
    assert_close(token_cross_entropy(logits, labels, shift=True, num_items=4), torch.tensor(math.log(8) / 4))
    # seq2seq: position 1 -> label 0 (p = 3/4), position 2 -> label 1 (uniform)
    assert_close(token_cross_entropy(logits, labels, shift=False), torch.tensor((math.log(4 / 3) + math.log(2)) / 2))
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert_close(token_cross_entropy(logits, labels, shift=True), reference)


def test_delta_objective_weights_each_term():
    total = delta_objective(
        torch.tensor(1.0),
        distill_loss=torch.tensor(2.0),
        teacher_loss=torch.tensor(3.0),
        curvature_penalty=torch.tensor(4.0),
        distill_weight=0.5,
        teacher_loss_weight=2.0,
        curvature_weight=10.0,
    )
    assert_close(total, torch.tensor(1.0 + 1.0 + 6.0 + 40.0))
    assert_close(delta_objective(torch.tensor(1.5)), torch.tensor(1.5))


def test_dpo_loss_by_hand():
    """β = 0.5; chosen log-ratio 1 - 0 = 1, rejected 0 - 1 = -1 -> -log σ(0.5·2) = log(1 + e^-1)."""
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert_close(out.losses, torch.tensor([math.log1p(math.exp(-1.0))]))
    assert_close(out.chosen_rewards, torch.tensor([0.5]))
    assert_close(out.rejected_rewards, torch.tensor([-0.5]))


def test_completion_logps_sums_supervised_next_token_logprobs():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(5.0)  # position 0 predicts token at 1: p(2) = 5/8
    labels = torch.tensor([[-100, 2, 3]])  # position 1 predicts 3 from uniform logits: p = 1/4
    assert_close(completion_logps(logits, labels), torch.tensor([math.log(5 / 8) + math.log(1 / 4)]))
