"""What a NaN or infinite training loss does: stop the run, or skip that optimizer step.

Under DDP every process must take the same decision, or one would wait forever in the
gradient all-reduce the others skipped; the training module therefore asks all processes
whether any saw a non-finite loss and hands the answer to :class:`NonFiniteLossPolicy`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

NONFINITE = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NonFiniteLossPolicy:
    """"stop" raises :class:`NonFiniteLossError`; "skip" drops the step's update.

    With "skip" the bad batch's loss is still returned, so its backward pass and all-reduce
    run as on every other process; :meth:`before_optimizer_step` then undoes the step.

    Args:
        policy: "stop" or "skip".
        net: the network whose buffers a skipped step restores.

    Raises:
        ValueError: for another policy.
    """

    def __init__(self, policy: str, net: nn.Module) -> None:
        if policy not in NONFINITE:
            raise ValueError(f"nonfinite_loss={policy!r}; choose one of {', '.join(NONFINITE)}")
        self.policy, self.net = policy, net
        self._skip_step = False
        self._buffers_before_skip: list[torch.Tensor] | None = None

    def snapshot(self) -> list[torch.Tensor] | None:
        """The network's buffers before a forward pass (with "skip"; else None)."""
        if self.policy != "skip":
            return None
        return [b.detach().clone() for b in self.net.buffers()]

    def found(self, where: str, buffers: list[torch.Tensor] | None) -> None:
        """A process saw a non-finite loss: raise ("stop") or mark the step skipped ("skip").

        Args:
            where: what and where, e.g. "non-finite loss (nan) at global step 7 (...)".
            buffers: :meth:`snapshot` from before this batch's forward pass.

        Raises:
            NonFiniteLossError: with "stop".
        """
        if self.policy == "stop":
            raise NonFiniteLossError(f"{where}; training stopped. Lower the learning rate, "
                                     "check the data, or set nonfinite_loss: skip")
        warnings.warn(f"{where}; batch skipped", RuntimeWarning, stacklevel=2)
        self._skip_step = True
        if self._buffers_before_skip is None:  # the first bad batch of an accumulation
            self._buffers_before_skip = buffers  # restored once backward no longer needs them

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients and restore the buffers of a step marked skipped.

        Without gradients the optimizer leaves every parameter alone (no update, no weight decay,
        no momentum; with gradient accumulation the whole accumulated step). The buffers (batch
        norm running statistics) had already been updated by the bad batch's forward pass.
        """
        if not self._skip_step:
            return
        self._skip_step = False
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.net.buffers(), self._buffers_before_skip or [],
                                     strict=True):
                buffer.copy_(saved)
        self._buffers_before_skip = None
