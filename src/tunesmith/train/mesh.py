"""Where a rank sits in the job's mesh, ``world = data parallel × pipeline × sequence × tensor`` parallel.

The ranks of one model replica are consecutive: rank ``r`` is data-parallel rank ``r // (pp·sp·tp)``, and inside
its replica the tensor-parallel index varies fastest, then the sequence-parallel one, then the pipeline stage
(torch's ``init_device_mesh((dp, pp, sp, tp))`` numbers them the same way). Only the data-parallel dimension reads
its own samples: every rank of a replica collates the very same rows (:attr:`Mesh.dp_rank` is the loader's rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import Config
from tunesmith.config.parallel import mesh_sizes
from tunesmith.errors import ConfigError
from tunesmith.train.distributed import Collectives

__all__ = ["Mesh", "mesh_of"]


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the mesh; the sizes of the model-parallel dimensions (1: off)."""

    rank: int = 0
    world_size: int = 1
    sequence_parallel: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    @property
    def replica_size(self) -> int:
        """Ranks that hold one model replica and train the same rows."""
        return self.pipeline_parallel * self.sequence_parallel * self.tensor_parallel

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.replica_size

    @property
    def dp_rank(self) -> int:
        """Which share of the samples this rank trains (the same for every rank of its replica)."""
        return self.rank // self.replica_size

    @property
    def pp_rank(self) -> int:
        """Which pipeline stage this rank runs."""
        return (self.rank % self.replica_size) // (self.sequence_parallel * self.tensor_parallel)

    @property
    def sp_rank(self) -> int:
        """Which slice of every row this rank holds."""
        return (self.rank % (self.sequence_parallel * self.tensor_parallel)) // self.tensor_parallel

    @property
    def tp_rank(self) -> int:
        """Which slice of the split weights this rank holds."""
        return self.rank % self.tensor_parallel

    @property
    def enabled(self) -> bool:
        """Whether any model-parallel dimension is on (else: plain data parallel)."""
        return self.replica_size > 1

    def sizes(self) -> dict[str, int]:
        return {"dp": self.data_parallel, "pp": self.pipeline_parallel, "sp": self.sequence_parallel,
                "tp": self.tensor_parallel}

    def describe(self) -> str:
        """``4 ranks = 2 data-parallel × 2 tensor-parallel``: the dimensions that are on."""
        names = {"pp": "pipeline-parallel", "sp": "sequence-parallel", "tp": "tensor-parallel"}
        parts = [f"{self.data_parallel} data-parallel"]
        parts += [f"{size} {names[key]}" for key, size in self.sizes().items() if key in names and size > 1]
        return f"{self.world_size} ranks = " + " × ".join(parts)


def mesh_of(cfg: Config, comm: Collectives) -> Mesh:
    """This rank's mesh for ``cfg``; one sentence when the model-parallel sizes do not tile the world."""
    try:
        mesh_sizes(comm.world_size, cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return Mesh(comm.rank, comm.world_size, cfg.sequence_parallel_size, cfg.tensor_parallel_size,
                cfg.pipeline_parallel_size)
