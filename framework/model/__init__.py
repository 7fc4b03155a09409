"""The DeepSeek-V3-style MoE transformer as plain modules; parallel/ wraps it later."""
