"""Reinforcement learning on sampled completions: GRPO (with DAPO's options), PPO with a learned critic, rewards and the sandbox."""
