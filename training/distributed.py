"""Data-parallel training under torchrun: the process group, its barriers, and each process's device."""

from __future__ import annotations

from napari_cellclip.devices import resolve_device, torchrun_env, use_device

__all__ = ["Dist", "resolve_train_device"]


class Dist:
    """The torchrun environment of this process (one process, rank 0, without torchrun)."""

    def __init__(self):
        self.rank, self.world, local = torchrun_env()
        self.local_rank = local if self.world > 1 else 0
        self.initialised_here = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device, timeout_minutes: float = 60.0) -> None:
        """Join the process group (NCCL on CUDA, gloo elsewhere); every collective, barriers included,
        may wait ``timeout_minutes`` for the slowest rank (NCCL's own default, 10 minutes, is shorter
        than one rank's share of a giant encoder's feature extraction can take)."""
        if not self.enabled:
            return
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=float(timeout_minutes)))
            self.initialised_here = True

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, in rank order (just ``[obj]`` without torchrun)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialised_here = False


def resolve_train_device(device: str, dist: Dist):
    """The device of this process: ``cuda:LOCAL_RANK`` under torchrun, made current."""
    return use_device(resolve_device(device, local_rank=dist.local_rank if dist.enabled else None))
