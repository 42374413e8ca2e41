"""How much rounding the cuBLAS source's recomputed product to bfloat16 costs the gradients (CPU, torch only).

The backward forms dl = (g (onehot - p) - g_ent p (log p + H)) / T per logit and rounds it to bf16
(A). The cuBLAS source's in-place form (kernels/README.md, "Logits source") instead rounds the product
shifted by T * lse, i.e. T * log p, to bf16 before forming dl (B). Rounding the unshifted product,
as large as the logits, is shown for contrast (C). Gradients of hidden and weight against float64,
relative norm error; a bias of std 2 is added after the rounding in the bias rows. The offset rows
add the same constant to every logit (one hidden/weight column pair, exact in bf16): large |lse|,
where the shift's own bf16 rounding is carried into the rounded value.

    python benchmarks/sim_product_rounding.py
"""

import argparse
import math

import torch


def gradients(h, w, dl):
    return dl.double() @ w.double(), dl.double().T @ h.double()


def run(n=512, d=256, v=16384, scale=1.0, temperature=1.0, bias=False, peaked=0.0, offset=0.0, seed=0):
    torch.manual_seed(seed)
    h = (torch.randn(n, d) * scale).bfloat16()
    w = (torch.randn(v, d) / math.sqrt(d) * 3).bfloat16()
    b = (torch.randn(v) * 2).bfloat16().float() if bias else torch.zeros(v)
    y = torch.randint(0, v, (n,))
    if peaked:  # move each hidden state towards its target's row: larger target probabilities
        h = (h.float() + peaked * w[y].float()).bfloat16()
    if offset:
        h[:, 0], w[:, 0] = math.sqrt(offset), math.sqrt(offset)  # powers of 4 below: exact
    g, g_ent = torch.randn(n, dtype=torch.float64) / n, torch.randn(n, dtype=torch.float64) / n
    z = (h.double() @ w.double().T + b.double()) / temperature
    lse = torch.logsumexp(z, 1)
    entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
    onehot = torch.nn.functional.one_hot(y, v).double()

    def dl_from(logp):
        logp = logp.double()
        p = logp.exp()
        return (g[:, None] * (onehot - p) - g_ent[:, None] * p * (logp + entropy[:, None])) / temperature

    exact = gradients(h, w, dl_from(z - lse[:, None]))
    product = h.float() @ w.float().T  # exact products, fp32 accumulation: what cuBLAS computes
    lse32 = lse.float()
    a = dl_from((product + b) / temperature - lse32[:, None]).bfloat16()
    shift = (temperature * lse32).bfloat16().float()  # what the GEMM subtracts in its epilogue
    rounded = (product - shift[:, None]).bfloat16().float()
    b_dl = dl_from((rounded + b) / temperature - (lse32 - shift / temperature)[:, None]).bfloat16()
    c_dl = dl_from((product.bfloat16().float() + b) / temperature - lse32[:, None]).bfloat16()
    rel = lambda got, ref: ((got - ref).norm() / ref.norm()).item()  # noqa: E731
    row = dict(scale=scale, T=temperature, bias=bias, peaked=peaked,
               max_p=torch.softmax(z, 1).max(1).values.mean().item(), lse=lse.mean().item(),
               H=entropy.mean().item())
    for name, dl in (("A", a), ("B", b_dl), ("C", c_dl)):
        gh, gw = gradients(h, w, dl)
        row[name] = (rel(gh, exact[0]), rel(gw, exact[1]))
    return row


def main():
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    cases = [dict(), dict(scale=3), dict(peaked=1.0), dict(peaked=3.0, scale=2), dict(temperature=0.7),
             dict(temperature=2.0, scale=3), dict(bias=True), dict(bias=True, scale=3),
             dict(offset=64), dict(offset=1024), dict(offset=4096)]
    print("N=512 D=256 V=16384 bf16; relative norm error of grad_hidden / grad_weight against float64")
    print(f"{'case':32} {'mean max p':>10} {'lse':>6} {'H':>5}  {'A: dl from fp32 z':>20}  {'B: T log p rounded':>20}  "
          f"{'C: z rounded':>20}")
    for kw in cases:
        r = run(**kw)
        label = ", ".join(f"{k}={v}" for k, v in kw.items()) or "default"
        print(f"{label:32} {r['max_p']:10.2f} {r['lse']:6.0f} {r['H']:5.2f}  " + "  ".join(
            f"{r[k][0]:9.2e} {r[k][1]:9.2e} " for k in "ABC"))


if __name__ == "__main__":
    main()
