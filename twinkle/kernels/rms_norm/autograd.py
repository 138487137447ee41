"""The autograd formula every fused RMSNorm backend shares: its forward op returns (y, rstd), its
backward op takes (dy, x, weight, rstd, offset) and returns (dx, dweight)."""
import torch


def _setup_context(ctx, inputs, output):
    x, weight, _, offset = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.offset = offset


def differentiate(forward_op, backward_op) -> None:
    """Registers the formula on ``forward_op`` (a qualified name or a custom op), calling ``backward_op``."""
    def backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = backward_op(grad_y, x, weight, rstd, ctx.offset)
        return grad_x, grad_weight, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)
