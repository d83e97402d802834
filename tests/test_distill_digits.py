"""The digits distillation (bench/distill_digits.py) trains through gpuce.torch's
distillation_loss exactly as through torch's own KL divergence: after the same steps the
students' parameters agree to rounding, and the distilled student learns the task."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from bench import distill_digits as D  # noqa: E402


def torch_kl(s, t):
    """KL(p_T ‖ p_S) at τ, averaged over the rows, by torch.nn.functional.kl_div."""
    F = torch.nn.functional
    return F.kl_div(F.log_softmax(s / D.TAU, 1), F.log_softmax(t / D.TAU, 1), log_target=True,
                    reduction="batchmean")


def test_distillation_with_gpuce_equals_torch_kl_div_and_learns():
    (teacher, hard, got), student = D.run_seed(0, steps_teacher=120, steps_student=150)
    (_, _, want), reference = D.run_seed(0, kd_loss=torch_kl, steps_teacher=120, steps_student=150)
    for a, b in zip(student.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert got == want
    assert teacher > 0.9 and got > 0.85 and hard > 0.85
