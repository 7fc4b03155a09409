"""The MoE FFN, one file per step a token takes: router, experts, layer (dispatch is in parallel/)."""
