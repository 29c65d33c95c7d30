"""The network: T5 blocks (`layers`), the encoder-decoder (`encoder_decoder`),
its losses and parameter counts, and the mixture of experts inside it (`moe/`).
"""
