"""Where this process sits in a multi-process launch, from the launcher's environment variables.

The one reader of RANK / WORLD_SIZE / LOCAL_RANK (torchrun, or set by hand) and SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID (`srun`): training joins a process group with it
(:func:`lexvla.train.distributed.init_distributed`), corpus encoding splits its shards with it
(:func:`lexvla.search.encode.resolve_rank`).
"""

from __future__ import annotations

import os


def launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0).

    torchrun's win when both are set (torchrun inside a SLURM allocation); each launcher counts only when
    its rank and world size are both set.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", "0")),
        )
    return 0, 1, 0
