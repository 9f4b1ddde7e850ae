"""The tiny random-init frozen parts the tests build, in one place (add ``image_size`` where one is needed)."""

# Perceive-IR's guidance reads the CLS tokens of DINOv2 layers 1, 4, 8 and 12, so its stand-in keeps 12 layers.
GUIDANCE_DINO = {"hidden_size": 32, "num_hidden_layers": 12, "num_attention_heads": 2, "patch_size": 14, "mlp_ratio": 2}
# Region sources cluster the last layer's patch tokens: two layers do.
REGION_DINO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "mlp_ratio": 2}
