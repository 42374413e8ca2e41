"""What summing grad_weight over token chunks in bfloat16 costs (the single-pass schedule), CPU, torch only.

The two-pass schedule forms grad_weight = dl^T @ h over all tokens in one cuBLAS call per vocabulary
chunk (fp32 accumulation, one rounding to bf16). The single-pass schedule (kernels/single_pass.py)
adds one token chunk's dl_c^T @ h_c at a time into the bf16 gradient (cuBLAS: fp32 accumulation of
the chunk's product plus the running sum, rounded to bf16 once per chunk), and then multiplies by the
loss's upstream gradient (one more rounding, unless it is a power of two). dl is rounded to bf16 in
both, as the kernels store it. Relative norm error of grad_weight against float64, per number of
chunks K, for a token-mean loss (upstream gradient A_t / N per token plus an entropy term).

    python benchmarks/sim_single_pass_rounding.py
"""

import argparse

import torch


def run(n, d, v, chunks, upstream_scale, seed=0):
    torch.manual_seed(seed)
    h = (torch.randn(n, d) / d**0.25).bfloat16()
    w = (torch.randn(v, d) / d**0.25 * 2).bfloat16()
    y = torch.randint(0, v, (n,))
    g, g_ent = torch.randn(n, dtype=torch.float64) / n, torch.full((n,), -0.01 / n, dtype=torch.float64)
    z = h.double() @ w.double().T
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    entropy = -(p * logp).sum(1, keepdim=True)
    dz = g[:, None] * (torch.nn.functional.one_hot(y, v).double() - p) - g_ent[:, None] * p * (logp + entropy)
    dl = dz.bfloat16()  # as the kernels store it
    exact = upstream_scale * (dz.T @ h.double())

    one_rounding = (upstream_scale * (dl.double().T @ h.double())).bfloat16()  # two-pass: scale inside dl
    rows = n // chunks
    summed = torch.zeros(v, d, dtype=torch.bfloat16)
    for c in range(chunks):
        part = slice(c * rows, n if c == chunks - 1 else (c + 1) * rows)
        summed = (summed.double() + dl[part].double().T @ h[part].double()).bfloat16()  # fp32 add, one rounding
    scaled = (summed.double() * upstream_scale).bfloat16()
    error = lambda got: ((got.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    return error(one_rounding), error(scaled)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--v", type=int, default=4096)
    args = ap.parse_args()
    print(f"grad_weight relative error vs float64, N={args.n}, D={args.d}, V={args.v}, bf16 inputs and dl")
    print(f"{'chunks':>7} {'upstream':>9} {'two-pass':>10} {'single-pass':>12} {'ratio':>6}")
    for upstream in (1.0, 1 / 3):
        for chunks in (1, 4, 16, 22, 64):
            two, one = run(args.n, args.d, args.v, chunks, upstream)
            print(f"{chunks:7d} {upstream:9.3f} {two:10.2e} {one:12.2e} {one / two:6.2f}")
    print("(22 chunks: N=16384 tokens at V=151936 and the default 2^26-element budget, chunks of 768 tokens; 64: "
          "the most there are, kernels/single_pass.py MAX_TOKEN_CHUNKS; upstream 1/3 is not a power of two: one "
          "more rounding)")


if __name__ == "__main__":
    main()
