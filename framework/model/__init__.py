"""The DeepSeek-V3-style MoE transformer as plain modules; parallel/ wraps it later.

Shape suffixes: a tensor's name ends in its dimensions, one letter each (x_TD is [T, D]).
Used here and in parallel/token_dispatch.py and parallel/expert_parallel.py.

    B  sequences in a micro-batch            S  positions of a sequence (model.seq_len)
    P  positions of a training row, S + 1 (inputs, then the last target)
    T  tokens, B x S flattened               D  model dimension (model.dim)
    H  attention heads                       d  head dimension; h: half of it (RoPE pairs)
    E  experts, all of them (model.num_experts)
    G  expert groups (model.n_groups)        K  routed slots per token (model.top_k)
    F  hidden size of one expert (model.expert_dim)
    N  routed (token, slot) rows this rank sends, T x K, in dispatch order
    R  expert-parallel ranks (parallel.ep)   L  experts held by this rank, E / R
    M  rows this rank's experts compute, after the all-to-all
    I, O  in and out features of one grouped matmul (grouped_gemm.py)

Without expert parallelism R = 1, L = E and M = N.
"""
