"""The vocabulary every layer shares: storage formats, quantization plans, code packing. Plain data."""
