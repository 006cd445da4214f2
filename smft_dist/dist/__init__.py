"""Distribution: process groups (`init_distributed`), the row partition of the memory table
(`RowShardPlan`) and the swap of memory layers to row-sharded tables (`shard_memory`).
The table itself is `smft_dist.memory.sharded.ShardedValueTable`."""
from smft_dist.dist.context import DistContext, context_from_group, init_distributed, launcher_env
from smft_dist.dist.plan import RowShardPlan
from smft_dist.dist.sharding import gather_full_table, shard_memory, unshard_memory

__all__ = ["DistContext", "context_from_group", "init_distributed", "launcher_env", "RowShardPlan",
           "gather_full_table", "shard_memory", "unshard_memory"]
