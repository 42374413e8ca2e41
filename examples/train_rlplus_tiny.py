"""RL-PLUS vs GRPO on a tiny arithmetic task, on a CPU, in a few minutes, with no download.

Task: the prompt is ``<bos>a+b=`` (characters are tokens), the completion must be the decimal
sum followed by ``<eos>``; reward 1 for an exact match, else 0. A small Llama-architecture
model is randomly initialised from a ``transformers`` config.

Protocol (everything below is what runs; nothing is tuned per method):
  1. Warm-up, so that sampling is not hopeless: 60 supervised steps (batch 16) on correct
     ``a+b=<sum><eos>`` of the training problems, stopped early on purpose (pass@1 ~0.1-0.2).
     ``--warmup format`` instead trains on random answers (format only, no addition).
  2. From that same checkpoint, the same number of RL steps for each method, same seed, same
     prompts per step, same number of sequences per prompt (the group size G = 8):
       RL-PLUS: G-1 on-policy rollouts sampled with ``generate`` + 1 external demonstration
                from the exact solver (reward 1); advantage = reward minus group mean
                (official recipe); loss = rlplus_loss with OFFICIAL_RECIPE.
       GRPO:    G on-policy rollouts, no external data; everything else identical (same loss
                code and hyper-parameters, mean-centred advantages; each batch is used for one
                update, so the ratio is 1 and clipping would not act).
  3. Every few steps: pass@1 (mean reward of n = 16 samples at temperature 1) and pass@8
     (unbiased estimator from the same samples) on the training problems (80) and on
     held-out problems (20). Repeated over seeds; the summary is mean [min, max].

Run:  python examples/train_rlplus_tiny.py      (about 3 minutes on 2 busy CPU cores, 3 seeds)
Writes examples/results/train_rlplus_tiny.{json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time

import torch

from rlplus_kernels import OFFICIAL_RECIPE
from rlplus_kernels.trainer import RLPlusTrainer, build_group_batch, score_logprobs

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+="
STOI = {c: i + 3 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
VOCAB = 3 + len(CHARS)


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids) -> str:
    return "".join(ITOS.get(int(i), "") for i in ids)


def prompt_ids(a: int, b: int) -> list[int]:
    return [BOS] + encode(f"{a}+{b}=")


def solve(a: int, b: int) -> list[int]:
    """The exact solver: the external demonstration."""
    return encode(str(a + b)) + [EOS]


def reward(a: int, b: int, completion: list[int]) -> float:
    return float(completion == solve(a, b))


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=32, tie_word_embeddings=True,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return LlamaForCausalLM(config)


def left_pad(seqs: list[list[int]]):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample(model, problems, num_samples: int, max_new_tokens: int) -> list[list[list[int]]]:
    """``num_samples`` completions per problem from ``generate`` (temperature 1, no top-k/p)."""
    from transformers import GenerationConfig

    model.eval()
    ids, mask = left_pad([prompt_ids(a, b) for a, b in problems])
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                           pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    new = out[:, ids.shape[1]:].tolist()
    comps = []
    for seq in new:
        cut = seq.index(EOS) + 1 if EOS in seq else len(seq)
        comps.append(seq[:cut])
    return [comps[i * num_samples:(i + 1) * num_samples] for i in range(len(problems))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate(model, problems, args) -> dict:
    comps = sample(model, problems, args.eval_samples, args.max_new_tokens)
    correct = [sum(reward(a, b, c) for c in cs) for (a, b), cs in zip(problems, comps)]
    n = args.eval_samples
    return {"pass@1": sum(c / n for c in correct) / len(problems),
            f"pass@{args.k}": sum(pass_at_k(n, int(c), args.k) for c in correct) / len(problems)}


def warmup(model, problems, args, rng: random.Random) -> None:
    """Brief supervised warm-up so that sampling is not hopeless.

    ``--warmup sft``: a few steps on correct ``a+b=<sum><eos>`` (stopped early on purpose);
    ``--warmup format``: random answers, which teach the format but not addition.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=args.warmup_lr)
    max_sum = 2 * args.max_operand
    model.train()
    for _ in range(args.warmup_steps):
        seqs, plens = [], []
        for a, b in rng.choices(problems, k=args.warmup_batch):
            p = prompt_ids(a, b)
            answer = solve(a, b) if args.warmup == "sft" else encode(str(rng.randint(0, max_sum))) + [EOS]
            seqs.append(p + answer)
            plens.append(len(p))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), PAD)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, plens)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p:len(s)] = torch.tensor(s[p:])
            mask[i, :len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def rl_normalizer(args) -> int:
    """The "sum" aggregation's constant: the official recipe's is the max response length (8192 tokens); here it is
    the max number of completion tokens in a batch, so that one step has the scale of a token mean."""
    return args.prompts_per_step * args.group_size * args.max_new_tokens


def train(method: str, init_state, train_problems, eval_sets, args, seed: int) -> list[dict]:
    torch.manual_seed(seed + 1)  # same sampling seed for both methods
    prompt_rng = random.Random(seed + 2)  # same prompts per step for both methods
    model = make_model(args)
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # Official recipe (no clipping, "sum" aggregation, entropy 0.001, gamma 0.5), with rl_normalizer's constant.
    trainer = RLPlusTrainer(model, opt, max_grad_norm=1.0, normalizer=rl_normalizer(args))
    external = method == "rlplus"
    rollouts = args.group_size - 1 if external else args.group_size
    history = []
    samples_seen = 0
    recent_rewards: list[float] = []  # rollout rewards since the last evaluation
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "samples": samples_seen, "time_s": round(time.perf_counter() - t0, 2),
                   "rollout_reward": (round(sum(recent_rewards) / len(recent_rewards), 4)
                                      if recent_rewards else None)}
            recent_rewards = []
            for name, probs in eval_sets.items():
                for key, value in evaluate(model, probs, args).items():
                    row[f"{name}/{key}"] = round(value, 4)
            history.append(row)
            print(f"[seed {seed} {method:6s}] step {step:4d}  " + "  ".join(
                f"{k} {v:.3f}" for k, v in row.items() if "/" in k)
                + (f"  rollout reward {row['rollout_reward']:.3f}" if row["rollout_reward"] is not None
                   else ""), flush=True)
        if step == args.steps:
            break
        problems = prompt_rng.sample(train_problems, args.prompts_per_step)
        comps = sample(model, problems, rollouts, args.max_new_tokens)
        rewards = [[reward(a, b, c) for c in cs] for (a, b), cs in zip(problems, comps)]
        recent_rewards += [r for rs in rewards for r in rs]
        batch = build_group_batch(
            [prompt_ids(a, b) for a, b in problems], comps, rewards,
            external_completions=[[solve(a, b)] for a, b in problems] if external else None,
            pad_token_id=PAD, padding_side="left")
        # old log-probs of the policy that sampled the rollouts (and the MIS estimate for the
        # demonstrations); with one update per batch the ratio is 1 on rollouts
        old = score_logprobs(model, batch.input_ids, batch.attention_mask)
        metrics = trainer.step({**batch.model_inputs(), "old_logprobs": old, "rewards": batch.rewards})
        samples_seen += rollouts * len(problems)
        if step % args.eval_every == 0:
            print(f"{'':20s}step {step}: loss {metrics['loss']:+.4f}  grad_norm {metrics['grad_norm']:.3f}  "
                  f"entropy {metrics['entropy_mean']:.3f}  tok/s {metrics['tokens_per_s']:.0f}", flush=True)
    return history


def _stats(values: list[float]) -> dict:
    return {"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values)}


def plot(runs: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs[args.seeds[0]]["rlplus"]
    keys = [k for k in first[0] if "/" in k]
    steps = [r["step"] for r in first]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        for method, style, label in (("rlplus", "-o", "RL-PLUS"), ("grpo", "--s", "GRPO")):
            per_seed = [[r[key] for r in runs[seed][method]] for seed in args.seeds]
            mean = [sum(v) / len(v) for v in zip(*per_seed)]
            line, = ax.plot(steps, mean, style, ms=3, label=label)
            ax.fill_between(steps, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(key)
        ax.set_xlabel("RL step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"tiny Llama ({args.layers}x{args.hidden}), a+b with a,b<={args.max_operand}, "
                 f"group {args.group_size}, {args.prompts_per_step} prompts/step; "
                 f"mean and min-max over seeds {args.seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--heldout", type=float, default=0.2, help="fraction of problems held out")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--warmup", choices=("sft", "format"), default="sft")
    parser.add_argument("--warmup-steps", type=int, default=60)
    parser.add_argument("--warmup-batch", type=int, default=16)
    parser.add_argument("--warmup-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=8, help="pass@k")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    args.max_new_tokens = len(str(2 * args.max_operand)) + 1
    # one thread: the model is tiny, and on a busy 2-core machine extra intra-op threads made
    # every small op ~10x slower (measured), not faster
    torch.set_num_threads(args.threads)

    problems = [(a, b) for a in range(args.max_operand + 1) for b in range(args.max_operand + 1)]
    random.Random(1234).shuffle(problems)  # one split for every seed
    n_held = int(len(problems) * args.heldout)
    heldout, train_problems = problems[:n_held], problems[n_held:]
    eval_sets = {"train": train_problems, "heldout": heldout} if heldout else {"train": train_problems}
    print(f"{len(train_problems)} training problems, {len(heldout)} held out; "
          f"{args.steps} RL steps x {args.prompts_per_step} prompts x group {args.group_size}; "
          f"seeds {args.seeds}", flush=True)

    runs, times = {}, {"rlplus": 0.0, "grpo": 0.0}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = make_model(args)
        t0 = time.perf_counter()
        warmup(model, train_problems, args, random.Random(seed))
        init_state = copy.deepcopy(model.state_dict())
        print(f"seed {seed}: {args.warmup} warm-up, {args.warmup_steps} steps in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        runs[seed] = {}
        for method in ("rlplus", "grpo"):
            t0 = time.perf_counter()
            runs[seed][method] = train(method, init_state, train_problems, eval_sets, args, seed)
            times[method] += time.perf_counter() - t0

    keys = [k for k in runs[args.seeds[0]]["rlplus"][0] if "/" in k]
    summary = {method: {when: {key: _stats([runs[s][method][idx][key] for s in args.seeds]) for key in keys}
                        for when, idx in (("start", 0), ("final", -1))}
               for method in ("rlplus", "grpo")}
    os.makedirs(args.out, exist_ok=True)
    # the run is chaotic: another torch or transformers (its initialisation, its kernels) gives other curves
    import transformers

    result = {"args": {k: v for k, v in vars(args).items() if k != "out"},
              "recipe": {**OFFICIAL_RECIPE, "normalizer": rl_normalizer(args)},
              "torch": torch.__version__, "transformers": transformers.__version__,
              "time_s": {m: round(t, 1) for m, t in times.items()}, "summary": summary,
              "runs": {str(seed): h for seed, h in runs.items()}}
    with open(os.path.join(args.out, "train_rlplus_tiny.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(runs, args, os.path.join(args.out, "train_rlplus_tiny.png"))
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"\nmean over seeds {args.seeds} [min, max] (pass@1 = mean reward of "
          f"{args.eval_samples} samples at temperature 1):")
    for method in ("rlplus", "grpo"):
        for when in ("start", "final"):
            name = "RL-PLUS" if method == "rlplus" else "GRPO"
            step = 0 if when == "start" else args.steps
            print(f"  {name:8s} step {step:4d}  " + "  ".join(
                f"{k} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                for k, v in summary[method][when].items()))
    print(f"  time: RL-PLUS {times['rlplus']:.0f}s, GRPO {times['grpo']:.0f}s")


if __name__ == "__main__":
    main()
