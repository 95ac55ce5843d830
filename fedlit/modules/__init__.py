"""Client LightningModules: one class per client kind."""

from fedlit.modules.base import ClientModule
from fedlit.modules.coop import CoOpClient
from fedlit.modules.pfedmoap import PFedMoAPClient
from fedlit.modules.zeroshot import ZeroShotClient

__all__ = ["ClientModule", "CoOpClient", "PFedMoAPClient", "ZeroShotClient"]
