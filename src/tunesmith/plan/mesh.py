"""The mesh a launch will run (``world = dp × sp × tp × pp``), checked before anything starts: the launches
(``tunesmith train --dry-run``, ``launch k8s``, ``launch slurm``) print it and refuse, with one sentence naming the
keys, a world size it does not divide or head counts it cannot split.

No torch here: the head counts come from the model's config.json or the built-in table, as the plan reads them
(an unknown model skips that part; the engines check it again when the job starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunesmith.config.parallel import format_mesh, mesh_sizes
from tunesmith.errors import ConfigError
from tunesmith.plan.arch import facts_for_model

if TYPE_CHECKING:
    from tunesmith.config.schema import Config


def check_mesh(cfg: Config, world_size: int, where: str = "") -> dict[str, int]:
    """{"dp", "sp", "tp", "pp"} for ``world_size`` ranks; ConfigError (one sentence naming the keys, and
    ``where`` the world size comes from, e.g. "--nnodes 2 × --nproc-per-node 8") when the mesh does not tile
    the world or the model's heads do not split over it."""
    try:
        sizes = mesh_sizes(world_size, cfg)
    except ValueError as err:
        raise ConfigError(f"{err}{f' ({where})' if where else ''}") from None
    _check_heads(cfg, sizes)
    return sizes


def _check_heads(cfg: Config, sizes: dict[str, int]) -> None:
    if sizes["sp"] == 1 and sizes["tp"] == 1:
        return
    try:
        facts = facts_for_model(cfg.model_name_or_path, cfg.cache_dir)
    except Exception:  # noqa: BLE001 - the head counts are a courtesy before launch; the job checks them again
        facts = None
    if facts is None:
        return
    q, kv = facts.num_heads, facts.num_kv_heads
    sp, tp = sizes["sp"], sizes["tp"]
    if sp > 1 and q % sp:
        works = [n for n in range(2, q + 1) if q % n == 0]
        raise ConfigError(
            f"sequence_parallel_size: {sp} does not divide {cfg.model_name_or_path}'s {q} query heads ({q} query and "
            f"{kv} key/value heads); sizes that work: {_sizes(works)} (or 1: no sequence parallel)"
        )
    if tp > 1 and (q % tp or kv % tp):
        works = [n for n in range(2, kv + 1) if q % n == 0 and kv % n == 0]
        raise ConfigError(
            f"tensor_parallel_size: {tp} does not divide {cfg.model_name_or_path}'s heads ({q} query and {kv} "
            f"key/value heads); sizes that work: {_sizes(works)} (or 1: no tensor parallel)"
        )


def _sizes(values: list[int]) -> str:
    return " or ".join(map(str, values[:8])) if values else "none above 1"


def mesh_line(sizes: dict[str, int]) -> str:
    """``mesh: dp 4 × sp 1 × tp 2 × pp 1 (8 ranks)``: the line the launches print."""
    ranks = sizes["dp"] * sizes["sp"] * sizes["tp"] * sizes["pp"]
    return f"mesh: {format_mesh(sizes)} ({ranks} rank{'s' if ranks > 1 else ''})"
