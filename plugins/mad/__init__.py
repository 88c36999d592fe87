"""MAD (Orekondy et al., ICLR 2020) machinery shared by the ``mad`` and ``mad_argmax`` defenses.

- geometry:   per-row centre c and Gram M so that <G^T v, G^T w> = (v - c)^T M (w - c); cosines of candidates
- jacobian:   the surrogate's softmax, its last linear layer, per-sample Gram J J^T with torch.func
- candidates: one-hot vertices, subsets containing the top class (exhaustive or greedy), the oracles
- mixing:     the largest feasible mixing coefficient (closed form for l1/l2, bisection for KL)
- defense:    config fields and the batched pipeline
"""
