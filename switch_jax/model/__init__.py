"""The network: T5 blocks (`layers`), the encoder-decoder (`encoder_decoder`),
its loss on a batch (`losses`) and parameter counts (`param_count`), and the
mixture of experts inside it (`moe/`).
"""
