"""Model layer: shared layers, one config-driven decoder, and one adapter per Hugging Face model_type."""
