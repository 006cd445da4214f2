from smft_dist.memory.layer import ProductKeyMemory
from smft_dist.memory.plan import RowShardPlan
from smft_dist.memory.product_keys import ProductKeys, brute_force_topk
from smft_dist.memory.sharded import ShardedValueTable
from smft_dist.memory.values import LocalValueTable, RowSparse, ValueTable

__all__ = ["ProductKeyMemory", "ProductKeys", "brute_force_topk", "LocalValueTable", "RowShardPlan", "RowSparse",
           "ShardedValueTable", "ValueTable"]
