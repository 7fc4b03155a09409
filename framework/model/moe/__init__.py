"""The MoE FFN, one file per step a token takes: router, dispatcher, experts, layer."""
