"""The C++ chunk step of the cpu fused linear cross-entropy (``twinkle_cpu::cross_entropy_rows_``)
against the PyTorch step it replaces: same loss per row, same gradient left in the buffer."""
import pytest
import torch

from tests.conftest import cpu_only
from twinkle.kernels.fused_linear_cross_entropy import cpu
from twinkle.kernels.fused_linear_cross_entropy.chunked import torch_chunk_step

pytestmark = cpu_only('a C++ CPU kernel (csrc/cross_entropy.cpp)')


def step_inputs(rows, vocab, seed=0, scale=4.0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * scale
    return logits, torch.randint(0, vocab, (rows,), generator=generator)


@pytest.mark.parametrize('rows, vocab', [(5, 1000), (7, 1003), (3, 17), (1, 1), (0, 10)])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
@pytest.mark.parametrize('softcap', [None, 5.0])
@pytest.mark.parametrize('want_grad', [True, False])
def test_matches_the_pytorch_step(rows, vocab, smoothing, softcap, want_grad):
    logits, labels = step_inputs(rows, vocab)
    expected_buffer, native_buffer = logits.clone(), logits.clone()
    expected = torch_chunk_step(expected_buffer, labels, want_grad, smoothing, softcap)
    found = torch.ops.twinkle_cpu.cross_entropy_rows_(native_buffer, labels, want_grad, smoothing, softcap)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)  # losses are O(log V)
    if want_grad:  # gradients are softmax-sized: at most 1 in magnitude
        torch.testing.assert_close(native_buffer, expected_buffer, rtol=0, atol=1e-6)
    else:
        assert torch.equal(native_buffer, logits)


def test_masked_columns_at_minus_infinity_give_finite_loss_and_zero_gradient():
    logits, labels = step_inputs(2, 100)
    logits[0, :60] = -float('inf')
    labels[0] = 70
    expected_buffer, native_buffer = logits.clone(), logits.clone()
    expected = torch_chunk_step(expected_buffer, labels, True, 0.0, None)
    found = torch.ops.twinkle_cpu.cross_entropy_rows_(native_buffer, labels, True, 0.0, None)
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(native_buffer[0, :60], torch.zeros(60))


def test_a_label_outside_the_vocabulary_is_an_error_naming_the_row():
    logits, labels = step_inputs(3, 10)
    labels[2] = 10
    with pytest.raises(RuntimeError, match='label 10 of row 2 is outside'):
        torch.ops.twinkle_cpu.cross_entropy_rows_(logits, labels, True, 0.0, None)


def test_opcheck():
    logits, labels = step_inputs(4, 37)
    torch.library.opcheck(torch.ops.twinkle_cpu.cross_entropy_rows_, (logits, labels, True, 0.1, None),
                          test_utils=('test_schema', 'test_faketensor'))


def test_the_cpu_backend_uses_it():
    assert cpu.STEP is cpu.native_chunk_step
