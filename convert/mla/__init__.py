"""MHA/GQA -> DeepSeek MLA, one piece per module:

    complex_heads  rotary pairs as complex numbers (the algebra every other piece speaks)
    rope           which key components keep RoPE: per-frequency bases (`partial`, `rotate`), scores, and the
                   model-wide frequency slots of the shared rope key
    distance       the source's attention over distances -> the best constant for a pair that loses RoPE
    lowrank        the joint [K_nope; V] latent (`weight`, `activation` or `output` factorization)
    latent_norm    making DeepseekV3's latent RMSNorm an exact linear map
    layer          one layer's attention -> DeepseekV3 attention tensors, with its report entry
    deepseek       the target format: config, rope parameters, weight layout, serving targets
"""
