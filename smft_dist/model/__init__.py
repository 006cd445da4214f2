from smft_dist.model.configuration import SmftConfig
from smft_dist.model.modeling import SmftForCausalLM

__all__ = ["SmftConfig", "SmftForCausalLM"]
