"""RL throughput: Flow-GRPO's batched rollouts and update against a plain loop of the same work.

    OMP_NUM_THREADS=2 python benchmarks/bench_rl.py [--prompts 2] [--group 6] [--steps 8] [--repeats 2]

On the shipped shapes teacher (10.7M parameters, 64 px, CFG w = 3) with the judge's reward,
one rollout is ``prompts x group`` SDE samples of ``steps`` steps, decoded and scored:

* ours: :meth:`FlowGRPO.rollout`, every sample of the rollout in one transformer batch per step
  (positive and negative halves together), one VAE decode call and one reward call;
* plain loop: the same samples one at a time (each its own CFG pair of transformer calls per
  step, its own decode and reward call), what a first implementation written from the paper's
  pseudocode does.

The update is :meth:`FlowGRPO.training_step` on a stored rollout (all samples in one batch,
the trained steps back-propagated one at a time as the trainer does) against the same loss
image by image. Both sides do the same arithmetic; the ratio is what batching buys. Printed:
rollouts/s (images per second) and seconds per RL update, ours vs the loop, from one run.
Run it alone; a busy CPU inflates every number.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(prompts: int, group: int, steps: int):
    from zimagekit.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
    from zimagekit.pipeline import ZImagePipeline
    from zimagekit.runconfig import load_config
    from zimagekit.shapes.rewards import JudgeReward

    cfg = load_config(FlowGRPOConfig, ROOT / "configs" / "shapes" / "flow_grpo.yaml",
                      [f"grpo.group_size={group}", f"grpo.sde_steps={steps}", f"train.batch_size={prompts}"])
    pipe = ZImagePipeline.from_pretrained(ROOT / "src" / "zimagekit" / "models" / "shapes-teacher")
    return FlowGRPO(pipe, cfg, JudgeReward())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    algo = build(args.prompts, args.group, args.steps)
    words = ["a red circle", "two blue squares", "a green triangle to the left of a yellow circle",
             "three purple squares"][: args.prompts]
    captions = algo.pipe.encode_prompt(words)
    images = args.prompts * args.group

    def batched_rollout():
        return algo.rollout(captions, words)

    def looped_rollout():
        # One sample per call: group_size 1 has no advantages, so this times the sampling, the
        # decode and the reward, which is the work a rollout does before its advantages.
        from zimagekit.rewards import score
        from zimagekit.sampling import cpu_randn, gaussian_log_prob

        with torch.no_grad():
            for c, p in zip(captions, words):
                for _ in range(args.group):
                    x = cpu_randn((1, *algo.latent_shape))
                    for k in range(args.steps):
                        mean, std = algo._mean_and_std(algo.model, x, k, [c], [algo.empty])
                        if k < args.steps - 1:
                            x_next = mean + std * torch.randn_like(x)
                            gaussian_log_prob(x_next, mean, std)
                            x = x_next
                        else:
                            x = mean
                    score(algo.reward, algo.pipe.decode(x, "pt"), [p])

    batch = {"captions": captions, "prompts": words}

    def batched_update():
        algo._buffer = []
        roll = algo.rollout(captions, words)
        algo._buffer = [{"latents": roll["latents"], "log_probs": roll["log_probs"],
                         "advantages": roll["advantages"], "captions": roll["captions"]}]
        start = time.perf_counter()
        for part in algo.training_step(batch, 1)["lora"]:  # as the trainer does: backward part by part
            part.backward()
        return time.perf_counter() - start

    def looped_update():
        roll = algo.rollout(captions, words)
        start = time.perf_counter()
        for i in range(images):
            algo._buffer = [{"latents": roll["latents"][i:i + 1], "log_probs": roll["log_probs"][i:i + 1],
                             "advantages": roll["advantages"][i:i + 1], "captions": roll["captions"][i:i + 1]}]
            for part in algo.training_step(batch, 1)["lora"]:
                (part / images).backward()
        return time.perf_counter() - start

    ours_roll = timed(batched_rollout, args.repeats)
    loop_roll = timed(looped_rollout, args.repeats)
    ours_update = sum(batched_update() for _ in range(args.repeats)) / args.repeats
    loop_update = sum(looped_update() for _ in range(args.repeats)) / args.repeats
    print(f"Flow-GRPO on shapes-teacher: {args.prompts} prompts x {args.group} images, {args.steps} SDE steps, "
          f"w = {algo.guidance:g}, threads {torch.get_num_threads()}")
    print("| measure | ours (batched) | plain loop | speed-up |")
    print("|---|---|---|---|")
    print(f"| rollout images/s | {images / ours_roll:.2f} | {images / loop_roll:.2f} | {loop_roll / ours_roll:.1f}x |")
    print(f"| s per RL update (loss + backward, {algo.train_steps} steps) | {ours_update:.2f} | {loop_update:.2f} | "
          f"{loop_update / ours_update:.1f}x |")


if __name__ == "__main__":
    main()
