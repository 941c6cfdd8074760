"""Mask basis freezing for ImpressLearn: once the basis tasks are done, the basis masks and the backbone
never change again, bit for bit.

After the last basis task (or before the first task, for a random basis that is never trained) the
plugin turns the basis scores' ``requires_grad`` off, so no later optimizer holds them, and records a
SHA-256 digest of the backbone weights, basis scores and basis masks. At the end of every later task it
recomputes the digest and fails loudly if a single bit moved. The digest is part of the checkpoint, so
the check also spans a resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

import lightning as L
from torch import Tensor

from cl_lightning.callback import ContinualCallback

if TYPE_CHECKING:
    from cl_lightning.methods.base import ContinualModule


class MaskBasisHost(Protocol):
    """What the freezing needs of its method (ImpressLearn): which tasks train coefficients, and the basis."""

    current_task: int
    num_basis_tasks: int
    basis_frozen: Tensor

    def is_alpha_task(self, task: int) -> bool:
        """Whether ``task`` learns coefficients over the basis (after the basis tasks)."""

    def freeze_basis(self) -> None:
        """Stops every later optimizer from holding the basis."""

    def basis_digest(self) -> str:
        """A digest of the backbone weights, basis scores and basis masks."""


class MaskBasisFreezing(ContinualCallback):
    """Args:
        verify: recompute the basis digest after every coefficient task and raise if it changed.
    """

    host = MaskBasisHost

    def __init__(self, verify: bool = True):
        super().__init__()
        self.verify = verify
        self.digest: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # runs before the module's own setup, which chooses what the task trains
        host = cast(MaskBasisHost, pl_module)
        if stage == "fit" and host.is_alpha_task(host.current_task) and not bool(host.basis_frozen):
            self.freeze(host)

    def on_task_end(self, trainer: L.Trainer, module: ContinualModule, task_id: int) -> None:
        host = cast(MaskBasisHost, module)
        if task_id == host.num_basis_tasks - 1:
            self.freeze(host)
        elif host.is_alpha_task(task_id) and self.verify:
            self.check(host)

    def freeze(self, module: MaskBasisHost) -> None:
        module.freeze_basis()
        self.digest = module.basis_digest()

    def check(self, module: MaskBasisHost) -> None:
        if self.digest is None:
            raise RuntimeError("the mask basis was never frozen")
        now = module.basis_digest()
        if now != self.digest:
            raise RuntimeError(f"the frozen mask basis changed (digest {self.digest[:12]} -> {now[:12]})")

    def plugin_state(self) -> dict[str, Any]:
        return {"digest": self.digest}

    def load_plugin_state(self, state: dict[str, Any]) -> None:
        self.digest = state.get("digest")
