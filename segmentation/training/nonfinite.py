"""What a NaN or infinite training loss does: stop the run, or skip that optimizer step.

Under DDP every process must take the same decision, or one would wait forever in the
gradient all-reduce the others skipped; each process therefore adds up, over all processes,
whether its loss was non-finite, and all decide on that sum.

Nothing here makes the host wait for the device when the loss is computed: the check is
queued on the device (an all-reduce under DDP, then a copy into pinned host memory), and it is
read in :meth:`NonFiniteLossPolicy.settle`, just before the optimizer step, when the backward
pass is already queued. The host then waits only for the end of the forward pass, while the
device still has the whole backward pass to run; reading the loss in the training step itself
(``bool(torch.isfinite(loss))``) would drain the device's queue at every step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

NONFINITE = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclass
class _PendingCheck:
    """One batch's loss and its check on the way to the host."""

    loss: torch.Tensor                      # () detached, on the device
    host: torch.Tensor                      # (3,) loss, non-finite here, processes non-finite
    done: torch.cuda.Event | None           # recorded after the copy (CUDA only)
    where: str                              # "global step 7 (epoch 0, batch 7)"
    batch_size: int
    buffers: list[torch.Tensor] | None      # the network's buffers before this batch


class NonFiniteLossPolicy:
    """"stop" raises :class:`NonFiniteLossError`; "skip" drops the step's update.

    The training step calls :meth:`check` for each batch; the module's
    ``on_before_optimizer_step`` calls :meth:`settle`, which decides for the whole (possibly
    accumulated) step. With "skip" the bad batch's backward pass and gradient all-reduce run
    as on every other process; :meth:`settle` then drops the gradients and restores the
    buffers.

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
        self._pending: list[_PendingCheck] = []

    def snapshot(self) -> list[torch.Tensor] | None:
        """The network's buffers before a forward pass (with "skip"; else None)."""
        if self.policy != "skip":
            return None
        return [b.detach().clone() for b in self.net.buffers()]

    def check(self, loss: torch.Tensor, where: str, batch_size: int,
              buffers: list[torch.Tensor] | None) -> None:
        """Queue the check of one batch's loss; nothing waits for the device.

        Args:
            loss: () the batch's loss, on the device.
            where: e.g. "global step 7 (epoch 0, batch 7)", for the message.
            batch_size: samples in the batch (the weight of its loss in the epoch's mean).
            buffers: :meth:`snapshot` from before this batch's forward pass.
        """
        loss = loss.detach()
        here = (~torch.isfinite(loss)).float()
        anywhere = here.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # queued on the device like the gradients' all-reduce; Lightning's
            # reduce_boolean_decision adds a barrier and reads the result on the host
            torch.distributed.all_reduce(anywhere)
        values = torch.stack([loss.float(), here, anywhere])
        cuda = values.device.type == "cuda"
        host = torch.empty(3, dtype=torch.float32, pin_memory=cuda)
        host.copy_(values, non_blocking=cuda)  # elsewhere no event tells when it landed
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(values.device))
        self._pending.append(_PendingCheck(loss, host, done, where, batch_size, buffers))

    def reset(self) -> None:
        """Forget checks of an optimizer step that never came (e.g. a stop mid-accumulation)."""
        self._pending = []

    def settle(self, optimizer: torch.optim.Optimizer, scaler_reads_gradients: bool = False
               ) -> list[tuple[torch.Tensor, float, int]]:
        """Decide on the batches checked since the last optimizer step.

        Waits for their forward passes to end (not for the backward pass queued after them).
        A non-finite loss on any process: "stop" raises; "skip" drops the gradients (without
        gradients the optimizer leaves every parameter alone: no update, no weight decay, no
        momentum; with gradient accumulation the whole accumulated step) and restores the
        buffers (batch norm statistics) from before the first bad batch.

        Args:
            optimizer: the optimizer about to step.
            scaler_reads_gradients: a float16 gradient scaler will look for infinities in the
                gradients itself (a fused optimizer under "16-mixed": Lightning has not
                unscaled them): the gradients are set to infinity, so that the scaler skips
                the step, instead of dropped, which it would refuse.

        Returns:
            (loss on the device, its value on the host, batch size) of each batch whose loss
            was finite on this process.

        Raises:
            NonFiniteLossError: with "stop".
        """
        pending, self._pending = self._pending, []
        finite, first_bad = [], None
        for check in pending:
            value, here, anywhere = _wait_and_read(check)
            if not here:
                finite.append((check.loss, value, check.batch_size))
            if anywhere and first_bad is None:
                what = f"non-finite loss ({value})" if here else \
                    "non-finite loss on another process"
                first_bad = check, f"{what} at {check.where}"
        if first_bad is None:
            return finite
        check, where = first_bad
        if self.policy == "stop":
            raise NonFiniteLossError(f"{where}; training stopped. Lower the learning rate, "
                                     "check the data, or set nonfinite_loss: skip")
        warnings.warn(f"{where}; batch skipped", RuntimeWarning, stacklevel=2)
        if scaler_reads_gradients:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for parameter in group["params"]:
                        if parameter.grad is not None:
                            parameter.grad.fill_(float("inf"))
        else:
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.net.buffers(), check.buffers or [], strict=True):
                buffer.copy_(saved)
        return finite


def _wait_and_read(check: _PendingCheck) -> tuple[float, bool, bool]:
    """The loss, whether it was non-finite here, and on any process (after its copy landed)."""
    if check.done is not None:
        check.done.synchronize()
    value, here, anywhere = check.host.tolist()
    return value, here > 0, anywhere > 0


def refuse_optimizers_that_skipped_steps_corrupt(optimizer: torch.optim.Optimizer,
                                                 scaler: object | None) -> None:
    """Refuse fused SGD with momentum when a float16 gradient scaler may skip its steps.

    A float16 gradient scaler skips every step whose gradients overflowed (routinely the first
    few, while the scale settles) and lets a fused optimizer do the skipping in its kernel.
    PyTorch's fused SGD then corrupts its momentum: a skipped first step leaves the buffers it
    allocated with ``empty_like`` uninitialised, and the next step adds that memory to the
    weights (seen with torch 2.13 on the CPU; also reported for its CUDA kernel). Fused Adam
    and AdamW leave their state untouched on a skipped step and are accepted.

    Args:
        optimizer: the configured optimizer.
        scaler: the precision plugin's gradient scaler, or None without one (a disabled
            scaler skips nothing).

    Raises:
        ValueError: for SGD with ``fused=True`` and momentum under a gradient scaler.
    """
    enabled = scaler is not None and getattr(scaler, "is_enabled", lambda: True)()
    if not enabled or not isinstance(optimizer, torch.optim.SGD):
        return
    if any(group.get("fused") and group.get("momentum", 0) for group in optimizer.param_groups):
        raise ValueError(
            "optimizer SGD with fused=True and momentum cannot train under precision "
            "'16-mixed': a step its gradient scaler skips leaves the fused momentum buffers "
            "uninitialised and the next step adds them to the weights; set the optimizer's "
            "fused: false (its default), or train with precision 'bf16-mixed' or '32-true'")
