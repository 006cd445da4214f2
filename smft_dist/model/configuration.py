"""`SmftConfig`: a `LlamaConfig` with product-key memory layers in place of some FFNs."""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MEMORY_MODES = ("replace", "add")


@strict
class SmftConfig(LlamaConfig):
    """Llama-style decoder; the FFN of each layer in `memory_layers` is a `ProductKeyMemory` with
    `memory_n_keys ** 2` slots, `memory_heads` heads of `memory_knn` slots each, keys of
    `memory_k_dim` and values of `memory_value_dim` (stored as `memory_value_dtype`).

    `memory_mode`: "replace" (the paper's model: the memory takes the FFN's place) or "add" (a
    retrofitted dense model: the memory sits beside the kept FFN, its output scaled by a learned
    gate that starts at zero, so the model computes exactly what the dense one did until the gate
    moves; see smft_dist.model.retrofit)."""

    model_type = "smft"

    memory_layers: list[int] | None = None
    memory_n_keys: int = 1024
    memory_heads: int = 4
    memory_knn: int = 32
    memory_k_dim: int = 512
    memory_value_dim: int = 1024
    memory_swilu: bool = True
    memory_qk_norm: bool = False
    memory_value_dtype: str = "float32"
    memory_mode: str = "replace"

    def __post_init__(self, **kwargs):
        if self.memory_layers is None:
            self.memory_layers = [self.num_hidden_layers // 2]
        super().__post_init__(**kwargs)

    @property
    def memory_slots(self) -> int:
        return self.memory_n_keys**2

    def validate_architecture(self):
        super().validate_architecture()
        bad = [i for i in self.memory_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"memory_layers {bad} outside [0, num_hidden_layers={self.num_hidden_layers})")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode={self.memory_mode!r} is not one of {list(MEMORY_MODES)}")
        if self.memory_knn > self.memory_n_keys:
            raise ValueError(f"memory_knn={self.memory_knn} > memory_n_keys={self.memory_n_keys}")

    @classmethod
    def from_model_config(cls, m) -> "SmftConfig":
        """Build from the run config's `ModelConfig` section (smft_dist.config)."""
        rope = {"rope_type": "default", **(m.rope_scaling or {}), "rope_theta": m.rope_theta}
        return cls(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, hidden_act=m.hidden_act,
            max_position_embeddings=m.max_position_embeddings, rope_parameters=rope, rms_norm_eps=m.rms_norm_eps,
            tie_word_embeddings=m.tie_word_embeddings, memory_layers=list(m.memory_layers),
            memory_n_keys=m.memory_n_keys, memory_heads=m.memory_heads, memory_knn=m.memory_knn,
            memory_k_dim=m.memory_k_dim, memory_value_dim=m.memory_value_dim, memory_swilu=m.memory_swilu,
            memory_qk_norm=m.memory_qk_norm, memory_value_dtype=m.memory_value_dtype, memory_mode=m.memory_mode,
            pad_token_id=m.pad_token_id, bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id,
        )

    def to_model_section(self) -> dict:
        """The run config's `model:` section (smft_dist.config.ModelConfig fields, without
        init_from/tokenizer) that `from_model_config` turns back into this config."""
        rope = dict(self.rope_parameters or {})
        theta = rope.pop("rope_theta", 10000.0)
        if rope.get("rope_type", "default") == "default":
            rope.pop("rope_type", None)
        eos = self.eos_token_id
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": float(theta),
            "rope_scaling": rope or None, "rms_norm_eps": float(self.rms_norm_eps),
            "tie_word_embeddings": bool(self.tie_word_embeddings), "memory_layers": list(self.memory_layers),
            "memory_n_keys": self.memory_n_keys, "memory_heads": self.memory_heads, "memory_knn": self.memory_knn,
            "memory_k_dim": self.memory_k_dim, "memory_value_dim": self.memory_value_dim,
            "memory_swilu": self.memory_swilu, "memory_qk_norm": self.memory_qk_norm,
            "memory_value_dtype": self.memory_value_dtype, "memory_mode": self.memory_mode,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, (list, tuple)) else eos,
        }
