"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` as plain fully sharded data parallelism.

``ModelParallelStrategy`` builds a 2-D device mesh (data parallel x tensor parallel) and by default puts every
device of a node on the tensor-parallel axis. The stages shard with FSDP2 only (``distributed.shard_for_strategy``,
called from their ``configure_model``), so this subclass fixes ``tensor_parallel_size`` to 1 and puts every process
(``devices x num_nodes``) on the data-parallel axis, whatever the device count: one fragment,
``configs/strategies/fsdp2.yaml``, serves any number of GPUs, or CPU processes (gloo) for trying it.

``save_distributed_checkpoint`` defaults to False: rank 0 writes one ordinary checkpoint file (the full, gathered
state), which ``generate``, ``export``, ``--ckpt_path`` and the next stage's ``init_from`` read like any other.
True writes a folder of shards per checkpoint instead (faster for large models; resumable with this strategy only).
"""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2) over every process; see the module docstring.

    Args:
        save_distributed_checkpoint: a folder of shards per checkpoint instead of one full file.
        process_group_backend: ``nccl`` / ``gloo`` (default: Lightning's choice for the accelerator).
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process shards the same model
        super().setup_environment()
