"""The distillation losses and the spherical Z-loss against their papers' formulas, computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffalign import losses
from diffalign.lm.preference import preference_loss

STUDENT = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5]]
TEACHER = [[2.5, 0.0, 1.0, -1.0], [-0.3, 0.4, 0.9, 3.0]]
LABELS = [2, 1]


def softmax(xs, t=1.0):
    m = max(x / t for x in xs)
    e = [math.exp(x / t - m) for x in xs]
    return [v / sum(e) for v in e]


def zscore(xs, bessel=True):
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1 if bessel else len(xs))
    return [(x - mean) / (math.sqrt(var) + (1e-7 if bessel else 0.0)) for x in xs]


def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def test_ls_kd_is_temperature_squared_kl_of_z_scored_logits():
    tau = 2.0
    expected = []
    for s, t in zip(STUDENT, TEACHER):
        p_s, p_t = softmax([z / tau for z in zscore(s)]), softmax([z / tau for z in zscore(t)])
        expected.append(tau**2 * sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)))
    got = losses.get("ls_kd")(T(STUDENT), T(TEACHER), temperature=tau)
    torch.testing.assert_close(got, T(expected))


def test_ls_kd_ignores_the_logits_range_and_offset():
    """Z-scoring: a teacher whose logits are the student's scaled and shifted costs nothing."""
    student = T(STUDENT)
    assert losses.get("ls_kd")(student, 3 * student + 7).abs().max() < 1e-10
    assert losses.get("ls_kd")(student, T(TEACHER)).min() > 1e-3


def test_pld_is_the_teacher_weighted_plackett_luce_loss_of_the_teacher_optimal_order():
    expected = []
    for s, t, y in zip(STUDENT, TEACHER, LABELS):
        order = [y] + sorted((c for c in range(4) if c != y), key=lambda c: -t[c])
        alpha = softmax(t)
        expected.append(sum(alpha[order[k]] * (logsumexp([s[j] for j in order[k:]]) - s[order[k]]) for k in range(4)))
    got = losses.get("pld")(T(STUDENT), T(TEACHER), labels=torch.tensor(LABELS))
    torch.testing.assert_close(got, T(expected))


def test_pld_with_all_teacher_mass_on_the_label_is_the_cross_entropy():
    teacher = torch.full((2, 4), -50.0, dtype=torch.float64)
    teacher[0, 2] = teacher[1, 1] = 50.0
    got = losses.get("pld")(T(STUDENT), teacher, labels=torch.tensor(LABELS))
    torch.testing.assert_close(got, F.cross_entropy(T(STUDENT), torch.tensor(LABELS), reduction="none"))


def test_pld_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        losses.get("pld")(T(STUDENT), T(TEACHER))


def test_mimic_kd_is_the_cross_entropy_against_the_teacher_and_has_the_forward_kl_gradient():
    expected = [-sum(pt * math.log(ps) for pt, ps in zip(softmax(t), softmax(s))) for s, t in zip(STUDENT, TEACHER)]
    student = T(STUDENT).requires_grad_()
    got = losses.get("mimic_kd")(student, T(TEACHER))
    torch.testing.assert_close(got, T(expected).to(got))
    got.sum().backward()
    kl_student = T(STUDENT).requires_grad_()
    F.kl_div(F.log_softmax(kl_student, -1), F.softmax(T(TEACHER), -1), reduction="sum").backward()
    torch.testing.assert_close(student.grad, kl_student.grad)


def test_spherical_z_loss_by_hand_and_its_invariances():
    a, b = 0.5, 1.5
    expected = [math.log1p(math.exp(a * (b - zscore(s, bessel=False)[y]))) / a for s, y in zip(STUDENT, LABELS)]
    fn = losses.get("spherical_z_loss")
    got = fn(T(STUDENT), torch.tensor(LABELS), a=a, b=b)
    torch.testing.assert_close(got, T(expected))
    torch.testing.assert_close(fn(4 * T(STUDENT) - 3, torch.tensor(LABELS), a=a, b=b), got)
    with pytest.raises(ValueError, match="a > 0"):
        fn(T(STUDENT), torch.tensor(LABELS), a=0.0)


def test_spherical_z_loss_is_not_the_palm_z_loss():
    assert losses.spec("spherical_z_loss").kind == "classification"
    assert losses.spec("z_loss").kind == "regulariser"
    assert "PaLM" in losses.spec("z_loss").paper and "Spherical" in losses.spec("spherical_z_loss").paper


@pytest.mark.parametrize("name", ["ls_kd", "pld", "mimic_kd"])
def test_a_gradient_step_moves_the_student_towards_the_teacher(name):
    """Descent on each distillation loss brings the student's distribution closer to the teacher's."""
    student = T(STUDENT).requires_grad_()
    teacher, labels = T(TEACHER), torch.tensor([0, 3])  # the teacher's own top classes
    losses.get(name)(student, teacher, labels=labels).sum().backward()
    moved = student.detach() - 0.1 * student.grad

    def gap(logits):
        return F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher, -1), reduction="sum")

    assert gap(moved) < gap(T(STUDENT))


def test_spherical_z_loss_gradient_raises_the_target_logit():
    logits = T(STUDENT).requires_grad_()
    losses.get("spherical_z_loss")(logits, torch.tensor(LABELS)).sum().backward()
    for row, label in enumerate(LABELS):
        assert logits.grad[row, label] < 0  # descent moves the target logit up
    # shift invariance: the gradient has no component along (1, ..., 1)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ls_kd", "pld", "mimic_kd"])
def test_token_logits_average_over_the_masked_positions(name):
    """(B, T, V) logits: the loss of a sequence is the mean of its masked tokens' losses."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    labels = torch.randint(0, 5, (2, 3), generator=generator)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    fn = losses.get(name)
    got = fn(student, teacher, mask, labels=labels)
    for i in range(2):
        kept = mask[i].bool()
        per_token = fn(student[i][kept], teacher[i][kept], labels=labels[i][kept])
        torch.testing.assert_close(got[i], per_token.mean())


def test_preference_loss_refuses_logit_losses_with_a_pointer():
    with pytest.raises(ValueError, match="on logits"):
        preference_loss(torch.nn.Identity(), None, {}, loss="ls_kd")


REFERENCE = [[2.0, 0.5, 0.5, -0.5], [0.0, 0.0, 1.5, 2.0]]


def aligndistil_by_hand(student, teacher, reference, beta=0.1, beta2=10.0, tau=1.0):
    """AlignDistil's per-position loss, as the authors' trainer (reward_boost_type 'aligndistil') computes it."""
    p_t, p_r = softmax(teacher), softmax(reference)
    w = beta2 * sum(abs(a - b) for a, b in zip(p_t, p_r)) + 1e-3
    target = softmax([w * (t - r) + t for t, r in zip(teacher, reference)], tau)
    p_s = softmax(student)
    return beta / w * sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_s, target))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_aligndistil_is_the_weighted_reverse_kl_to_the_extrapolated_teacher(tau):
    got = losses.get("aligndistil")(T(STUDENT), T(TEACHER), reference_logits=T(REFERENCE), temperature=tau)
    expected = [aligndistil_by_hand(s, t, r, tau=tau) for s, t, r in zip(STUDENT, TEACHER, REFERENCE)]
    torch.testing.assert_close(got, T(expected))
    assert losses.spec("aligndistil").inputs == ("reference_logits",)
    assert losses.spec("aligndistil").options == {"beta2": 10.0, "temperature": 1.0}


def test_aligndistil_moves_the_student_towards_the_extrapolated_teacher():
    """Descent lowers each position's loss and raises the student's probability of the synthetic teacher's
    top class, z* = w (z_T - z_R) + z_T."""
    student = T(STUDENT).requires_grad_()
    teacher, reference = T(TEACHER), T(REFERENCE)
    fn = losses.get("aligndistil")
    fn(student, teacher, reference_logits=reference).sum().backward()
    moved = student.detach() - 1.0 * student.grad
    assert (fn(moved, teacher, reference_logits=reference) < fn(T(STUDENT), teacher, reference_logits=reference)).all()
    for row in range(2):
        w = 10.0 * sum(abs(a - b) for a, b in zip(softmax(TEACHER[row]), softmax(REFERENCE[row]))) + 1e-3
        top = max(range(4), key=lambda v: w * (TEACHER[row][v] - REFERENCE[row][v]) + TEACHER[row][v])
        assert F.softmax(moved, -1)[row, top] > F.softmax(T(STUDENT), -1)[row, top]


def test_aligndistil_averages_over_the_masked_tokens():
    generator = torch.Generator().manual_seed(0)
    student, teacher, reference = (torch.randn(2, 3, 5, generator=generator) for _ in range(3))
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    fn = losses.get("aligndistil")
    got = fn(student, teacher, mask, reference_logits=reference)
    for i in range(2):
        kept = mask[i].bool()
        torch.testing.assert_close(got[i], fn(student[i][kept], teacher[i][kept], reference_logits=reference[i][kept]).mean())
