"""Partial sharing: which U-Net groups an instruction carries and its answer returns, and the
parts of this client's model that never travel, kept on its own disk."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from diffusers import UNet2DModel

from fedphd.common.core.diffusion import is_saved_model, load_model, save_model
from fedphd.common.core.models import (
    architecture_of,
    architecture_to_json,
    load_ndarrays,
    model_to_ndarrays,
)
from fedphd.common.core.unet_groups import format_groups, group_indices, is_everything, parse_groups
from fedphd.common.settings.config import DiffusionConfig
from fedphd.common.wire.keys import RETURN_GROUPS_KEY, SEND_GROUPS_KEY
from fedphd.common.wire.transport import Scalar

log = logging.getLogger("fedphd.client")


@dataclass(frozen=True)
class SharedGroups:
    """The groups sent in an instruction and expected back in its answer (every group when
    the instruction names none)."""

    sent: tuple[str, ...]
    returned: tuple[str, ...]

    @classmethod
    def of(cls, config: dict[str, Scalar]) -> SharedGroups:
        return cls(parse_groups(config.get(SEND_GROUPS_KEY)),
                   parse_groups(config.get(RETURN_GROUPS_KEY)))

    @property
    def private(self) -> bool:
        """Whether parts of the model stay with this client."""
        return not is_everything(self.sent)

    def sent_at(self, names: list[str]) -> list[int]:
        return group_indices(names, self.sent)

    def returned_at(self, names: list[str]) -> list[int]:
        return group_indices(names, self.returned)

    @property
    def returned_label(self) -> str:
        return format_groups(self.returned)


class PrivateParts:
    """This client's whole model in diffusers format (safetensors) in its state folder, so a
    restarted client continues with the parts that were never sent."""

    def __init__(self, directory: Path, diffusion: DiffusionConfig, client_id: int) -> None:
        self.directory = directory
        self.diffusion = diffusion
        self.client_id = client_id

    def save(self, model: UNet2DModel) -> None:
        """Replaced atomically enough: diffusers writes the weights file last, after the
        config."""
        save_model(model, self.diffusion, self.directory)

    def restore(self, model: UNet2DModel, arch_json: str) -> None:
        """Load the saved model into ``model`` when there is one of the same architecture;
        otherwise the private parts start from the run's initial weights."""
        directory = self.directory
        if not is_saved_model(directory):
            log.info("client %d: no saved model in %s, private parts start from the run's "
                     "initial weights", self.client_id, directory)
            return
        try:
            saved, _ = load_model(directory)
        except (OSError, ValueError) as error:
            raise ValueError(f"client {self.client_id}: saved model in {directory} "
                             f"cannot be loaded: {error}") from None
        if architecture_to_json(architecture_of(saved)) != arch_json:
            log.warning("client %d: the saved model in %s has another architecture; private "
                        "parts start from the run's initial weights", self.client_id, directory)
            return
        load_ndarrays(model, model_to_ndarrays(saved))
        log.info("client %d: private parts restored from %s", self.client_id, directory)
