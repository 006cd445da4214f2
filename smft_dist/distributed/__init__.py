"""Distribution: process groups (`init_distributed`, `DistContext`), the swap of memory layers to
row-sharded tables (`shard_memory`) and back, and the spawn harness for multi-rank tests.
The table and its row partition live with the memory: `smft_dist.memory.ShardedValueTable`,
`smft_dist.memory.RowShardPlan`."""
from smft_dist.distributed.context import DistContext, context_from_group, init_distributed, launcher_env
from smft_dist.distributed.sharding import gather_full_table, shard_memory, unshard_memory

__all__ = ["DistContext", "context_from_group", "init_distributed", "launcher_env",
           "gather_full_table", "shard_memory", "unshard_memory"]
