"""MHA/GQA -> DeepSeek MLA, one piece per module:

(rotary pairs as complex numbers, the algebra every piece speaks, live in `kvshrink.convert.maths`)
    rope           which key components keep RoPE: per-frequency bases (`partial`, `rotate`), scores, and the
                   model-wide frequency slots of the shared rope key
    distance       the source's attention over distances -> the best constant for a pair that loses RoPE, and the
                   best gain for one that turns at a nearby slot's frequency
    fold           the part of a dropped component that a kept slot's key explains rides on that slot
    lowrank        the joint [K_nope; V] latent (`weight`, `activation` or `output` factorization)
    latent_norm    making DeepseekV3's latent RMSNorm an exact linear map
    layer          one layer's attention -> DeepseekV3 attention tensors, with its report entry
    deepseek       the target format: config, rope parameters, weight layout
    shapes         the (kv_lora_rank, rope dim) from the size options, snapped to what the target engine runs
    biases         query/value/rope-key biases refit into bias-free weights for the serving layout
    yarn           Llama-3 RoPE as the deepseek_yarn table serving engines compute
"""
