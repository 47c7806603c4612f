"""SwAV/SEER ops: each has a plain-PyTorch reference and a public dispatcher taking `backend=`."""

from .sinkhorn import sinkhorn, sinkhorn_reference
from .swav_head import swav_loss, swav_loss_reference

__all__ = ["sinkhorn", "sinkhorn_reference", "swav_loss", "swav_loss_reference"]
